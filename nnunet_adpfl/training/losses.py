"""Per-case nnU-Net losses (Dice + CE / Dice + BCE) that are safe under ``torch.func.vmap``.

Each equals nnU-Net's ``DC_and_CE_loss`` / ``DC_and_BCE_loss`` (MemoryEfficientSoftDiceLoss, smooth 1e-5,
``batch_dice=False``) evaluated on a single case: no batch Dice, no in-place one-hot, no data-dependent
Python branches, so a case's loss depends on that case only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-5


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-case mean soft Dice over channels, shape (b,)."""
    axes = tuple(range(2, probs.ndim))
    if mask is not None:
        onehot = onehot * mask
        probs_m = probs * mask
    else:
        probs_m = probs
    intersect = (probs_m * onehot).sum(axes)
    sum_pred = probs_m.sum(axes)
    sum_gt = onehot.sum(axes)
    dc = (2 * intersect + SMOOTH) / (sum_gt + sum_pred + SMOOTH).clamp_min(1e-8)
    return dc.mean(1)


def dice_ce_per_case(logits: torch.Tensor, target: torch.Tensor, ignore_label: int | None) -> torch.Tensor:
    """Softmax Dice (foreground classes) + cross-entropy, one value per case. target: (b, 1, ...) labels."""
    labels = target[:, 0].long()
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
    if ignore_label is not None:
        valid = labels != ignore_label
        mask = valid[:, None].to(logits.dtype)
        dice_labels = torch.where(valid, labels, torch.zeros_like(labels))
    else:
        valid, mask, dice_labels = None, None, labels
    onehot = (dice_labels[:, None] == classes).to(logits.dtype)
    probs = torch.softmax(logits, 1)
    dice = _soft_dice(probs[:, 1:], onehot[:, 1:], mask)
    ce_voxel = F.cross_entropy(logits, labels, reduction="none",
                               ignore_index=ignore_label if ignore_label is not None else -100)
    axes = tuple(range(1, ce_voxel.ndim))
    if valid is None:
        ce = ce_voxel.mean(axes)
    else:
        ce = ce_voxel.sum(axes) / valid.sum(axes).clamp_min(1)
    return ce - dice


def dice_bce_per_case(logits: torch.Tensor, target: torch.Tensor, has_ignore: bool) -> torch.Tensor:
    """Region-based sigmoid Dice (all regions) + BCE, one value per case. target: (b, R[+1 ignore], ...)."""
    if has_ignore:
        mask = (1 - target[:, -1:].to(logits.dtype))
        regions = target[:, :-1].to(logits.dtype)
    else:
        mask, regions = None, target.to(logits.dtype)
    dice = _soft_dice(torch.sigmoid(logits), regions, mask)
    bce_voxel = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
    axes = tuple(range(1, bce_voxel.ndim))
    if mask is None:
        bce = bce_voxel.mean(axes)
    else:
        bce = (bce_voxel * mask).sum(axes) / mask.sum(axes).clamp_min(1e-8)
    return bce - dice


class PerCaseLoss(nn.Module):
    """nnU-Net's training loss, per case, with deep-supervision weights.

    ``per_case(outputs, targets)`` returns a (b,) tensor; ``forward`` returns its mean, which equals
    nnU-Net's loss with ``batch_dice=False`` when no ignore label is present.
    """

    def __init__(self, has_regions: bool, ignore_label: int | None, ds_weights: Sequence[float] | None):
        super().__init__()
        self.has_regions = has_regions
        self.ignore_label = ignore_label
        self.ds_weights = None if ds_weights is None else tuple(float(w) for w in ds_weights)

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.has_regions:
            return dice_bce_per_case(logits, target, self.ignore_label is not None)
        return dice_ce_per_case(logits, target, self.ignore_label)

    def per_case(self, outputs, targets) -> torch.Tensor:
        if self.ds_weights is None:
            return self._single(outputs, targets)
        return sum(w * self._single(o, t) for w, o, t in zip(self.ds_weights, outputs, targets) if w != 0)

    def forward(self, outputs, targets) -> torch.Tensor:
        return self.per_case(outputs, targets).mean()
