"""Standard (non-private) nnU-Net with the run length of the settings file: the baseline of comparisons, trained
for the same epochs / iterations / learning rate as the private runs. With the setting ``seed`` the run is
reproducible (network initialisation, sampling and augmentation) when nnU-Net runs one augmentation worker or none
(``nnUNet_n_proc_DA`` 1 or 0)."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_adpfl.common.config import apply_run_length, load_settings
from nnunet_adpfl.common.seeding import seed_all, seeded_augmentation_workers


class nnUNetTrainerBaselineBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        settings = load_settings()
        apply_run_length(self, settings)
        self.seed = settings["seed"]
        if self.seed is not None:
            seed_all(self.seed)
            if get_allowed_n_proc_DA() > 1:
                self.print_to_log_file(f"seed {self.seed}: nnU-Net's augmentation workers hand out batches as they "
                                       "finish; set nnUNet_n_proc_DA=1 (or 0) for a reproducible run")

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        with seeded_augmentation_workers(self.seed):
            return super().get_dataloaders()
