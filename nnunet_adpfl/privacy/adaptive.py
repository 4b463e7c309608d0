"""ADP-FL's adaptive mechanisms (DESIGN.md section 3): a dynamic noise schedule and adaptive clipping.

Dynamic noise
-------------
A :class:`NoiseSchedule` gives relative noise multipliers per round (first round = 1.0). It is fixed before
training and depends on nothing but public settings; :func:`calibrate_schedule` picks the scale s so that the
per-round multipliers ``sigma_r = s * shape[r]`` (``steps_per_round`` Poisson-sampled Gaussian steps each)
spend between ``(1 - tolerance) * target`` and ``target`` epsilon under :class:`~.accounting.PrivacyAccountant`
(steps with different sigma compose). The noise scale never depends on the data.

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping")
----------------------------------------------------------------------------------------------
The clip norm C tracks the ``target_quantile`` gamma of the per-case gradient norms n_i. Each step releases,
besides the noisy gradient sum, one noisy count and updates C geometrically:

    b = ( sum_i (1[n_i <= C] - 1/2) + N(0, sigma_b^2) ) / B_expected + 1/2
    C <- C * exp(-eta * (b - gamma))

'Unclipped' means n_i <= C whatever the clipping rule (the rule itself is then applied with the current C).

*Why the count is centred.* Under add/remove-one-case adjacency, the plain count sum_i 1[n_i <= C] has
sensitivity 1, but the centred sum sum_i (1[n_i <= C] - 1/2) has sensitivity 1/2: a case adds +1/2 or -1/2.
Under Poisson sampling the realised batch size m is private, so it cannot be subtracted afterwards; it is
subtracted *inside* the noised sum, and b is then formed with the public B_expected = q * N. Since
E[m] = B_expected, E[b] = E[count] / B_expected as for the uncentred estimate; b is just a little noisier
(the Poisson spread of m adds variance 1 / (4 B_expected)).

*Why one Gaussian mechanism with multiplier sigma is accounted per step* (Andrew et al., Theorem 1).
Per step a case i contributes the pair (s_i g_i, 1[n_i <= C] - 1/2) with ||s_i g_i|| <= C and |.| = 1/2, and
the step releases (sum + N(0, (sigma_grad C)^2 I), centred count + N(0, sigma_b^2)). Dividing the first part
by sigma_grad C and the second by sigma_b turns this into one release of a vector sum with unit Gaussian
noise N(0, I) in which every case's contribution has norm at most
sqrt(sigma_grad^-2 + (2 sigma_b)^-2) = 1 / sigma, i.e. a Gaussian mechanism with noise multiplier sigma on a
sensitivity-1 query. Poisson sampling acts on the pair (a case is in both sums or in neither), so the pair is
exactly one Poisson-sampled Gaussian step with multiplier sigma, and the accountant composes
(sigma, q, 1) per step as it does without adaptive clipping. C at step t depends only on earlier noisy
releases (post-processing), so adaptive composition covers it. The price: the gradient noise multiplier is
:func:`split_noise` ``(sigma, sigma_b) > sigma``; this requires 2 sigma_b > sigma. With a noise schedule the
split is done per round with that round's sigma.

The per-case norms never leave :meth:`QuantileClipTracker.update`; only the noisy fraction b (a private
release) is kept, and may be logged.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .accounting import MECHANISMS, PrivacyAccountant

SCHEDULES = ("constant", "linear", "exponential", "step")

# Search range of the schedule scale s (the first round's noise multiplier).
_SCALE_MIN = 1e-2
_SCALE_MAX = 1e4
_MAX_EVALUATIONS = 100


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# --------------------------------------------------------------------------------------------------------------
# Dynamic noise schedule
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseSchedule:
    """Relative noise multipliers over rounds.

    - ``constant``: 1 every round;
    - ``linear``: from 1 to ``end_ratio`` linearly in the round index;
    - ``exponential``: from 1 to ``end_ratio`` geometrically (``end_ratio ** (r / (rounds - 1))``);
    - ``step``: ``step_factor ** (r // step_every)``.
    """
    kind: str
    end_ratio: float = 0.5      # sigma at the last round / sigma at the first round (linear, exponential)
    step_every: int = 1         # step: multiply by step_factor every step_every rounds
    step_factor: float = 0.8

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.kind!r}; use one of {SCHEDULES}")
        if not _finite_positive(self.end_ratio):
            raise ValueError(f"end_ratio must be a finite number > 0, got {self.end_ratio!r}")
        if not _is_int(self.step_every) or self.step_every < 1:
            raise ValueError(f"step_every must be an integer >= 1, got {self.step_every!r}")
        if not _finite_positive(self.step_factor):
            raise ValueError(f"step_factor must be a finite number > 0, got {self.step_factor!r}")

    def shape(self, rounds: int) -> list[float]:
        """Relative multipliers for rounds 0 .. rounds - 1; the first is 1.0."""
        if not _is_int(rounds) or rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
        last = max(rounds - 1, 1)
        if self.kind == "constant":
            return [1.0] * rounds
        if self.kind == "linear":
            return [1.0 + (self.end_ratio - 1.0) * r / last for r in range(rounds)]
        if self.kind == "exponential":
            return [float(self.end_ratio ** (r / last)) for r in range(rounds)]
        return [float(self.step_factor ** (r // self.step_every)) for r in range(rounds)]

    def describe(self) -> dict:
        return asdict(self)


def schedule_epsilon(noise_multipliers: list[float], delta: float, sample_rate: float, steps_per_round: int,
                     mechanism: str = "rdp") -> float:
    """epsilon at ``delta`` of ``steps_per_round`` Poisson-sampled Gaussian steps per round with the given
    per-round noise multipliers (rounds with equal sigma are merged: composition does not depend on order)."""
    counts = Counter(float(s) for s in noise_multipliers)
    segments = [(sigma, sample_rate, steps_per_round * n) for sigma, n in sorted(counts.items())]
    return PrivacyAccountant(mechanism, delta).epsilon(extra=segments)


def _solve_scale(epsilon_of, target: float, tolerance: float, start: float) -> float:
    """Scale s with ``(1 - tolerance) * target <= epsilon_of(s) <= target``, epsilon_of decreasing in s.

    Bracketing search in log s: log-log secant steps (epsilon is close to a power of s), safeguarded by
    bisection whenever two consecutive points land on the same side of the band."""
    low_band = (1.0 - tolerance) * target
    log_mid = 0.5 * (math.log(low_band) + math.log(target))
    x_min, x_max = math.log(_SCALE_MIN), math.log(_SCALE_MAX)
    too_small = too_large = None          # (log s, g): eps above target / below the band
    previous = None                       # last (log s, g)
    last_side = None
    x = min(max(math.log(start), x_min), x_max)
    for _ in range(_MAX_EVALUATIONS):
        eps = epsilon_of(math.exp(x))
        if low_band <= eps <= target:
            return math.exp(x)
        g = math.log(eps) - log_mid if eps > 0 else -math.inf
        side = "small" if eps > target else "large"
        if side == "small":
            if x >= x_max:
                raise ValueError(f"target epsilon {target} is out of reach: even a noise multiplier scale of "
                                 f"{_SCALE_MAX:g} spends epsilon {eps:.4g}")
            too_small = (x, g)
        else:
            if x <= x_min:
                raise ValueError(f"target epsilon {target} is too large to be met: even a noise multiplier scale "
                                 f"of {_SCALE_MIN:g} spends only epsilon {eps:.4g}")
            too_large = (x, g)

        if too_small is not None and too_large is not None:
            (xa, ga), (xb, gb) = too_small, too_large
            if side == last_side or not (math.isfinite(ga) and math.isfinite(gb)):
                x_next = 0.5 * (xa + xb)
            else:
                x_next = xa - ga * (xb - xa) / (gb - ga)
                margin = 0.05 * (xb - xa)
                x_next = min(max(x_next, xa + margin), xb - margin)
        else:
            slope = -1.0                  # eps ~ 1 / s for moderate noise
            if previous is not None and math.isfinite(g) and math.isfinite(previous[1]) and x != previous[0]:
                measured = (g - previous[1]) / (x - previous[0])
                if measured < 0:
                    slope = min(max(measured, -8.0), -0.25)
            step = -g / slope if math.isfinite(g) else (math.log(8.0) if g > 0 else -math.log(8.0))
            x_next = min(max(x + min(max(step, -math.log(8.0)), math.log(8.0)), x_min), x_max)
        previous, last_side, x = (x, g), side, x_next
    raise RuntimeError(f"noise calibration did not converge in {_MAX_EVALUATIONS} accountant evaluations")


def calibrate_schedule(schedule: NoiseSchedule, target_epsilon: float, delta: float, sample_rate: float,
                       steps_per_round: int, rounds: int, mechanism: str = "rdp",
                       tolerance: float = 0.01) -> list[float]:
    """Per-round noise multipliers sigma_r = s * shape[r] with the scale s chosen (bracketing search on s) so
    that the whole run (rounds x steps_per_round Poisson-sampled Gaussian steps, unequal sigmas composed by
    the accountant) spends epsilon in [ (1 - tolerance) * target, target ]. Raises ValueError for impossible
    inputs."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not _finite_positive(target_epsilon):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not _is_int(steps_per_round) or steps_per_round < 1:
        raise ValueError(f"steps_per_round must be an integer >= 1, got {steps_per_round!r}")
    if not _is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown accountant {mechanism!r}; use one of {MECHANISMS}")
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")

    shape = schedule.shape(rounds)

    def epsilon_of(s: float) -> float:
        return schedule_epsilon([s * m for m in shape], delta, sample_rate, steps_per_round, mechanism)

    # Starting point: the constant multiplier for the same budget (one accountant segment: cheap), mapped to
    # the schedule by RDP's ~ sigma^-2 scaling: sum_r shape_r^-2 / s^2 = rounds / sigma_const^2.
    total_steps = rounds * steps_per_round
    sigma_const = _solve_scale(lambda s: schedule_epsilon([s], delta, sample_rate, total_steps, mechanism),
                               target_epsilon, tolerance, 1.0)
    if len(set(shape)) == 1:
        scale = sigma_const / shape[0]
    else:
        scale = _solve_scale(epsilon_of, target_epsilon, tolerance,
                             sigma_const * math.sqrt(sum(m ** -2 for m in shape) / rounds))
    return [scale * m for m in shape]


# --------------------------------------------------------------------------------------------------------------
# Adaptive clipping
# --------------------------------------------------------------------------------------------------------------
def split_noise(sigma: float, sigma_count: float) -> float:
    """Gradient noise multiplier so that (gradient sum, centred unclipped count) together equal one Gaussian
    mechanism with noise multiplier sigma: sigma_grad = (sigma^-2 - (2 sigma_count)^-2)^(-1/2).
    Requires 2 * sigma_count > sigma."""
    if not _finite_positive(sigma):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {sigma!r}")
    if not _finite_positive(sigma_count):
        raise ValueError(f"count noise multiplier must be a finite number > 0, got {sigma_count!r}")
    if 2.0 * sigma_count <= sigma:
        raise ValueError(f"adaptive clipping needs 2 * sigma_count > sigma (got sigma_count={sigma_count}, "
                         f"sigma={sigma}): the count alone would spend the whole budget")
    return float((sigma ** -2 - (2.0 * sigma_count) ** -2) ** -0.5)


def default_sigma_count(expected_batch_size: float, noise_multiplier: float, max_inflation: float = 1.1) -> float:
    """Count noise multiplier: Andrew et al.'s expected_batch_size / 20, raised where needed so that the gradient
    noise multiplier is at most ``max_inflation`` times the overall one (small nnU-Net batches need this:
    B / 20 is then below sigma / 2 and the split would be impossible)."""
    if not _finite_positive(expected_batch_size) or not _finite_positive(noise_multiplier):
        raise ValueError("expected_batch_size and noise_multiplier must be finite numbers > 0")
    if not (_finite_positive(max_inflation) and max_inflation > 1):
        raise ValueError(f"max_inflation must be > 1, got {max_inflation!r}")
    floor = noise_multiplier / (2.0 * math.sqrt(1.0 - max_inflation ** -2))
    return float(max(expected_batch_size / 20.0, floor))


def clip_wander(learning_rate: float, sigma_count: float, expected_batch_size: float) -> float:
    """Standard deviation of log C that the count noise alone keeps up at equilibrium.

    Near the target quantile the noisy fraction is b = gamma + f (log C - log C*) + s xi with s = sigma_count / B
    (the noise of b) and f the density of the log-norms there (about 1: on the kidney's public cohort the
    log-norms' interquartile range is 0.49, f = 1.1). The update log C <- log C - eta (b - gamma) is then an AR(1)
    process with stationary variance eta s^2 / (f (2 - eta f)) ~ eta s^2 / 2 for f = 1."""
    s = sigma_count / expected_batch_size
    return float(math.sqrt(learning_rate / 2.0) * s)


def noise_aware_clip_lr(sigma_count: float, expected_batch_size: float, max_lr: float = 0.2,
                        log_clip_std: float = 0.3) -> float:
    """Learning rate of the geometric clip update: ``max_lr`` (Andrew et al.'s 0.2) unless the count noise would
    make C wander by more than ``log_clip_std`` in log (a factor e^0.3 = 1.35), then the rate with
    :func:`clip_wander` = ``log_clip_std``: 2 log_clip_std^2 B^2 / sigma_count^2 (simulated: 0.34, the estimate
    ignores the count's saturation far from the quantile). A function of public settings only. Kidney, expected
    batch 4: 0.2 at epsilon 8 (count noise std 3.1), 0.1 at epsilon 4 (5.44), 0.008 at epsilon 1 (18.6), where 0.2
    sent C to 0 and to its bound within a run. The price of a low rate: C moves slowly (at most eta / 2 in log per
    step)."""
    if not all(_finite_positive(x) for x in (sigma_count, expected_batch_size, max_lr, log_clip_std)):
        raise ValueError("sigma_count, expected_batch_size, max_lr and log_clip_std must be finite numbers > 0")
    s = sigma_count / expected_batch_size
    return float(min(max_lr, 2.0 * log_clip_std ** 2 / s ** 2))


def count_noise_warning(learning_rate: float, sigma_count: float, expected_batch_size: float) -> str | None:
    """A warning when count noise alone makes the clip norm wander by more than a factor e^0.5 = 1.65 (kidney,
    expected batch 4, epsilon 1, learning rate 0.2: count noise std 18.6, C fell to 0 and rose to its bound)."""
    wander = clip_wander(learning_rate, sigma_count, expected_batch_size)
    if wander <= 0.5:
        return None
    return (f"adaptive clipping: the unclipped-case count has noise std {sigma_count:.3g} for an expected batch of "
            f"{expected_batch_size:g} cases; with adpfl_clip_lr {learning_rate:g} the clip norm wanders by a factor "
            f"of about {math.exp(wander):.3g} from noise alone; leave adpfl_clip_lr unset (null: lowered to fit the "
            "noise), use a larger expected_batch_size or a higher epsilon, or adpfl_adaptive_clip false with "
            "max_grad_norm measured on public data (nnUNetTrainerDPClipCalibration)")


@dataclass
class QuantileClipTracker:
    """Private geometric tracking of the ``target_quantile`` of per-case gradient norms (Andrew et al. 2021).

    Use per step: clip with ``tracker.clip``, add gradient noise with multiplier
    ``tracker.gradient_noise_multiplier(sigma)`` (std ``sigma_grad * C``), then ``tracker.update(norms, gen)``
    with this step's per-case norms; account (sigma, q, 1) for the step."""
    clip: float                  # current C (initial value from settings)
    sigma_count: float           # noise multiplier of the centred count (e.g. expected_batch_size / 20)
    expected_batch_size: float   # B_expected = q * N (public)
    target_quantile: float = 0.5
    learning_rate: float = 0.2   # eta
    steps: int = 0               # updates done
    last_fraction: float | None = None   # last noisy unclipped fraction b (a private release; may be logged)
    max_clip: float | None = None  # public upper bound of C: without it, exploding gradients raise C, so the
    # noise (std sigma * C), so the weights, in a loop (seen: C 1 -> 1e8 and a diverged model in 300 steps)

    def __post_init__(self):
        for name in ("clip", "sigma_count", "expected_batch_size", "learning_rate"):
            if not _finite_positive(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.target_quantile, (int, float)) and 0 < self.target_quantile < 1):
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if self.max_clip is not None and not (_finite_positive(self.max_clip) and self.max_clip >= self.clip):
            raise ValueError(f"max_clip must be a finite number >= clip, got {self.max_clip!r}")
        if not _is_int(self.steps) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")

    def gradient_noise_multiplier(self, sigma: float) -> float:
        """Noise multiplier for the gradient sum when the step as a whole must have multiplier ``sigma``."""
        return split_noise(sigma, self.sigma_count)

    def update(self, norms: torch.Tensor, generator: torch.Generator) -> float:
        """One private update from this step's per-case norms; returns the new C. The norms never leave;
        only the noisy centred count is used."""
        norms = norms.detach().reshape(-1)
        centred = (norms <= self.clip).sum().double() - 0.5 * norms.numel()
        noise = torch.randn((), generator=generator, device=generator.device, dtype=torch.float64)
        noisy = float(centred.cpu() + self.sigma_count * noise.cpu())
        fraction = noisy / self.expected_batch_size + 0.5
        self.clip = float(self.clip * math.exp(-self.learning_rate * (fraction - self.target_quantile)))
        if self.max_clip is not None:  # post-processing of the noisy release with a public constant
            self.clip = min(self.clip, self.max_clip)
        self.last_fraction = fraction
        self.steps += 1
        return self.clip

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "QuantileClipTracker":
        return cls(**state)
