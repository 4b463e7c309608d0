"""Federated trainer bases: NP-FL (standard nnU-Net locally) and DP-FL (DP-SGD locally); FedAvg at the
aggregator. Each DP site's account covers every update it ever uploads."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .dp_trainer import nnUNetTrainerDP
from ..federation.site import FederatedTrainerMixin, round_seed
from ..common.initial_weights import PUBLIC_REQUIREMENT
from .site_settings import SiteSettingsCheck


class FederatedNPTrainer(SiteSettingsCheck, FederatedTrainerMixin, nnUNetTrainer):
    federation_mode = "npfl"


class FederatedDPTrainer(SiteSettingsCheck, FederatedTrainerMixin, nnUNetTrainerDP):
    federation_mode = "dpfl"
    single_site_trainer = "nnUNetTrainerDPSGD (DP-SGD)"
    private = True
    supports_ema = False

    def _privacy_manifest(self) -> dict:
        return {"epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "privacy_accountant": self.accountant.state_dict()}

    def _initial_weights_origin(self) -> dict:
        cfg = self.client.cfg
        manifest = self.client.global_manifest(0)
        public = cfg.get("initial_weights")
        return {"source": "the federation's round-0 global model", "round0_sha256": manifest["sha256"],
                "federation_initial_weights": public or f"random initialisation (aggregator, seed {cfg.get('seed')})",
                **({"requirement": PUBLIC_REQUIREMENT} if public else {})}

    def _report_extra(self) -> dict:
        decay = self.client.cfg.get("release_ema_decay")
        return {**super()._report_extra(), "released_model": "global model of the last round" if decay is None else
                f"EMA of the global models of rounds 1..R (decay {decay}), post-processing"}

    def _local_delta(self) -> dict[str, torch.Tensor]:
        """Only the privately trained tensors: frozen ones (dp_trainable) did not change and are not uploaded."""
        params = self.privacy["params"] if self.privacy is not None else self._private_params()
        delta = super()._local_delta()
        return {k: v for k, v in delta.items() if k in params}

    def _start_round(self, r: int) -> None:
        super()._start_round(r)
        noise_seed = self.dp_settings["noise_seed"]
        if noise_seed is not None and self.privacy is not None:
            self.privacy["generator"].manual_seed(round_seed(noise_seed, self.client.site, r))
