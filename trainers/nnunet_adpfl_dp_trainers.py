"""DP-SGD trainers for nnU-Net: each picks one clipping rule (see nnunet_adpfl.privacy.clipping)."""
from nnunet_adpfl.training.dp_trainer import nnUNetTrainerDP


class nnUNetTrainerDPSGD(nnUNetTrainerDP):
    clipping_rule = "flat"


class nnUNetTrainerAutoS(nnUNetTrainerDP):
    clipping_rule = "autos"


class nnUNetTrainerNSGD(nnUNetTrainerDP):
    clipping_rule = "nsgd"


class nnUNetTrainerPSAC(nnUNetTrainerDP):
    clipping_rule = "psac"
