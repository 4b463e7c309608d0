"""Seeding the random number generators a training process and its augmentation workers draw from."""
from __future__ import annotations

import random
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (this process only)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextmanager
def seeded_augmentation_workers(seed: int):
    """Inside, nnU-Net's trainer starts its augmentation workers with seeds from ``seed`` (seed, seed + 1, ...)
    instead of fresh entropy. With one worker per loader (``nnUNet_n_proc_DA`` 0 or 1) the batches are then
    reproducible; with more, their order is not (batches are handed out as they finish)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    unseeded = trainer_module.NonDetMultiThreadedAugmenter

    def seeded(*args, num_processes: int, seeds=None, **kwargs):
        return unseeded(*args, num_processes=num_processes, seeds=[(seed + i) % (2 ** 32) for i in
                                                                   range(num_processes)], **kwargs)

    with mock.patch.object(trainer_module, "NonDetMultiThreadedAugmenter", seeded):
        yield
