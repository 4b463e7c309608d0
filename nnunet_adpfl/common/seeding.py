"""Seeding the random number generators a training process draws from (Python, NumPy, torch)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators. Data augmentation is then reproducible only where it
    runs in this process (``nnUNet_n_proc_DA=0``): nnU-Net's augmentation workers draw their own seeds."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
