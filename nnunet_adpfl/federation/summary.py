"""Federated nnU-Net planning, the statistics: what a site sends (its summary) and how the coordinator merges them.

Planning itself and installing the plans: :mod:`.plan`.

Every site runs nnU-Net's own fingerprint extraction (``nnUNetv2_extract_fingerprint``) locally and
reduces the result with :func:`site_summary`. A coordinator merges the summaries
(:func:`merge_summaries`) into an nnU-Net-style fingerprint and runs nnU-Net's planner on it
(:func:`plan_federated`). Every site installs the resulting plans (:func:`install_plans`), checks
:func:`plans_digest` against the federation's, and runs ``nnUNetv2_preprocess``.

What leaves a site (the summary, a JSON object), field by field:

- ``format``: the summary format tag ``"nnunet_adpfl.site_summary/1"``.
- ``num_cases``: the number of training cases of the site.
- ``quantile_levels``: the fixed levels of :data:`QUANTILES` (0, 5, ..., 100 percent).
- ``spacing_quantiles``: per image axis, the quantiles at those levels of the voxel spacing (mm) over
  the site's cases (a 21 x ndim table).
- ``shape_quantiles``: the same for the image shape after nnU-Net's crop to the nonzero region (voxels).
- ``extent_quantiles``: the same for the physical size after cropping, shape x spacing (mm).
- ``median_relative_size_after_cropping``: the median over cases of the fraction of voxels kept by
  that crop (one number, as in nnU-Net's fingerprint).
- ``foreground_intensity_properties_per_channel``: per input channel, nnU-Net's foreground
  intensity statistics ``mean, median, std, min, max, percentile_00_5, percentile_99_5``, computed
  over the foreground voxels sampled from all cases together (already aggregates in nnU-Net's fingerprint).
- ``channel_names``, ``labels``, ``file_ending`` and, if present, ``regions_class_order`` of the
  site's dataset.json (not ``numTraining``, ``name``, ``description`` or any file list).
- ``image_reader_writer``: the name of the nnU-Net image reader class for the site's files.

No per-case values, case identifiers or file names leave the site, and the axes are summarised
separately (no per-case link between spacing and shape). Caveat: quantiles are order statistics;
for a site with fewer cases than quantile levels the 21 levels pin down (nearly) every per-axis sorted
value, i.e. which spacings/shapes occur at the site, though not which case has which. The minimum and
maximum foreground intensity are single-voxel values. These are aggregate statistics outside the DP
account (DESIGN.md section 7); they are documented here as such.

The coordinator turns every summary into ``num_cases`` pseudo-cases read off the quantile tables (so
each site weighs by its number of cases and the planner's medians and percentiles come out close to
the pooled ones; see :func:`merge_summaries`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.special import ndtr, ndtri

QUANTILES: tuple[int, ...] = tuple(range(0, 101, 5))  # percent
SUMMARY_FORMAT = "nnunet_adpfl.site_summary/1"
INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")
DATASET_KEYS = ("channel_names", "labels", "file_ending", "regions_class_order")
_TAIL = 0.005  # level of percentile_00_5 (and 1 - level of percentile_99_5) in nnU-Net's fingerprint
FINGERPRINT_FILE, DATASET_FILE = "dataset_fingerprint.json", "dataset.json"
MAX_SITE_CASES = 100_000  # one pseudo-case each: bounds the coordinator's memory and the merged fingerprint's size


# ----------------------------------------------------------------------------- site side


def _quantile_table(values: np.ndarray) -> list[list[float]]:
    """Per-axis quantiles at QUANTILES of an (n_cases, ndim) array, as a len(QUANTILES) x ndim table."""
    return np.percentile(values, QUANTILES, axis=0, method="linear").tolist()


def _intensity_stats(properties: dict) -> dict[str, dict[str, float]]:
    """nnU-Net's per-channel foreground statistics with string channel keys and plain floats."""
    stats = {}
    for channel, values in sorted(properties.items(), key=lambda item: int(item[0])):
        missing = [key for key in INTENSITY_KEYS if key not in values]
        if missing:
            raise ValueError(f"foreground intensity properties of channel {channel} lack {missing}")
        stats[str(int(channel))] = {key: float(values[key]) for key in INTENSITY_KEYS}
    return stats


