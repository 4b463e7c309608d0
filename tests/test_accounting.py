"""Our epsilon (Opacus accountants) against Google's dp_accounting, an independent implementation."""
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from nnunet_adpfl.privacy.accounting import PrivacyAccountant, calibrate_noise_multiplier, steps_within_budget


def google_epsilon(segments, delta, kind="rdp"):
    if kind == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant()
    else:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in segments:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


SEGMENTS = [
    [(1.0, 0.01, 1000)],
    [(0.8, 0.05, 500)],
    [(2.0, 0.1, 2000)],
    [(1.2, 0.02, 300), (0.9, 0.02, 300), (0.7, 0.02, 300)],  # unequal sigma compose
]


@pytest.mark.parametrize("mechanism, reference, segments",
                         [("rdp", "rdp", seg) for seg in SEGMENTS] +
                         [("prv", "pld", seg) for seg in SEGMENTS[:2] + SEGMENTS[3:]])
def test_epsilon_matches_dp_accounting(mechanism, reference, segments):
    """Ours (RDP; PRV) against Google's dp_accounting (RDP; PLD), within 1%."""
    acc = PrivacyAccountant(mechanism, 1e-5)
    for sigma, q, steps in segments:
        acc.step(sigma, q, steps)
    ours, ref = acc.epsilon(), google_epsilon(segments, 1e-5, reference)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)


def test_step_by_step_equals_bulk():
    a, b = PrivacyAccountant(), PrivacyAccountant()
    for _ in range(250):
        a.step(1.1, 0.02)
    b.step(1.1, 0.02, 250)
    assert a.history == b.history == [(1.1, 0.02, 250)]
    assert a.epsilon() == b.epsilon()


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_calibration_hits_target_independently_checked(target):
    q, steps = 0.04, 2500
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, "rdp")
    ref = google_epsilon([(sigma, q, steps)], 1e-5)
    assert 0.98 * target <= ref <= 1.01 * target, (sigma, ref)


def test_budget_cap():
    acc = PrivacyAccountant("rdp", 1e-5)
    sigma, q = 1.0, 0.05
    k = steps_within_budget(acc, 3.0, sigma, q, 100_000)
    assert 0 < k < 100_000
    assert acc.epsilon([(sigma, q, k)]) <= 3.0 < acc.epsilon([(sigma, q, k + 1)])
    assert steps_within_budget(acc, 3.0, sigma, q, 10) == 10
    acc.step(sigma, q, k)
    assert steps_within_budget(acc, 3.0, sigma, q, 10) == 0


def test_no_noise_is_infinite_epsilon_and_state_round_trip():
    acc = PrivacyAccountant("rdp", 1e-5)
    assert acc.epsilon() == 0.0
    acc.step(0.0, 0.1)
    assert math.isinf(acc.epsilon())
    acc2 = PrivacyAccountant.from_state_dict(acc.state_dict())
    assert acc2.history == acc.history and acc2.delta == acc.delta
    with pytest.raises(ValueError, match="unknown accountant"):
        PrivacyAccountant("gdp")
