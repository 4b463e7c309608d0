"""DP-Morph: differentiable grey-scale morphology on the network's class probabilities (DESIGN.md §5).

Opening (erode, then dilate), closing (dilate, then erode) or both (closing after opening) with a flat odd
structuring element, by max/min pooling, in 2D and 3D. ``MorphRefine`` turns logits into refined
log-probabilities (softmax outputs) or logits (sigmoid, region-based outputs), so nnU-Net's losses and its
inference run unchanged. It has no parameters: attached as a forward hook, checkpoints stay plain nnU-Net weights.

The adaptive variant picks the operation per case and per class from that case's own prediction: the share of
the class's probability mass that survives an erosion (thin structures vanish: closing; thick ones survive:
opening; in between: both). Nothing is computed across the cases of a batch, so each case's output, and thus its
gradient, depends on that case only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

OPERATIONS = ("none", "open", "close", "both")
_EPS = 1e-6


def check_kernel(kernel: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """A flat structuring element as one odd size per spatial axis."""
    sizes = (int(kernel),) * ndim if isinstance(kernel, (int, float)) else tuple(int(k) for k in kernel)
    if len(sizes) != ndim or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel must be {ndim} odd sizes >= 1, got {kernel}")
    return sizes


def anisotropic_kernel(size: int, spacing: Sequence[float]) -> tuple[int, ...]:
    """Kernel of about the same physical extent on every axis: ``size`` voxels along the finest axis, fewer
    (odd, >= 1) along coarser ones. E.g. size 3, spacing (3.0, 0.8, 0.8) -> (1, 3, 3)."""
    finest = min(spacing)
    out = []
    for s in spacing:
        k = int(size * finest / s + 1e-9)
        out.append(max(1, k if k % 2 else k - 1))
    return check_kernel(tuple(out), len(spacing))


def _pool(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[x.ndim - 2]
    return pool(x, kernel, stride=1, padding=tuple(k // 2 for k in kernel))


def dilate(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Grey-scale dilation of (B, C, *spatial) over the spatial axes (outside the image counts as -inf)."""
    return _pool(x, kernel)