def _default_reader_writer(dataset_json: dict) -> str:
    """The reader nnU-Net would pick from dataset.json alone (override, else the first for the file ending)."""
    override = dataset_json.get("overwrite_image_reader_writer")
    if override and override != "None":
        return str(override)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    return determine_reader_writer_from_file_ending(dataset_json["file_ending"], None, verbose=False).__name__


def site_summary(fingerprint: dict, dataset_json: dict, image_reader_writer: str | None = None) -> dict:
    """Aggregate-only summary of one site's nnU-Net dataset fingerprint (fields: see the module docstring).

    ``image_reader_writer`` defaults to the dataset.json override or nnU-Net's first reader for the file
    ending; :func:`site_summary_from_folders` determines it from an image as nnU-Net's planner does."""
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[0] == 0 or spacings.shape != shapes.shape:
        raise ValueError(f"fingerprint needs one spacing and one shape per case with equal dimensionality, "
                         f"got spacings {spacings.shape} and shapes_after_crop {shapes.shape}")
    if not np.all(np.isfinite(spacings)) or np.any(spacings <= 0) or np.any(shapes <= 0):
        raise ValueError("fingerprint spacings and shapes must be finite and positive")
    summary = {
        "format": SUMMARY_FORMAT,
        "num_cases": int(spacings.shape[0]),
        "quantile_levels": list(QUANTILES),
        "spacing_quantiles": _quantile_table(spacings),
        "shape_quantiles": _quantile_table(shapes),
        "extent_quantiles": _quantile_table(spacings * shapes),
        "median_relative_size_after_cropping": float(fingerprint["median_relative_size_after_cropping"]),
        "foreground_intensity_properties_per_channel": _intensity_stats(
            fingerprint["foreground_intensity_properties_per_channel"]),
        "image_reader_writer": image_reader_writer or _default_reader_writer(dataset_json),
    }
    for key in DATASET_KEYS:
        if key in dataset_json:
            summary[key] = json.loads(json.dumps(dataset_json[key]))  # plain JSON copy
    if len(summary["foreground_intensity_properties_per_channel"]) != len(dataset_json["channel_names"]):
        raise ValueError("the fingerprint's number of channels differs from dataset.json's channel_names")
    return summary


