"""Federated trainer bases: NP-FL (standard nnU-Net locally) and DP-FL (DP-SGD locally); FedAvg at the
aggregator. Each DP site's account covers every update it ever uploads."""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .dp_trainer import nnUNetTrainerDP
from .fed_site import FederatedTrainerMixin, round_seed


class FederatedNPTrainer(FederatedTrainerMixin, nnUNetTrainer):
    federation_mode = "npfl"


class FederatedDPTrainer(FederatedTrainerMixin, nnUNetTrainerDP):
    federation_mode = "dpfl"

    def _privacy_manifest(self) -> dict:
        return {"epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "privacy_accountant": self.accountant.state_dict()}

    def _start_round(self, r: int) -> None:
        super()._start_round(r)
        noise_seed = self.dp_settings["noise_seed"]
        if noise_seed is not None and self.privacy is not None:
            self.privacy["generator"].manual_seed(round_seed(noise_seed, self.client.site, r))
