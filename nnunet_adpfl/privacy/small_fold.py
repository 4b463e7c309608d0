"""A warning for folds too small for their privacy budget: with few training cases N, the sample rate q = B/N is
large, amplification by subsampling is lost, and the calibrated noise multiplier sigma grows far above the values
DP-SGD trains well with.

Threshold: sigma > 4. Abadi et al. (2016) call sigma 2, 4 and 8 small, medium and large noise; above 4 each step's
noise on the mean gradient (std sigma*C/B per coordinate) is more than twice the largest norm the whole mean
gradient can have (C) at nnU-Net's usual expected batch of 2 cases, so the model learns little.
"""
from __future__ import annotations

from .accounting import PrivacyAccountant

SIGMA_WARN = 4.0
MAX_CASES = 10 ** 7


def _fits(sigma: float, num_cases: int, expected_batch_size: float, target_epsilon: float, delta: float, steps: int,
          accountant: str) -> bool:
    q = min(1.0, expected_batch_size / num_cases)
    return PrivacyAccountant(accountant, delta).epsilon([(sigma, q, steps)]) <= target_epsilon


def cases_for_sigma(sigma: float, expected_batch_size: float, target_epsilon: float, delta: float, steps: int,
                    accountant: str = "rdp", start: int = 1) -> int | None:
    """Smallest N >= ``start`` at which ``steps`` steps of noise ``sigma`` at rate B/N spend at most
    ``target_epsilon`` (the accountant's epsilon falls as N grows); None above ``MAX_CASES``."""
    def fits(n: int) -> bool:
        return _fits(sigma, n, expected_batch_size, target_epsilon, delta, steps, accountant)

    lo, hi = start, max(start, 1)
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_CASES:
            return None
    while hi - lo > 1:  # fits(hi); lo is start (maybe fitting) or an N that does not fit
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return lo if fits(lo) else hi


def small_fold_warning(sigma: float, num_cases: int, expected_batch_size: float, target_epsilon: float,
                       delta: float, steps: int, accountant: str = "rdp") -> str | None:
    """The warning for a calibrated ``sigma`` above ``SIGMA_WARN``, with the N that would allow ``SIGMA_WARN`` at the
    same epsilon, delta, expected batch and steps; None below the threshold."""
    if sigma <= SIGMA_WARN:
        return None
    needed = cases_for_sigma(SIGMA_WARN, expected_batch_size, target_epsilon, delta, steps, accountant, num_cases)
    more = f"about {needed} training cases" if needed is not None else f"more than {MAX_CASES} training cases"
    return (f"small fold: {num_cases} training cases (sample rate q = {min(1.0, expected_batch_size / num_cases):.3g})"
            f" need noise multiplier sigma = {sigma:.3g} for epsilon {target_epsilon:g} over {steps} steps; above "
            f"sigma {SIGMA_WARN:g} the noise swamps the training signal. {more[0].upper() + more[1:]} would allow "
            f"sigma {SIGMA_WARN:g} at the same epsilon, delta, expected batch size and steps (fewer steps help too).")
