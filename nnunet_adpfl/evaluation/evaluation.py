"""Evaluate a folder of predicted label maps against a dataset's ``labelsTs``: Dice, HD95 and NSD per case and per
label or region (``metrics.py``), read with nnU-Net's own reader for the dataset's file format. As in nnU-Net's
evaluation, the reference's ignore label (``"ignore"`` in dataset.json) is no class: its voxels count in no metric."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .metrics import dice, hd95, nanmean, nsd

METRICS = ("dice", "hd95", "nsd")
IGNORE = "ignore"  # nnU-Net's name of the ignore label in dataset.json


def dataset_labels(dataset_json: dict, extra_regions: dict | None = None, add_foreground: bool = False) -> dict:
    """{name: label or region tuple} of the dataset's foreground labels (the ignore label is none), plus
    ``extra_regions``. With ``add_foreground``, a dataset of several plain labels also gets their union region
    ``foreground``."""
    labels = {name: tuple(v) if isinstance(v, list) else v for name, v in dataset_json["labels"].items()
              if name not in ("background", IGNORE)}
    plain = [v for v in labels.values() if isinstance(v, int)]
    if add_foreground and len(plain) > 1 and len(plain) == len(labels):
        labels["foreground"] = tuple(plain)
    for name, region in (extra_regions or {}).items():
        labels[name] = tuple(region)
    return labels


def squeeze(array: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """Drop singleton axes (nnU-Net reads 2D images as 1 x H x W) together with their spacing."""
    keep = [i for i, n in enumerate(array.shape) if n > 1]
    return array.reshape([array.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def reader_for(dataset_folder: Path):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    example = next((dataset_folder / "labelsTs").glob(f"*{dataset_json['file_ending']}"))
    return determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)()


def evaluate_folder(dataset_folder: Path, prediction_folder: Path, metrics=METRICS, tolerance_mm: float = 1.0,
                    extra_regions: dict | None = None, add_foreground: bool = False) -> list[dict]:
    """One record per test case: {"case", metric: {label name: value}}. Raises if a prediction is missing."""
    dataset_folder, prediction_folder = Path(dataset_folder), Path(prediction_folder)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    labels = dataset_labels(dataset_json, extra_regions, add_foreground)
    ignore_label = dataset_json["labels"].get(IGNORE)
    refs = sorted((dataset_folder / "labelsTs").glob(f"*{ending}"))
    if not refs:
        raise FileNotFoundError(f"no reference labels in {dataset_folder / 'labelsTs'}")
    missing = [r.name for r in refs if not (prediction_folder / r.name).exists()]
    if missing:
        raise FileNotFoundError(f"{prediction_folder} lacks predictions for {missing}")
    reader = reader_for(dataset_folder)
    records = []
    for ref_file in refs:
        ref, props = reader.read_seg(str(ref_file))
        pred, _ = reader.read_seg(str(prediction_folder / ref_file.name))
        ref, spacing = squeeze(ref[0], props["spacing"])
        pred, _ = squeeze(pred[0], props["spacing"])
        ignored = ref == ignore_label if ignore_label is not None else None
        values = list(labels.values())
        scores = {"dice": lambda: dice(ref, pred, values, ignored),
                  "hd95": lambda: hd95(ref, pred, values, spacing, ignored),
                  "nsd": lambda: nsd(ref, pred, values, tolerance_mm, spacing, ignored)}
        record = {"case": ref_file.name[:-len(ending)]}
        for metric in metrics:
            per_label = scores[metric]()
            record[metric] = {name: per_label[label] for name, label in labels.items()}
        records.append(record)
    return records


def summarise_cases(records: list[dict]) -> dict:
    """{metric: {label: {"mean", "std", "n"}}} over the cases, NaN (undefined) values left out."""
    out = {}
    for metric in (m for m in METRICS if records and m in records[0]):
        out[metric] = {}
        for name in records[0][metric]:
            finite = [r[metric][name] for r in records if not math.isnan(r[metric][name])]
            out[metric][name] = {"mean": nanmean(finite), "std": float(np.std(finite)) if finite else float("nan"),
                                 "n": len(finite)}
    return out


def mean_per_label(records: list[dict], metric: str = "dice") -> dict:
    """{label: mean over cases} of one metric (NaN-aware)."""
    return {name: s["mean"] for name, s in summarise_cases(records)[metric].items()}
