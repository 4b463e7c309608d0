"""Dynamic noise schedules and adaptive (quantile) clipping, DESIGN.md section 3."""
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from nnunet_adpfl.privacy.adaptive import (SCHEDULES, NoiseSchedule, QuantileClipTracker, calibrate_schedule,
                                   clip_wander, count_noise_warning, default_sigma_count, noise_aware_clip_lr,
                                   schedule_epsilon, split_noise)

DELTA, Q, STEPS_PER_ROUND, ROUNDS, TARGET = 1e-5, 0.05, 40, 4, 3.0


def google_epsilon(sigmas, q, steps_per_round, delta):
    """Independent recomputation with Google's dp_accounting, one composition per round (nothing merged)."""
    acc = rdp_privacy_accountant.RdpAccountant()
    for sigma in sigmas:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps_per_round)
    return acc.get_epsilon(delta)


_CALIBRATED = {}


def calibrated(schedule):
    """Calibrated multipliers, computed once per schedule for the whole module (accountant calls are slow)."""
    if schedule not in _CALIBRATED:
        _CALIBRATED[schedule] = calibrate_schedule(schedule, TARGET, DELTA, Q, STEPS_PER_ROUND, ROUNDS)
    return _CALIBRATED[schedule]


# ---------------------------------------------------------------------------------------------- schedule shapes
def test_constant_shape():
    assert NoiseSchedule("constant").shape(5) == [1.0] * 5
    assert NoiseSchedule("constant").shape(1) == [1.0]


@pytest.mark.parametrize("kind", ["linear", "exponential"])
@pytest.mark.parametrize("end_ratio", [0.25, 0.5, 2.0])
def test_linear_and_exponential_shapes(kind, end_ratio):
    shape = NoiseSchedule(kind, end_ratio=end_ratio).shape(7)
    assert len(shape) == 7 and shape[0] == 1.0 and shape[-1] == pytest.approx(end_ratio)
    diffs = [b - a for a, b in zip(shape, shape[1:])]
    assert all(d < 0 for d in diffs) if end_ratio < 1 else all(d > 0 for d in diffs)
    if kind == "linear":
        assert diffs == pytest.approx([diffs[0]] * len(diffs))
    else:
        ratios = [b / a for a, b in zip(shape, shape[1:])]
        assert ratios == pytest.approx([end_ratio ** (1 / 6)] * 6)
    assert NoiseSchedule(kind, end_ratio=end_ratio).shape(1) == [1.0]


def test_step_shape():
    assert NoiseSchedule("step", step_every=2, step_factor=0.5).shape(7) == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert NoiseSchedule("step", step_factor=0.8).shape(3) == pytest.approx([1, 0.8, 0.64])


def test_schedule_validation():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("cosine")
    for bad in ({"end_ratio": 0.0}, {"end_ratio": -1.0}, {"end_ratio": math.inf}, {"step_every": 0},
                {"step_every": 1.5}, {"step_factor": 0.0}):
        with pytest.raises(ValueError):
            NoiseSchedule("linear", **bad)
    with pytest.raises(ValueError, match="rounds"):
        NoiseSchedule("constant").shape(0)
    assert set(SCHEDULES) == {"constant", "linear", "exponential", "step"}


# ------------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("schedule", [NoiseSchedule("constant"), NoiseSchedule("exponential", end_ratio=0.4),
                                      NoiseSchedule("step", step_every=2, step_factor=0.7)],
                         ids=["constant", "exponential", "step"])
def test_calibration_hits_target_independently_checked(schedule):
    sigmas = calibrated(schedule)
    shape = schedule.shape(ROUNDS)
    assert len(sigmas) == ROUNDS
    assert [s / sigmas[0] for s in sigmas] == pytest.approx(shape)
    ours = schedule_epsilon(sigmas, DELTA, Q, STEPS_PER_ROUND)
    assert 0.99 * TARGET <= ours <= TARGET
    ref = google_epsilon(sigmas, Q, STEPS_PER_ROUND, DELTA)
    assert 0.99 * TARGET <= ref <= 1.01 * TARGET, (ours, ref)


def test_decaying_schedule_same_budget_less_noise_at_the_end():
    constant = calibrated(NoiseSchedule("constant"))
    decaying = calibrated(NoiseSchedule("exponential", end_ratio=0.4))
    eps_constant = schedule_epsilon(constant, DELTA, Q, STEPS_PER_ROUND)
    eps_decaying = schedule_epsilon(decaying, DELTA, Q, STEPS_PER_ROUND)
    assert eps_decaying == pytest.approx(eps_constant, rel=0.01)
    assert decaying[-1] < constant[-1] < decaying[0]


