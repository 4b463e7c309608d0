"""Privacy accounting on Opacus' accountants (RDP default, PRV optional).

The state is the list of (noise_multiplier, sample_rate, steps) segments, so steps with different sigma
compose, and resuming from a checkpoint restores exactly what was spent.
"""
from __future__ import annotations

import math

from opacus.accountants import create_accountant
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

MECHANISMS = ("rdp", "prv")
# Opacus' default RDP orders stop at 63; large sample rates with small sigma need higher orders for a tight
# (still valid) bound. These extend them as dp_accounting's defaults do.
RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512, 768, 1024]


def _epsilon_kwargs(mechanism: str) -> dict:
    return {"alphas": RDP_ORDERS} if mechanism == "rdp" else {}


class PrivacyAccountant:
    def __init__(self, mechanism: str = "rdp", delta: float = 1e-5, history: list | None = None):
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown accountant {mechanism!r}; use one of {MECHANISMS}")
        self.mechanism = mechanism
        self.delta = delta
        self.history: list[tuple[float, float, int]] = [tuple(h) for h in (history or [])]

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + num_steps)
        else:
            self.history.append((noise_multiplier, sample_rate, num_steps))

    def epsilon(self, extra: list[tuple[float, float, int]] | None = None) -> float:
        """epsilon at ``self.delta`` for the history plus ``extra`` segments (0 before any step)."""
        history = self.history + list(extra or [])
        history = [h for h in history if h[2] > 0]
        if not history:
            return 0.0
        if any(sigma == 0 and q > 0 for sigma, q, _ in history):
            return math.inf
        acc = create_accountant(mechanism=self.mechanism)
        acc.history = history
        return float(acc.get_epsilon(delta=self.delta, **_epsilon_kwargs(self.mechanism)))

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "delta": self.delta, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyAccountant":
        return cls(state["mechanism"], state["delta"], state["history"])


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               mechanism: str = "rdp") -> float:
    """Smallest sigma (to Opacus' tolerance) whose ``steps`` Poisson-sampled Gaussian steps spend at most
    ``target_epsilon``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=mechanism, epsilon_tolerance=0.01 * target_epsilon,
                                      **_epsilon_kwargs(mechanism)))


def steps_within_budget(accountant: PrivacyAccountant, target_epsilon: float, noise_multiplier: float,
                        sample_rate: float, limit: int) -> int:
    """Largest k <= limit such that k more steps keep epsilon <= target_epsilon (binary search)."""
    def fits(k: int) -> bool:
        return accountant.epsilon([(noise_multiplier, sample_rate, k)]) <= target_epsilon

    if fits(limit):
        return limit
    lo, hi = 0, limit  # fits(lo) holds (k = 0 spends nothing more), fits(hi) does not
    if not fits(0):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
