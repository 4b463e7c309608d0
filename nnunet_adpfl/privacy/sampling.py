"""Poisson sampling of cases (what the accountant assumes, DESIGN.md section 1).

Each step includes every training case independently with probability q; an included case gives exactly
one patch. Whether that patch is forced to contain foreground is decided per case with its own coin
(nnU-Net's probabilistic oversampling), not by its position in the batch.
"""
from __future__ import annotations

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def poisson_mask(num_cases: int, sample_rate: float, rng=np.random) -> np.ndarray:
    """Boolean inclusion mask: each case independently with probability ``sample_rate``.
    ``rng``: anything with ``random(n)`` (numpy's global state by default, seeded per worker process)."""
    return rng.random(num_cases) < sample_rate


class PoissonDataLoader(nnUNetDataLoader):
    """nnU-Net training loader with Poisson-sampled, variable-size batches (possibly empty).

    ``multiplicity`` K: an included case gives K consecutive patches, each with its own crop, foreground coin and
    augmentation (all that case's own randomness). An empty draw yields ``{'data': None, 'target': None, 'keys': []}``.
    """

    def __init__(self, *args, sample_rate: float, multiplicity: int = 1, **kwargs):
        kwargs["probabilistic_oversampling"] = True
        super().__init__(*args, **kwargs)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if multiplicity < 1:
            raise ValueError(f"multiplicity must be >= 1, got {multiplicity}")
        self.sample_rate = sample_rate
        self.multiplicity = multiplicity
        self._draw: list = []

    def get_indices(self):
        return self._draw

    def generate_train_batch(self):
        included = poisson_mask(len(self.indices), self.sample_rate)
        self._draw = [k for k, inc in zip(self.indices, included) if inc for _ in range(self.multiplicity)]
        if not self._draw:
            return {"data": None, "target": None, "keys": []}
        self.batch_size = len(self._draw)
        return super().generate_train_batch()


def training_augmenter(loader, num_processes: int, pin_memory: bool) -> MultiThreadedAugmenter:
    """Background workers for the training loader whose batches come out in a fixed order.

    Worker w makes draws w, w + n, w + 2n, ... with its own numpy generator (batchgenerators seeds each worker from
    the OS), and the batches are taken round-robin, so the steps are independent Poisson draws in an order that does
    not depend on the data. nnU-Net's NonDetMultiThreadedAugmenter hands out batches as they finish: a draw that takes
    longer (more or larger cases) is overtaken and the draws still in flight at the end are dropped, a data-dependent
    selection of draws that the accountant does not assume."""
    return MultiThreadedAugmenter(_OneTorchThread(loader), None, num_processes, num_cached_per_queue=2, seeds=None,
                                  pin_memory=pin_memory)


class _OneTorchThread:
    """The loader as a worker process runs it: torch limited to one thread there, as nnU-Net's own augmenter does
    (torch's OpenMP pool, inherited through fork, deadlocks the worker's first augmentation otherwise)."""

    def __init__(self, loader):
        self.loader = loader

    def set_thread_id(self, thread_id: int) -> None:  # the worker's first call, in the worker process
        torch.set_num_threads(1)
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)


def batch_to_device(batch: dict, device: torch.device):
    data, target = batch["data"], batch["target"]
    if data is None:
        return None, None
    data = data.to(device, non_blocking=True)
    if isinstance(target, list):
        target = [t.to(device, non_blocking=True) for t in target]
    else:
        target = target.to(device, non_blocking=True)
    return data, target
