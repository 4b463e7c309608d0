"""The model a federation releases: the last round's global model or, with the federation setting
``release_ema_decay`` d, the exponential moving average of the global models of rounds 1..R:
ema_1 = global_1, ema_r = d * ema_{r-1} + (1 - d) * global_r.

Every input is a released (signed) global model, so the average is post-processing: no privacy cost. Each site
computes it from the globals it already holds, so no new file crosses a transport and all sites get the same model.
"""
from __future__ import annotations

from typing import Iterable

import torch


def check_decay(decay) -> float | None:
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(f"release_ema_decay must be a number in (0, 1) or none, got {decay!r}")
    return float(decay)


def ema_of_globals(globals_in_round_order: Iterable[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """EMA of the float tensors (in float64, returned in the last global's dtypes); other tensors from the last."""
    decay = check_decay(decay)
    ema, last = None, None
    for tensors in globals_in_round_order:
        if ema is None:
            ema = {k: v.to(torch.float64) for k, v in tensors.items() if v.is_floating_point()}
        else:
            if set(tensors) != set(last):
                raise ValueError("global models of different rounds hold different tensors")
            for k, acc in ema.items():
                acc.mul_(decay).add_(tensors[k].to(torch.float64), alpha=1 - decay)
        last = tensors
    if last is None:
        raise ValueError("no global model to average")
    return {k: ema[k].to(v.dtype) if k in ema else v for k, v in last.items()}
