"""The first thing a federated trainer checks: that this site has its settings (federation folder, site name, key).
Without them, ``nnUNetv2_train ... -tr <federated trainer>`` stops with a short message instead of a traceback,
before nnU-Net creates the output folder."""
from __future__ import annotations

import os

import torch

from ..common.config import ENV_VAR, SettingsError, load_settings

SITE_KEYS = ("federation_dir", "site_id", "site_key_file")


def federation_not_set_up(trainer: str, mode: str, single_site: str, simulated: bool = True) -> str | None:
    """What to tell a user who starts a federated trainer without its site settings; None if they are there.
    ``simulated``: ``nnunet-adpfl simulate`` runs this trainer."""
    missing = [k for k in SITE_KEYS if not load_settings()[k]]
    if not missing:
        return None
    path = os.environ.get(ENV_VAR)
    why = f"${ENV_VAR} is unset" if not path else \
        f"the settings file {path} (${ENV_VAR}) lacks {', '.join(missing)}"
    return (f"{trainer} trains one site of a federation, and {why}.\n"
            f"Set up a federation first (all steps: README \"Federated training\"); the coordinator creates it with\n"
            f"  nnunet-adpfl federation init /shared/fed --sites A,B,C --rounds 20 --mode {mode} "
            f"--keys-dir ~/fed_keys\n"
            f"and runs its aggregator with\n"
            f"  nnunet-adpfl aggregate /shared/fed --keys-dir ~/fed_keys\n"
            f"and each site sets ${ENV_VAR} to a JSON file such as\n"
            f'  {{"federation_dir": "/shared/fed", "site_id": "A", "site_key_file": "/secure/A.key"}}\n'
            + (f"To try it on this machine: nnunet-adpfl simulate --sites 3 --trainer {trainer}\n" if simulated else "")
            + f"To train one site alone, without a federation: -tr {single_site}")


class SiteSettingsCheck:
    """First base of a federated trainer: exits with ``federation_not_set_up``'s message (no traceback) before any
    other constructor runs. ``single_site_trainer``: what to use without a federation; ``simulated``: whether
    ``nnunet-adpfl simulate`` runs this trainer."""
    federation_mode: str
    single_site_trainer = "nnUNetTrainer (standard nnU-Net)"
    simulated = True
    private = False  # DP-FL, ADP-FL: every upload must carry noise

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        message = federation_not_set_up(type(self).__name__, self.federation_mode, self.single_site_trainer,
                                        self.simulated)
        if message is not None:
            raise SystemExit(message)
        settings = load_settings()
        if self.private and settings["target_epsilon"] is None and settings["noise_multiplier"] == 0:
            raise SettingsError("noise_multiplier 0 with no target_epsilon: this site's updates would leave it "
                                "without any privacy guarantee; set target_epsilon (or noise_multiplier > 0), "
                                "or train without privacy with nnUNetTrainerFL")
        super().__init__(plans, configuration, fold, dataset_json, device)
