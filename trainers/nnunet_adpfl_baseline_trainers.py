"""Standard (non-private) nnU-Net with the run length of the settings file: the baseline of comparisons, trained
for the same epochs / iterations / learning rate as the private runs. With the setting ``seed`` the run is
reproducible (network initialisation, sampling and augmentation; with ``nnUNet_n_proc_DA=0``)."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_adpfl.common.config import apply_run_length, load_settings
from nnunet_adpfl.common.seeding import seed_all


class nnUNetTrainerBaselineBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = load_settings()
        apply_run_length(self, settings)
        if settings["seed"] is not None:
            seed_all(settings["seed"])
            if get_allowed_n_proc_DA() != 0:
                self.print_to_log_file(f"seed {settings['seed']}: augmentation runs in nnU-Net's workers, which draw "
                                       "their own seeds; set nnUNet_n_proc_DA=0 for a reproducible run")
