"""Measures instead of training: per-case gradient norms on a public dataset at the initial weights, the basis of a
clip norm chosen without privacy cost (nnunet_adpfl.training.clip_calibration)."""
from nnunet_adpfl.training.clip_calibration import nnUNetTrainerDPClipCalibration

__all__ = ["nnUNetTrainerDPClipCalibration"]