def erode(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Grey-scale erosion (outside the image counts as +inf, so borders do not erode)."""
    return -_pool(-x, kernel)


def opening(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    return dilate(erode(x, kernel), kernel)


def closing(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    return erode(dilate(x, kernel), kernel)


def open_close(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Closing after opening."""
    return closing(opening(x, kernel), kernel)


APPLY = {"none": lambda x, k: x, "open": opening, "close": closing, "both": open_close}


def erosion_survival(p: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """(B, C): per case and class, the share of probability mass left after one erosion (1 = thick, 0 = thin)."""
    dims = tuple(range(2, p.ndim))
    return erode(p, kernel).sum(dims) / p.sum(dims).clamp_min(_EPS)


def adaptive_choice(p: torch.Tensor, kernel: tuple[int, ...], thin: float, thick: float) -> torch.Tensor:
    """(B, C) operation index into OPERATIONS per case and class: close below ``thin``, open above ``thick``,
    both in between. Computed per case from that case's (detached) probabilities only."""
    survival = erosion_survival(p.detach(), kernel)
    both, close, open_ = (torch.full_like(survival, OPERATIONS.index(o)) for o in ("both", "close", "open"))
    return torch.where(survival < thin, close, torch.where(survival > thick, open_, both)).long()


class MorphRefine(nn.Module):
    """Morphological refinement of one network output (or a deep-supervision list of them).

    ``operations``: one entry of OPERATIONS per output channel, or "adaptive" for every refined channel.
    ``regions``: sigmoid outputs (nnU-Net region-based training) instead of softmax."""

    def __init__(self, operations: Sequence[str], kernel: int | Sequence[int], ndim: int, regions: bool = False,
                 thin: float = 0.3, thick: float = 0.7):
        super().__init__()
        bad = [o for o in operations if o not in OPERATIONS + ("adaptive",)]
        if bad:
            raise ValueError(f"unknown morphological operation(s) {bad}; choose from {OPERATIONS + ('adaptive',)}")
        if not 0 <= thin <= thick <= 1:
            raise ValueError(f"need 0 <= thin ({thin}) <= thick ({thick}) <= 1")
        self.operations, self.kernel, self.regions = list(operations), check_kernel(kernel, ndim), regions
        self.thin, self.thick = float(thin), float(thick)

    def extra_repr(self) -> str:
        return f"operations={self.operations}, kernel={self.kernel}, regions={self.regions}"

    def refine_probabilities(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[1] != len(self.operations):
            raise ValueError(f"output has {p.shape[1]} channels, operations are given for {len(self.operations)}")
        choice = adaptive_choice(p, self.kernel, self.thin, self.thick) if "adaptive" in self.operations else None
        channels = []
        for c, op in enumerate(self.operations):
            pc = p[:, c:c + 1]
            if op == "adaptive":
                shape = (p.shape[0], 1) + (1,) * (p.ndim - 2)
                which = choice[:, c].reshape(shape)
                refined = pc
                for name in ("open", "close", "both"):
                    refined = torch.where(which == OPERATIONS.index(name), APPLY[name](pc, self.kernel), refined)
                channels.append(refined)
            else:
                channels.append(APPLY[op](pc, self.kernel))
        return torch.cat(channels, 1)

    def _refine(self, logits: torch.Tensor) -> torch.Tensor:
        if self.regions:
            q = self.refine_probabilities(torch.sigmoid(logits)).clamp(_EPS, 1 - _EPS)
            return torch.log(q) - torch.log1p(-q)
        q = self.refine_probabilities(torch.softmax(logits, 1)).clamp_min(_EPS)
        return torch.log(q / q.sum(1, keepdim=True))

    def forward(self, output):
        if isinstance(output, (list, tuple)):
            return type(output)(self._refine(o) for o in output)
        return self._refine(output)


def attach(network: nn.Module, refine: MorphRefine) -> nn.Module:
    """Apply ``refine`` to every output of ``network`` (a forward hook: the state dict is unchanged)."""
    network.add_module("dp_morph", refine)
    network.register_forward_hook(lambda module, args, output: module.dp_morph(output))
    return network


# ----------------------------------------------------------------------------- label maps (postprocessing)

def _label_kernel(kernel: int | Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    sizes = (int(kernel),) * len(shape) if isinstance(kernel, (int, float)) else tuple(int(k) for k in kernel)
    return check_kernel(tuple(1 if n == 1 else k for k, n in zip(sizes, shape)), len(shape))


def morph_binary(mask: np.ndarray, operation: str, kernel: tuple[int, ...]) -> np.ndarray:
    """Opening / closing / both of a binary mask (outside the image is neutral, as in the network version)."""
    erode_ = lambda m: ndimage.grey_erosion(m, size=kernel, mode="nearest")  # noqa: E731
    dilate_ = lambda m: ndimage.grey_dilation(m, size=kernel, mode="nearest")  # noqa: E731
    m = mask.astype(np.uint8)
    if operation in ("open", "both"):
        m = dilate_(erode_(m))
    if operation in ("close", "both"):
        m = erode_(dilate_(m))
    return m.astype(bool)


def morph_postprocess(segmentation: np.ndarray, operations: dict[int, str], kernel: int | Sequence[int] = 3
                      ) -> np.ndarray:
    """nnU-Net postprocessing function (``apply_postprocessing`` calls it with a label map): for each label in
    ``operations``, apply that operation to its mask. Removed voxels become background; added voxels take the
    label only where there was background."""
    if not operations:
        return segmentation
    out = segmentation.copy()
    k = _label_kernel(kernel, segmentation.shape)
    for label, op in operations.items():
        if op not in OPERATIONS:
            raise ValueError(f"label {label}: unknown operation {op!r}; choose from {OPERATIONS}")
        mask = segmentation == label
        new = morph_binary(mask, op, k)
        out[mask & ~new] = 0
        out[new & ~mask & (out == 0)] = label
    return out
