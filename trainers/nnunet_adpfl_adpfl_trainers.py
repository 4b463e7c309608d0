"""ADP-FL trainer: DP-FL + step sparsification + adaptive clipping + dynamic noise (+ sparse uploads)."""
from nnunet_adpfl.training.adpfl_trainer import FederatedADPTrainer


class nnUNetTrainerADPFL(FederatedADPTrainer):
    """Every mechanism on (defaults); switch any off in the settings file for ablations."""
