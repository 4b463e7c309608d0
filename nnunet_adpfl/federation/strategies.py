"""Aggregation rules (Flower-style strategy objects; transport is elsewhere).

A strategy sees one update at a time (memory O(model), not O(sites x model)) and is fed in sorted site order
by the aggregator, so the result does not depend on the order in which updates arrived.
"""
from __future__ import annotations

import torch


class FedAvg:
    """new_global = global + sum_s w_s * delta_s / sum_s w_s, with w_s the site's number of cases."""
    name = "fedavg"

    def begin(self, global_tensors: dict[str, torch.Tensor]) -> None:
        self._global = global_tensors
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_tensors.items()
                     if v.is_floating_point()}
        self._weight = 0.0

    def add(self, delta: dict[str, torch.Tensor], num_cases: int) -> None:
        for k, acc in self._sum.items():
            acc.add_(delta[k].to(torch.float64), alpha=float(num_cases))
        self._weight += num_cases

    def finish(self) -> dict[str, torch.Tensor]:
        if self._weight <= 0:
            raise ValueError("no update to aggregate")
        out = {}
        for k, v in self._global.items():
            out[k] = (v.to(torch.float64) + self._sum[k] / self._weight).to(v.dtype) if k in self._sum else v
        self._global, self._sum = None, None
        return out
