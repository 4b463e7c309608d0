"""Segmentation metrics on label maps: Dice, HD95 and NSD (normalised surface Dice), per label or region.

Conventions: a label absent from both reference and prediction gives NaN (left out of means), as in nnU-Net's
evaluation. Absent from exactly one of them: Dice 0, NSD 0, and HD95 the image diagonal in mm (the worst
possible distance, so means stay finite and such cases are penalised).
Dice is nnU-Net's own (``nnunetv2.evaluation.evaluate_predictions``: its masks of labels and regions, its counts
outside the ignore mask), so it equals ``nnUNetv2_evaluate_folder``'s value exactly.
Surfaces are the mask voxels with a background face-neighbour; distances are Euclidean in mm (voxel spacing).
HD95 and NSD agree with MONAI's compute_hausdorff_distance / compute_surface_dice (tests/test_metrics.py).
Ignored voxels (``ignore_mask``, nnU-Net's ignore label in the reference) count in no metric: they are removed
from both masks, and a face towards an ignored voxel is no surface (whether it is one is unknown). HD95 and NSD
are undefined (NaN) for a label with voxels outside the ignored region but no surface outside it.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from scipy import ndimage


def nanmean(values) -> float:
    """Mean of the defined (non-NaN) values; NaN if there are none."""
    finite = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _mask(segmentation: np.ndarray, label) -> np.ndarray:
    """nnU-Net's mask of a label (int) or region (tuple of labels)."""
    return region_or_label_to_mask(segmentation, label if np.isscalar(label) else tuple(label))


def dice(reference: np.ndarray, prediction: np.ndarray, labels, ignore_mask: np.ndarray | None = None) -> dict:
    """Dice for each label (an int, or a tuple of ints for a region), nnU-Net's: 2 TP / (2 TP + FP + FN) over the
    voxels outside ``ignore_mask``; NaN if TP + FP + FN = 0."""
    out = {}
    for label in labels:
        tp, fp, fn, _ = compute_tp_fp_fn_tn(_mask(reference, label), _mask(prediction, label), ignore_mask)
        out[label] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else float("nan")
    return out


def _surface(mask: np.ndarray, ignore_mask: np.ndarray | None = None) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour that is background and not ignored (the image border is
    background)."""
    solid = mask if ignore_mask is None else mask | ignore_mask
    return mask & ~ndimage.binary_erosion(solid, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing,
                      ignore_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and from ``b``'s to ``a``'s."""
    sa, sb = _surface(a, ignore_mask), _surface(b, ignore_mask)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def _per_label(reference, prediction, labels, one_empty: float, measure, ignore_mask, spacing) -> dict:
    """``measure(d_ref_to_pred, d_pred_to_ref)`` per label on the masks outside ``ignore_mask``; NaN if both masks
    are empty (or a mask has no surface outside the ignored region), ``one_empty`` if one is."""
    out = {}
    for label in labels:
        ref, pred = _mask(reference, label), _mask(prediction, label)
        if ignore_mask is not None:
            ref, pred = ref & ~ignore_mask, pred & ~ignore_mask
        if not ref.any() and not pred.any():
            out[label] = float("nan")
        elif not ref.any() or not pred.any():
            out[label] = one_empty
        else:
            d_rp, d_pr = surface_distances(ref, pred, spacing, ignore_mask)
            out[label] = float(measure(d_rp, d_pr)) if d_rp.size and d_pr.size else float("nan")
    return out


def _spacing(reference: np.ndarray, spacing) -> tuple[float, ...]:
    return (1.0,) * reference.ndim if spacing is None else tuple(float(s) for s in spacing)


def hd95(reference: np.ndarray, prediction: np.ndarray, labels, spacing=None,
         ignore_mask: np.ndarray | None = None) -> dict:
    """95th-percentile symmetric Hausdorff distance (mm) per label: max of the two directed 95th percentiles."""
    spacing = _spacing(reference, spacing)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(reference.shape, spacing))))

    def measure(d_rp, d_pr):
        return max(np.percentile(d_rp, 95), np.percentile(d_pr, 95))
    return _per_label(reference, prediction, labels, diagonal, measure, ignore_mask, spacing)


def nsd(reference: np.ndarray, prediction: np.ndarray, labels, tolerance_mm: float = 1.0, spacing=None,
        ignore_mask: np.ndarray | None = None) -> dict:
    """Normalised surface Dice per label: the share of both surfaces within ``tolerance_mm`` of the other."""
    spacing = _spacing(reference, spacing)

    def measure(d_rp, d_pr):
        return ((d_rp <= tolerance_mm).sum() + (d_pr <= tolerance_mm).sum()) / (d_rp.size + d_pr.size)
    return _per_label(reference, prediction, labels, 0.0, measure, ignore_mask, spacing)
