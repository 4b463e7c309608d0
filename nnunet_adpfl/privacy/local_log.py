"""Values computed from raw private data before noise, kept out of everything a DP run releases.

nnU-Net saves its whole logger (``my_fantastic_logging``) in every checkpoint, ``checkpoint_final.pth`` included.
The mean training loss of the private batches and the raw-gradient alignment cosines are unnoised functions of the
training cases, so a DP trainer logs NaN there and keeps the real values in ``local_only_log.json`` in the fold
folder (and in its text log): for the site's own eyes, never to be shared.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..common.atomic import write_json_atomic

LOCAL_LOG_NAME = "local_only_log.json"


def _finite_mean(values: list[float]) -> float:
    finite = [x for x in values if not math.isnan(x)]
    return float(np.mean(finite)) if finite else math.nan


def epoch_values(losses: list[float], alignment: list[tuple[float, float]] | None) -> dict[str, float]:
    """The epoch's mean training loss and (with alignment logging) mean cosines; NaN where undefined."""
    values = {"train_loss": _finite_mean(losses)}
    if alignment is not None:
        values["cos_raw_clipped"] = _finite_mean([a for a, _ in alignment])
        values["cos_raw_noisy"] = _finite_mean([b for _, b in alignment])
    return values


def describe(values: dict[str, float]) -> str:
    text = f"local only (never in a checkpoint): train loss {values['train_loss']:.4f}"
    if "cos_raw_clipped" in values:
        text += (f"; alignment cos(raw, clipped) {values['cos_raw_clipped']:.3f}, "
                 f"cos(raw, noisy) {values['cos_raw_noisy']:.3f}")
    return text


def read_local_log(folder: str | Path) -> dict[str, list[float]]:
    """The per-epoch local-only series of a fold folder (NaN where missing); {} if there is none."""
    path = Path(folder) / LOCAL_LOG_NAME
    if not path.is_file():
        return {}
    log = json.loads(path.read_text())
    return {k: [math.nan if v is None else float(v) for v in series] for k, series in log.items()}


def record_epoch(folder: str | Path, epoch: int, values: dict[str, float]) -> dict[str, list[float]]:
    """Store ``values`` as epoch ``epoch`` (entries of later epochs, left by an interrupted run, are dropped);
    returns the whole log."""
    log = read_local_log(folder)
    for key, value in values.items():
        series = log.get(key, [])[:epoch]
        log[key] = series + [math.nan] * (epoch - len(series)) + [value]
    write_json_atomic(Path(folder) / LOCAL_LOG_NAME,
                      {k: [None if math.isnan(v) else v for v in series] for k, series in log.items()})
    return log
