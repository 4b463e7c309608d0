"""Segmentation metrics on label maps: Dice, HD95 and NSD (normalised surface Dice), per label or region.

Conventions: a label absent from both reference and prediction gives NaN (left out of means), as in nnU-Net's
evaluation. Absent from exactly one of them: Dice 0, NSD 0, and HD95 the image diagonal in mm (the worst
possible distance, so means stay finite and such cases are penalised).
Surfaces are the mask voxels with a background face-neighbour; distances are Euclidean in mm (voxel spacing).
HD95 and NSD agree with MONAI's compute_hausdorff_distance / compute_surface_dice (tests/test_metrics.py).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def nanmean(values) -> float:
    """Mean of the defined (non-NaN) values; NaN if there are none."""
    finite = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def dice(reference: np.ndarray, prediction: np.ndarray, labels) -> dict:
    """Dice for each label (an int, or a tuple of ints for a region)."""
    out = {}
    for label in labels:
        ref = np.isin(reference, label)
        pred = np.isin(prediction, label)
        denom = ref.sum() + pred.sum()
        out[label] = float(2 * np.logical_and(ref, pred).sum() / denom) if denom else float("nan")
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and from ``b``'s to ``a``'s."""
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def _per_label(reference, prediction, labels, one_empty: float, measure) -> dict:
    """``measure(ref_mask, pred_mask)`` per label; NaN if both masks are empty, ``one_empty`` if one is."""
    out = {}
    for label in labels:
        ref, pred = np.isin(reference, label), np.isin(prediction, label)
        if not ref.any() and not pred.any():
            out[label] = float("nan")
        elif not ref.any() or not pred.any():
            out[label] = one_empty
        else:
            out[label] = float(measure(ref, pred))
    return out


def _spacing(reference: np.ndarray, spacing) -> tuple[float, ...]:
    return (1.0,) * reference.ndim if spacing is None else tuple(float(s) for s in spacing)


def hd95(reference: np.ndarray, prediction: np.ndarray, labels, spacing=None) -> dict:
    """95th-percentile symmetric Hausdorff distance (mm) per label: max of the two directed 95th percentiles."""
    spacing = _spacing(reference, spacing)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(reference.shape, spacing))))

    def measure(ref, pred):
        d_rp, d_pr = surface_distances(ref, pred, spacing)
        return max(np.percentile(d_rp, 95), np.percentile(d_pr, 95))
    return _per_label(reference, prediction, labels, diagonal, measure)


def nsd(reference: np.ndarray, prediction: np.ndarray, labels, tolerance_mm: float = 1.0, spacing=None) -> dict:
    """Normalised surface Dice per label: the share of both surfaces within ``tolerance_mm`` of the other."""
    spacing = _spacing(reference, spacing)

    def measure(ref, pred):
        d_rp, d_pr = surface_distances(ref, pred, spacing)
        return ((d_rp <= tolerance_mm).sum() + (d_pr <= tolerance_mm).sum()) / (d_rp.size + d_pr.size)
    return _per_label(reference, prediction, labels, 0.0, measure)