def site_summary_from_folders(raw_dataset_dir: str | Path, preprocessed_dataset_dir: str | Path) -> dict:
    """:func:`site_summary` of a site's nnUNet_raw/DatasetXXX and nnUNet_preprocessed/DatasetXXX folders
    (after ``nnUNetv2_extract_fingerprint``); the reader class is determined from a training image."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = json.loads((Path(raw_dataset_dir) / DATASET_FILE).read_text())
    fingerprint = json.loads((Path(preprocessed_dataset_dir) / FINGERPRINT_FILE).read_text())
    example = _example_training_image(Path(raw_dataset_dir), dataset_json)
    reader = determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False).__name__
    return site_summary(fingerprint, dataset_json, reader)


def _example_training_image(raw_dataset_dir: Path, dataset_json: dict) -> str:
    """One training image's path. Not nnU-Net's get_filenames_of_train_images_and_targets: it forks a Pool,
    which can deadlock in a process that already runs threads (torch, tqdm)."""
    if "dataset" in dataset_json:
        first = next(iter(dataset_json["dataset"].values()))["images"][0]
        path = Path(os.path.expandvars(first))
        return str(path if path.is_absolute() else raw_dataset_dir / path)
    images = sorted((raw_dataset_dir / "imagesTr").glob(f"*_0000{dataset_json['file_ending']}"))
    if not images:
        raise FileNotFoundError(f"no training images (*_0000{dataset_json['file_ending']}) in "
                                f"{raw_dataset_dir / 'imagesTr'}")
    return str(images[0])


# ----------------------------------------------------------------------------- coordinator side


def _check_summary(summary: dict, index: int) -> None:
    if summary.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"summary {index}: unknown format {summary.get('format')!r} (expected {SUMMARY_FORMAT!r})")
    if tuple(summary["quantile_levels"]) != QUANTILES:
        raise ValueError(f"summary {index}: quantile levels differ from QUANTILES")
    cases = summary.get("num_cases")
    if not isinstance(cases, int) or isinstance(cases, bool) or not 1 <= cases <= MAX_SITE_CASES:
        raise ValueError(f"summary {index}: num_cases must be an integer in 1..{MAX_SITE_CASES}, got "
                         f"{str(cases)[:40]!r}")


def _check_agreement(summaries: list[dict]) -> None:
    """Raise ValueError unless all sites agree on channels, labels, file ending, regions, reader and ndim."""
    first = summaries[0]
    for index, other in enumerate(summaries[1:], start=1):
        for key in (*DATASET_KEYS, "image_reader_writer"):
            if first.get(key) != other.get(key):
                raise ValueError(f"sites disagree on {key}: site 0 has {first.get(key)!r}, "
                                 f"site {index} has {other.get(key)!r}")
        if set(first["foreground_intensity_properties_per_channel"]) != \
                set(other["foreground_intensity_properties_per_channel"]):
            raise ValueError(f"sites disagree on the channels of their intensity statistics (site 0, site {index})")
        ndims = (len(first["spacing_quantiles"][0]), len(other["spacing_quantiles"][0]))
        if ndims[0] != ndims[1]:
            raise ValueError(f"sites disagree on dimensionality: site 0 has {ndims[0]} axes, site {index} {ndims[1]}")


def _read_off(table: Sequence[Sequence[float]], levels: np.ndarray) -> np.ndarray:
    """Values at the given levels (percent) of a per-axis quantile table, by linear interpolation."""
    table = np.asarray(table, dtype=np.float64)
    return np.stack([np.interp(levels, QUANTILES, table[:, axis]) for axis in range(table.shape[1])], axis=1)


def _pseudo_cases(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """num_cases pseudo-cases (spacings, shapes) of one site.

    Pseudo-case k sits at level k / (n - 1) of the quantile tables; with numpy's linear quantiles that
    reproduces the site's sorted per-axis values whenever the level lies on the QUANTILES grid. Spacing
    and extent are read off directly, so the shapes after resampling (extent / target spacing) that the
    planner takes the median of follow the site's extents; shape = extent / spacing, pairing spacing and
    extent per axis in the same or in opposite order, whichever reproduces the shared shape quantiles better."""
    n = int(summary["num_cases"])
    levels = np.linspace(0.0, 100.0, n) if n > 1 else np.array([50.0])
    spacings = _read_off(summary["spacing_quantiles"], levels)
    extents = _read_off(summary["extent_quantiles"], levels)
    target = np.log(np.asarray(summary["shape_quantiles"], dtype=np.float64))
    shapes = np.empty_like(spacings)
    for axis in range(spacings.shape[1]):
        candidates = (extents[:, axis] / spacings[:, axis], extents[::-1, axis] / spacings[:, axis])
        errors = [np.abs(np.log(np.percentile(c, QUANTILES)) - target[:, axis]).sum() for c in candidates]
        shapes[:, axis] = candidates[int(np.argmin(errors))]
    return spacings, shapes


def _site_cdf(stats: dict, x: np.ndarray) -> np.ndarray:
    """Approximate CDF of one site's foreground intensities from its five order statistics: between the
    0.5 and 99.5 percentiles the normal score is piecewise linear in x through (p0.5, -2.576), (median, 0),
    (p99.5, 2.576) (a split normal matching the three percentiles); linear tails down to min and up to max."""
    lo, med, hi = np.maximum.accumulate([stats["percentile_00_5"], stats["median"], stats["percentile_99_5"]])
    lo_min, hi_max = min(stats["min"], lo), max(stats["max"], hi)
    z = ndtri(_TAIL)
    body = ndtr(np.interp(x, [lo, med, hi], [z, 0.0, -z]))
    lower = np.interp(x, [lo_min, lo], [0.0, _TAIL]) if lo > lo_min else np.where(x < lo, 0.0, _TAIL)
    upper = np.interp(x, [hi, hi_max], [1.0 - _TAIL, 1.0]) if hi_max > hi else np.where(x > hi, 1.0, 1 - _TAIL)
    return np.where(x < lo, lower, np.where(x > hi, upper, body))


def _mixture_quantile(stats: list[dict], weights: np.ndarray, level: float) -> float:
    """Quantile of the case-weighted mixture of the sites' approximate intensity CDFs (:func:`_site_cdf`)."""
    knots = [[s["min"], s["percentile_00_5"], s["median"], s["percentile_99_5"], s["max"]] for s in stats]
    grid = np.unique(np.concatenate([np.ravel(knots), np.linspace(np.min(knots), np.max(knots), 4001)]))
    if len(grid) == 1:
        return float(grid[0])
    cdf = np.maximum.accumulate(sum(w * _site_cdf(s, grid) for w, s in zip(weights, stats)))
    return float(np.interp(level, cdf, grid))


