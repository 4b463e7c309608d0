"""Federated nnU-Net trainers (sites of a federation folder; see README "Federated training")."""
from nnunet_adpfl.training.fed_trainers import FederatedDPTrainer, FederatedNPTrainer


class nnUNetTrainerFL(FederatedNPTrainer):
    """NP-FL: standard local nnU-Net training, FedAvg across sites."""


class nnUNetTrainerDPFL(FederatedDPTrainer):
    """DP-FL: local DP-SGD (flat clipping), FedAvg across sites."""
