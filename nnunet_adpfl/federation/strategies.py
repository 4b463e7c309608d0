"""Aggregation rules (Flower-style strategy objects; transport is elsewhere).

A strategy sees one update at a time (memory O(model), not O(sites x model)) and is fed in sorted site order
by the aggregator, so the result does not depend on the order in which updates arrived.
"""
from __future__ import annotations

import torch


class FedAvg:
    """new_global = global + sum_s w_s * delta_s / sum_s w_s per tensor, with w_s the site's number of cases, over
    the sites that trained the tensor (a site's dp_trainable, chosen from its own N, may leave tensors frozen: they
    are absent from its update and do not dilute the other sites' updates of them)."""
    name = "fedavg"

    def begin(self, global_tensors: dict[str, torch.Tensor]) -> None:
        self._global = global_tensors
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_tensors.items()
                     if v.is_floating_point()}
        self._weight = dict.fromkeys(self._sum, 0.0)

    def add(self, delta: dict[str, torch.Tensor], num_cases: int, trained: set[str] | None = None) -> None:
        """``trained``: the tensors the site trained (None: all)."""
        for k, acc in self._sum.items():
            if trained is None or k in trained:
                acc.add_(delta[k].to(torch.float64), alpha=float(num_cases))
                self._weight[k] += num_cases

    def finish(self) -> dict[str, torch.Tensor]:
        if not any(w > 0 for w in self._weight.values()):
            raise ValueError("no update to aggregate")
        out = {}
        for k, v in self._global.items():
            trained = self._weight.get(k, 0.0) > 0
            out[k] = (v.to(torch.float64) + self._sum[k] / self._weight[k]).to(v.dtype) if trained else v
        self._global, self._sum, self._weight = None, None, None
        return out
