"""Statistics of one-run privacy auditing (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run", NeurIPS).

m canaries are each included with probability 1/2 by an independent secret coin. After training, the auditor
guesses IN for some canaries and OUT for some others (abstaining on the rest): r guesses, v of them right.
If the training is (eps, delta)-DP with respect to adding or removing one canary, then

    P[v correct] <= P[Binomial(r, p) >= v] + 2 m delta max_{1 <= i <= v} P[v > Binomial(r, p) >= v - i] / i,
    p = e^eps / (1 + e^eps).

The first term is the paper's pure-DP result (exact: eps-randomized response on r canaries attains it); the
second is its approximate-DP correction, computed as in the paper's Appendix D algorithm (a valid upper bound,
not a tight one). :func:`epsilon_lower_bound` returns the largest eps whose p-value is below 1 - confidence:
with that confidence, the training is not (eps, delta)-DP for any smaller eps.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

_EPS_MAX = 100.0      # search ceiling: above it the bound is reported as _EPS_MAX
_TOLERANCE = 1e-4     # bisection stops when the bracket is this narrow (the lower end is reported)


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("canaries m", m), ("guesses r", r), ("correct v", v)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {x!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[>= v of r guesses correct] for an (eps, delta)-DP training with m canaries."""
    _check_counts(m, r, v)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))                       # P[Binomial(r, p) >= v]
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)) if v > 0 else np.zeros(0)
    worst = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0  # max_i P[v > B >= v - i] / i
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest eps (to _TOLERANCE, at most _EPS_MAX) with p_value(m, r, v, eps, delta) <= 1 - confidence;
    0 when even eps = 0 cannot be rejected."""
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    if p_value(m, r, v, _EPS_MAX, delta) <= alpha:
        return _EPS_MAX
    lo, hi = 0.0, _EPS_MAX  # p_value(lo) <= alpha < p_value(hi); p_value grows with eps
    while hi - lo > _TOLERANCE:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) <= alpha else (lo, mid)
    return lo


def top_bottom_guesses(scores: np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """+1 (guess IN) for the k_in highest scores, -1 (guess OUT) for the k_out lowest, 0 (abstain) elsewhere.
    Ties are broken by canary index (a stable sort), which does not depend on the coins."""
    scores = np.asarray(scores, dtype=float).reshape(-1)
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    if k_in < 0 or k_out < 0 or k_in + k_out > scores.size:
        raise ValueError(f"cannot make {k_in} IN and {k_out} OUT guesses on {scores.size} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=int)
    guesses[order[scores.size - k_in:]] = 1
    guesses[order[:k_out]] = -1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r guesses made, v correct) for guesses in {-1, 0, +1} against the secret inclusion coins."""
    guesses, included = np.asarray(guesses), np.asarray(included, dtype=bool)
    if guesses.shape != included.shape:
        raise ValueError(f"{guesses.size} guesses for {included.size} canaries")
    truth = np.where(included, 1, -1)
    return int(np.count_nonzero(guesses)), int(np.sum(guesses == truth))