def test_calibration_rejects_impossible_inputs():
    sch = NoiseSchedule("linear")
    good = dict(target_epsilon=2.0, delta=DELTA, sample_rate=Q, steps_per_round=10, rounds=3)
    for key, bad in [("target_epsilon", 0.0), ("target_epsilon", -1.0), ("target_epsilon", math.inf),
                     ("delta", 0.0), ("delta", 1.0), ("sample_rate", 0.0), ("sample_rate", 1.5),
                     ("steps_per_round", 0), ("steps_per_round", 2.5), ("rounds", 0)]:
        with pytest.raises(ValueError):
            calibrate_schedule(sch, **{**good, key: bad})
    with pytest.raises(ValueError, match="accountant"):
        calibrate_schedule(sch, **good, mechanism="gdp")
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_schedule(sch, **good, tolerance=0.0)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        calibrate_schedule("linear", **good)
    with pytest.raises(ValueError, match="out of reach"):  # would need a noise multiplier beyond the search range
        calibrate_schedule(sch, **{**good, "target_epsilon": 1e-4})


# ---------------------------------------------------------------------------------------------- noise split
@pytest.mark.parametrize("sigma,sigma_count", [(1.0, 3.2), (0.7, 0.5), (2.0, 1.01), (1.3, 100.0)])
def test_split_noise_combines_to_sigma(sigma, sigma_count):
    sigma_grad = split_noise(sigma, sigma_count)
    assert sigma_grad > sigma
    assert (sigma_grad ** -2 + (2 * sigma_count) ** -2) ** -0.5 == pytest.approx(sigma, rel=1e-12)


def test_split_noise_requires_enough_count_noise():
    with pytest.raises(ValueError, match="2 \\* sigma_count > sigma"):
        split_noise(1.0, 0.5)
    with pytest.raises(ValueError):
        split_noise(1.0, 0.3)
    with pytest.raises(ValueError):
        split_noise(0.0, 3.0)


def test_default_sigma_count():
    assert default_sigma_count(64, 1.0) == pytest.approx(3.2)  # Andrew et al.'s B / 20
    small = default_sigma_count(2, 1.0)                        # B / 20 = 0.1 would make the split impossible
    assert split_noise(1.0, small) == pytest.approx(1.1)


# ------------------------------------------------------------------------------------------ quantile tracking
def _track(target_quantile, steps=400, batch=64, clip=0.2, seed=0):
    data = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    tracker = QuantileClipTracker(clip=clip, sigma_count=batch / 20, expected_batch_size=batch,
                                  target_quantile=target_quantile)
    trajectory = []
    for _ in range(steps):
        norms = torch.exp(torch.randn(batch, generator=data))  # LogNormal(0, 1)
        trajectory.append(tracker.update(norms, noise))
    return tracker, trajectory


@pytest.mark.parametrize("target_quantile", [0.5, 0.9])
def test_tracker_converges_to_target_quantile(target_quantile):
    tracker, trajectory = _track(target_quantile)
    true_quantile = math.exp(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(target_quantile)).item())
    tail = torch.tensor(trajectory[200:]).log().mean().exp().item()  # geometric mean over the last 200 steps
    assert abs(tail / true_quantile - 1) < 0.10, (tail, true_quantile)
    assert tracker.steps == 400 and tracker.last_fraction is not None


def test_tracker_uses_only_the_noisy_count():
    tracker = QuantileClipTracker(clip=1.0, sigma_count=3.2, expected_batch_size=64)
    a = torch.tensor([0.1, 0.5, 0.9, 1.5, 7.0, 30.0])            # 3 of 6 unclipped
    b = torch.tensor([1e3, 0.99, 2.0, 1e-6, 5.0, 1.0])           # other values, same count (3 of 6)
    c = torch.tensor([0.1, 0.5, 0.9, 0.95, 7.0, 30.0])           # 4 of 6
    new = {}
    for name, norms in {"a": a, "b": b, "a_permuted": a[torch.randperm(6)], "c": c}.items():
        t = QuantileClipTracker.from_state_dict(tracker.state_dict())
        new[name] = t.update(norms, torch.Generator().manual_seed(123))
    assert new["a"] == new["b"] == new["a_permuted"]
    assert new["c"] < new["a"]  # more unclipped cases -> C shrinks more
    # the step is exactly the documented formula with the seeded noise
    z = torch.randn((), generator=torch.Generator().manual_seed(123), dtype=torch.float64).item()
    fraction = (3 - 0.5 * 6 + 3.2 * z) / 64 + 0.5
    assert new["a"] == pytest.approx(1.0 * math.exp(-0.2 * (fraction - 0.5)), rel=1e-12)


def test_tracker_validation():
    with pytest.raises(ValueError, match="target_quantile"):
        QuantileClipTracker(clip=1.0, sigma_count=1.0, expected_batch_size=8, target_quantile=1.0)
    for key in ("clip", "sigma_count", "expected_batch_size", "learning_rate"):
        with pytest.raises(ValueError, match=key):
            QuantileClipTracker(**{"clip": 1.0, "sigma_count": 1.0, "expected_batch_size": 8, key: 0.0})


