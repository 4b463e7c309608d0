"""Dice per label on label maps (the demo's table; the full metric suite comes with the comparison report).

Convention: a label absent from both reference and prediction gives NaN (left out of means), as in
nnU-Net's evaluation; absent from one of them gives 0.
"""
from __future__ import annotations

import numpy as np


def dice(reference: np.ndarray, prediction: np.ndarray, labels) -> dict:
    """Dice for each label (an int, or a tuple of ints for a region)."""
    out = {}
    for label in labels:
        ref = np.isin(reference, label)
        pred = np.isin(prediction, label)
        denom = ref.sum() + pred.sum()
        out[label] = float(2 * np.logical_and(ref, pred).sum() / denom) if denom else float("nan")
    return out