def _merge_intensities(stats: list[dict], weights: np.ndarray) -> dict[str, float]:
    """Pooled statistics of one channel: exact mean and std of the case-weighted mixture (within + between
    site variance), min of mins, max of maxes, mixture-CDF approximation for the 0.5 / 99.5 percentiles (the
    clipping bounds of CTNormalization), case-weighted mean of the site medians (nnU-Net does not use it)."""
    means = np.array([s["mean"] for s in stats])
    mean = float(weights @ means)
    variance = float(weights @ (np.array([s["std"] for s in stats]) ** 2 + (means - mean) ** 2))
    return {
        "mean": mean,
        "median": float(weights @ np.array([s["median"] for s in stats])),
        "std": math.sqrt(max(variance, 0.0)),
        "min": float(min(s["min"] for s in stats)),
        "max": float(max(s["max"] for s in stats)),
        "percentile_99_5": _mixture_quantile(stats, weights, 0.995),
        "percentile_00_5": _mixture_quantile(stats, weights, 0.005),
    }


def merge_summaries(summaries: list[dict]) -> tuple[dict, dict]:
    """Merge site summaries into nnU-Net's (dataset_fingerprint, dataset.json).

    Per-case lists (spacings, shapes_after_crop) become pseudo-cases read off each site's quantile tables,
    num_cases per site. Intensities: case-weighted mean, pooled std (within + between sites), min of mins,
    max of maxes, 0.5/99.5 percentiles of the case-weighted mixture of approximate site CDFs
    (:func:`_site_cdf`), case-weighted mean of the medians. median_relative_size_after_cropping:
    case-weighted mean of the site medians. numTraining: total number of cases. Raises ValueError if
    sites disagree on channels, labels, file ending, regions, reader or dimensionality."""
    if not summaries:
        raise ValueError("no site summaries to merge")
    for index, summary in enumerate(summaries):
        _check_summary(summary, index)
    _check_agreement(summaries)
    counts = np.array([int(s["num_cases"]) for s in summaries], dtype=np.float64)
    weights = counts / counts.sum()
    pseudo = [_pseudo_cases(s) for s in summaries]
    channels = summaries[0]["foreground_intensity_properties_per_channel"].keys()
    fingerprint = {
        "spacings": np.concatenate([p[0] for p in pseudo]).tolist(),
        "shapes_after_crop": np.concatenate([p[1] for p in pseudo]).tolist(),
        "foreground_intensity_properties_per_channel": {
            c: _merge_intensities([s["foreground_intensity_properties_per_channel"][c] for s in summaries], weights)
            for c in channels},
        "median_relative_size_after_cropping": float(
            weights @ np.array([s["median_relative_size_after_cropping"] for s in summaries])),
    }
    dataset_json = {key: summaries[0][key] for key in DATASET_KEYS if key in summaries[0]}
    dataset_json["numTraining"] = int(counts.sum())
    dataset_json["overwrite_image_reader_writer"] = summaries[0]["image_reader_writer"]
    return fingerprint, dataset_json
