"""DP-Morph trainers: a DP trainer (clipping rule from the settings' clipping_rule) whose network refines its class
probabilities morphologically, in training and in nnUNetv2_predict (see nnunet_adpfl.morphology.morph)."""
from nnunet_adpfl.training.adpfl_trainer import FederatedADPTrainer
from nnunet_adpfl.training.dp_trainer import nnUNetTrainerDP
from nnunet_adpfl.training.morph_trainer import DPMorphMixin


class nnUNetTrainerDPMorph(DPMorphMixin, nnUNetTrainerDP):
    """One operation (settings' morph_operation) for the chosen classes."""


class nnUNetTrainerDPMorphAdaptive(DPMorphMixin, nnUNetTrainerDP):
    """The operation chosen per case and class from that case's predicted class thickness."""
    adaptive_morph = True


class nnUNetTrainerADPFLMorph(DPMorphMixin, FederatedADPTrainer):
    """ADP-FL (federated) with DP-Morph."""
    single_site_trainer = "nnUNetTrainerDPMorph (DP-Morph)"
    simulated = False  # nnunet-adpfl simulate runs FL, DPFL and ADPFL only