def test_tracker_state_dict_round_trip():
    tracker, _ = _track(0.5, steps=20)
    state = tracker.state_dict()
    restored = QuantileClipTracker.from_state_dict(state)
    assert restored == tracker and restored.state_dict() == state
    norms = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(7)))
    assert restored.update(norms, torch.Generator().manual_seed(9)) == tracker.update(
        norms, torch.Generator().manual_seed(9))
    assert restored.gradient_noise_multiplier(1.0) == split_noise(1.0, tracker.sigma_count)


def test_max_clip_bounds_the_tracked_clip_norm():
    """Norms far above C push C up every step; the public bound stops the runaway that diverged kidney runs."""
    def run(max_clip):
        tracker = QuantileClipTracker(clip=1.0, sigma_count=0.4, expected_batch_size=8, max_clip=max_clip)
        noise = torch.Generator().manual_seed(0)
        return [tracker.update(torch.full((8,), 1e6), noise) for _ in range(200)]
    assert max(run(None)) > 100.0  # unbounded, it follows the exploding norms
    bounded = run(1.5)
    assert max(bounded) == 1.5 and bounded[-1] == 1.5
    with pytest.raises(ValueError, match="max_clip"):
        QuantileClipTracker(clip=1.0, sigma_count=1.0, expected_batch_size=8, max_clip=0.5)


@pytest.mark.parametrize("max_clip", [1.1, 50.0])  # the bound reached / not reached
def test_bounded_tracker_uses_only_the_noisy_count(max_clip):
    """With the bound (the trainer's default), C still depends on the batch only through the noisy count."""
    tracker = QuantileClipTracker(clip=1.0, sigma_count=0.4, expected_batch_size=6, learning_rate=2.0,
                                  max_clip=max_clip)
    batches = [torch.tensor([1.02, 1.05, 1.07, 1.09, 40.0, 1e3]),   # none unclipped: C wants to grow
               torch.tensor([3.0, 1.5, 1.01, 9.0, 2.0, 1.3]),
               torch.tensor([1.3, 1.5, 1.01, 9.0, 2.0, 3.0])]
    new = [QuantileClipTracker.from_state_dict(tracker.state_dict()).update(b, torch.Generator().manual_seed(5))
           for b in batches]
    assert new[0] == new[1] == new[2]
    assert (new[0] == max_clip) == (max_clip == 1.1)


def test_count_noise_warning_when_the_count_is_mostly_noise():
    assert count_noise_warning(0.2, 3.1, 4) is None            # kidney, epsilon 8
    warning = count_noise_warning(0.2, 18.6, 4)                # kidney, epsilon 1
    assert warning and "18.6" in warning and "adpfl_clip_lr" in warning
    assert count_noise_warning(noise_aware_clip_lr(18.6, 4), 18.6, 4) is None


def test_noise_aware_clip_lr():
    assert noise_aware_clip_lr(3.1, 4) == 0.2                   # little count noise: Andrew et al.'s rate
    assert noise_aware_clip_lr(18.6, 4) == pytest.approx(2 * 0.3 ** 2 / (18.6 / 4) ** 2)
    assert clip_wander(noise_aware_clip_lr(18.6, 4), 18.6, 4) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        noise_aware_clip_lr(0.0, 4)


def _log_clip_spread(learning_rate, sigma_count=18.6, batch=4, steps=20000):
    """Std of log C over the second half of a run on norms LogNormal(log 0.04, 0.36) (the kidney public cohort's
    spread), started at the true median."""
    tracker = QuantileClipTracker(clip=0.04, sigma_count=sigma_count, expected_batch_size=batch,
                                  learning_rate=learning_rate)
    data, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    logs = [math.log(tracker.update(0.04 * torch.exp(0.36 * torch.randn(batch, generator=data)), noise))
            for _ in range(steps)]
    return torch.tensor(logs[steps // 2:]).std().item(), torch.tensor(logs[steps // 2:]).mean().item()


def test_noise_aware_rate_keeps_the_clip_near_the_quantile_where_the_fixed_rate_wanders():
    """Epsilon 1 on the kidney (count noise std 18.6, expected batch 4): at rate 0.2 C wanders by factors > 3 in
    a simulation as in the runs; the noise-aware rate keeps it near the median, as clip_wander predicts."""
    fixed_spread, _ = _log_clip_spread(0.2)
    auto_spread, auto_mean = _log_clip_spread(noise_aware_clip_lr(18.6, 4))
    assert fixed_spread > 1.0
    assert auto_spread < 0.45 and abs(auto_mean - math.log(0.04)) < 0.15
