"""DP-aware defaults (setting ``dp_defaults``): what the settings file leaves out of the expected batch B, the
steps, ``dp_trainable``, momentum and the fine-tuning learning rate, chosen from N (the fold's training cases),
epsilon, delta, the trainable parameter counts and a compute budget. ``nnunet-adpfl recipe`` prints the same rule.

With Poisson rate q = B/N, T steps and noise multiplier sigma (calibrated to epsilon), each step adds Gaussian noise
of std sigma*C/B per trainable coordinate to a mean clipped gradient of norm <= C. Over d coordinates the noise norm
is sigma*C*sqrt(d)/B, so one step's signal-to-noise ratio is at most B/(sigma*sqrt(d)); averaging T steps gains
about sqrt(T). Once sigma is above about 2 this bound over the run hardly depends on T and B (sigma grows like
q*sqrt(T)/epsilon: the bound tends to about N*epsilon/sqrt(d)), so it cannot choose the length of the run. The rule:
the best bound; within 10% of it, from scratch and if the bound reaches 1, the run spends the compute budget (nnU-Net's
per-case passes for the plan: nnU-Net's learning rate moves the weights a distance that grows with the steps, and
200 steps did not train the kidney from scratch even without noise, docs/FINETUNE.md) with the largest batch: the
least noise per step (sigma*C/B; more steps at a smaller batch keep the bound but add noise to the weights at every
step: 250,000 steps at B = 2 and N = 450 are within 10% of the best bound with noise 0.79 per coordinate per step).
The steps that spend the budget at a batch are a multiple of STEP_QUANTUM. Otherwise the cheapest run:
below 1 the run learns little whatever its length; fine-tuning public weights starts near a good model, where more
steps add noise faster than signal (docs/FINETUNE.md's fine-tuning runs: a few hundred steps). Fine-tuning trains
norm_bias, or the largest of all and decoder whose bound over the run reaches finetune_min_bound(set, N, dims, K), K
the updates a round averages (unless max_grad_norm is given: a clip norm measured on public data belongs to the set it
was measured for).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..common.config import SettingsError

# torch, Opacus and nnU-Net are imported where used: ``nnunet-adpfl recipe --help`` (which imports this module)
# stays quick (tests/test_cli_imports.py).

# docs/FINETUNE.md's kidney fine-tuning (from public weights, C from the public cohort): 3e-2, the
# non-private learning rate, beat 3e-3 (and lower ones) at C = 1. Tried on one task, not a tuned optimum.
FINETUNE_LR = 3e-2
# below epsilon 4: kidney_roi at epsilon 1 (3 seeds each) kept tumour and cyst near the public model at 1e-2
# (DP-FL 0.568, ADP-FL 0.577 mean Dice) and lost them at 3e-2 (0.465, 0.450, 2 seeds); at epsilon 4 3e-2 kept them.
LOW_EPSILON, LOW_EPSILON_FINETUNE_LR = 4.0, 1e-2
MOMENTUM = 0.9
FINETUNE_TRAINABLE = ("norm_bias", "decoder")  # preferred dp_trainable when fine-tuning, first available
# Fine-tuning: the largest of FINETUNE_LARGER whose bound over the run reaches finetune_min_bound(set, N, dims, K) is
# trained instead. Measured at epsilon 8 and 5, B = 8, 50 steps, 3-site federations (docs/experiments/FINETUNE.md;
# per cohort in docs/EPSILON.md): 2D at 23 and 36-60 cases per site, all at 0.08-0.14 no better than norm_bias (or
# below the public model), at 124-201 all and decoder beat it; 3D from 82 cases all at 0.09-0.14, at 41-67 all at
# 0.08-0.11 and decoder, at 20-33 decoder at 0.065-0.095 (not all at 0.049-0.071) beat it. So the bound alone
# separates neither the 2D failures from the 3D successes nor all from decoder: per dimensions and set, (N from
# which, bound); 0.15 below that N.
FINETUNE_LARGER = ("all", "decoder")
FINETUNE_MIN_BOUND = 0.15
FINETUNE_COHORT_BOUNDS = {2: {"all": (80, 0.09), "decoder": (80, 0.09)},  # 2D: from the 3D runs at 82+
                          3: {"all": (40, 0.09), "decoder": (20, 0.065)}}  # 3D: measured down to 41 and 20
# Thresholds of 3-site federations (their global model averages 3 updates' noise); K < 3 per round: x sqrt(3/K) (one
# site, 3D at 26 and 44 cases: no set above norm_bias beyond the spread, all the lowest). More than 3 keep 3's.
FINETUNE_MEASURED_SITES = 3
NNUNET_STEPS = 1000 * 250  # nnU-Net's epochs x iterations per epoch
ITERATIONS_PER_EPOCH = 250  # nnU-Net's; the step grid's counts are multiples of it
STEP_QUANTUM = 50  # the steps that spend the budget (single site) are multiples of it
STEP_GRID = (250, 1000, 4000, 16000, 64000, NNUNET_STEPS)  # coarse: each calibration costs about a second
RULED = ("expected_batch_size", "num_epochs", "num_iterations_per_epoch", "dp_trainable", "momentum", "initial_lr")
BOUND = "best signal-to-noise bound over the run B*sqrt(T)/(sigma*sqrt(d))"
RULE = f"{BOUND}; within 10% of it, the budget spent (at least half the most per-case passes T*B) with the largest B"
RULE_SHORT = {"unlearnable": f"{BOUND} is below 1 (the run learns little whatever its length): the fewest per-case "
                             "passes T*B within 10% of it",
              "fine-tuning": f"{BOUND}; fine-tuning public weights: the fewest per-case passes T*B within 10% of it"}
SPENDING_BATCHES = 3  # the largest powers of two <= N/2 tried with the steps that spend the budget


CALIBRATION_CACHE = "dp_noise_calibrations.json"  # in the run's output folder: the rule's sigmas for a restart
_calibrations: dict[tuple, float] = {}  # (epsilon, delta, sample rate, steps, accountant) -> sigma, this process


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Opacus' noise calibration (a second or more each), cached: the rule and the trainer calibrate the same (q, T)
    once; load_calibrations adds those of an earlier start of the run."""
    key = (float(epsilon), float(delta), float(sample_rate), int(steps), accountant)
    if key not in _calibrations:
        from ..privacy.accounting import calibrate_noise_multiplier
        _calibrations[key] = calibrate_noise_multiplier(*key)
    return _calibrations[key]


def spends_as_calibrated(key: tuple, sigma: float) -> bool:
    """Whether the accountant confirms that ``sigma`` spends between 99% and 100% of the key's epsilon (Opacus'
    calibration tolerance), the check a cached sigma must pass (one accountant evaluation, not a search)."""
    from ..privacy.accounting import PrivacyAccountant
    epsilon, delta, sample_rate, steps, accountant = key
    if not (math.isfinite(sigma) and sigma > 0 and 0 < sample_rate <= 1 and steps >= 1 and 0 < delta < 1):
        return False
    spent = PrivacyAccountant(accountant, delta).epsilon([(sigma, sample_rate, steps)])
    return 0.99 * epsilon * (1 - 1e-9) <= spent <= epsilon


def load_calibrations(folder: str | os.PathLike) -> int:
    """Adds the calibrations of ``folder``/CALIBRATION_CACHE that pass spends_as_calibrated to this process's cache;
    returns how many. A damaged or edited file costs time (recalibration), never privacy."""
    try:
        entries = json.loads((Path(folder) / CALIBRATION_CACHE).read_text())["calibrations"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    loaded = 0
    for entry in entries if isinstance(entries, list) else []:
        try:
            key = (float(entry["epsilon"]), float(entry["delta"]), float(entry["sample_rate"]), int(entry["steps"]),
                   str(entry["accountant"]))
            sigma = float(entry["sigma"])
        except (KeyError, TypeError, ValueError):
            continue
        if key[4] in ("rdp", "prv") and key not in _calibrations and spends_as_calibrated(key, sigma):
            _calibrations[key] = sigma
            loaded += 1
    return loaded


def save_calibrations(folder: str | os.PathLike) -> None:
    """This process's calibrations -> ``folder``/CALIBRATION_CACHE (atomically)."""
    from ..common.atomic import write_json_atomic
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(Path(folder) / CALIBRATION_CACHE, {
        "note": "noise multipliers of dp_defaults' search; each is checked with the accountant before reuse",
        "calibrations": [{"epsilon": e, "delta": d, "sample_rate": q, "steps": t, "accountant": a, "sigma": sigma}
                         for (e, d, q, t, a), sigma in sorted(_calibrations.items())]})


@dataclass(frozen=True)
class Candidate:
    steps: int
    batch: int
    sample_rate: float
    sigma: float

    @property
    def num_cases(self) -> int:
        """N, the training cases the sampling rate B/N was computed for."""
        return round(self.batch / self.sample_rate)

    def noise_std(self, clip: float) -> float:
        """Noise std per trainable coordinate of the averaged step."""
        return self.sigma * clip / self.batch

    def snr(self, parameters: int) -> float:
        """Upper bound on one step's ||signal|| / ||noise|| over ``parameters`` coordinates."""
        return math.inf if self.sigma == 0 else self.batch / (self.sigma * math.sqrt(parameters))

    def snr_over_run(self, parameters: int) -> float:
        return self.snr(parameters) * math.sqrt(self.steps)


def check_inputs(num_cases: int, epsilon: float, delta: float) -> None:
    if num_cases < 2:
        raise ValueError(f"need at least 2 training cases, got {num_cases}")
    if not 0 < delta < 1 / num_cases:
        raise ValueError(f"delta must be in (0, 1/N) = (0, {1 / num_cases:.3g}), got {delta}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")


def candidates(num_cases: int, epsilon: float, delta: float, steps: list[int], batches: list[int],
               accountant: str = "rdp") -> list[Candidate]:
    """Every (T, B) of the grid with 1 <= B <= N/2, calibrated."""
    return calibrated(num_cases, epsilon, delta, [(t, b) for t in steps for b in batches], accountant)


def calibrated(num_cases: int, epsilon: float, delta: float, pairs: list[tuple[int, int]],
               accountant: str = "rdp", max_batch: int | None = None) -> list[Candidate]:
    """max_batch: N/2 unless given (a sampling rate above 1/2 leaves little amplification; a user's B may)."""
    check_inputs(num_cases, epsilon, delta)
    limit = num_cases // 2 if max_batch is None else max_batch
    out = [Candidate(t, b, b / num_cases, calibrate(epsilon, delta, b / num_cases, t, accountant))
           for t, b in pairs if 1 <= b <= limit]
    if not out:
        raise ValueError(f"no expected batch size in {sorted({b for _, b in pairs})} is between 1 and {limit}")
    return out


def trainable_choice(counts: dict[str, int], pretrained: bool) -> str:
    """All parameters from scratch; when fine-tuning public weights the first of FINETUNE_TRAINABLE the network
    has (finetune_trainable trains a larger set where the cohort's bound allows). norm_bias comes first: with C from
    the public cohort it improved on the public model at epsilon 8 and 4 on every task measured at about 20 cases
    per site, small lesions included (docs/FINETUNE.md, kidney_roi; at epsilon 1 it kept them near the
    public model only with the lower learning rate), where the decoder at the same learning rate fell below the
    public model's tumour and cyst Dice; the decoder kept more only for large structures (kidney 0.785 vs 0.740)."""
    return next((c for c in FINETUNE_TRAINABLE if c in counts), "all") if pretrained else "all"


def cohort_bounds(spatial_dims: int) -> dict[str, tuple[int, float]]:
    """{set: (N from which, bound)} for a configuration's spatial dimensions; 2D's (the more conservative) for
    other dimensions."""
    return FINETUNE_COHORT_BOUNDS.get(spatial_dims, FINETUNE_COHORT_BOUNDS[2])


def site_scale(sites: int) -> float:
    """Factor on the thresholds for a global model that averages ``sites`` updates per round (1: a single site)."""
    return math.sqrt(FINETUNE_MEASURED_SITES / min(sites, FINETUNE_MEASURED_SITES))


def finetune_min_bound(trainable: str, num_cases: int, spatial_dims: int, sites: int) -> float:
    """The bound over the run ``trainable`` needs when fine-tuning at a site with ``num_cases`` training cases, a
    configuration of ``spatial_dims`` (2 or 3) spatial dimensions and ``sites`` updates averaged per round."""
    from_cases, bound = cohort_bounds(spatial_dims).get(trainable, (0, FINETUNE_MIN_BOUND))
    return (bound if num_cases >= from_cases else FINETUNE_MIN_BOUND) * site_scale(sites)


def finetune_trainable(counts: dict[str, int], best: Candidate, spatial_dims: int, sites: int) -> tuple[str, str]:
    """(dp_trainable, why) when fine-tuning with dp_trainable and max_grad_norm left out: the largest set of
    FINETUNE_LARGER whose bound over the run at ``best`` reaches its finetune_min_bound(set, N, dims, sites), else
    trainable_choice's."""
    cases, scale = best.num_cases, site_scale(sites)
    bounds = {c: best.snr_over_run(counts[c]) for c in FINETUNE_LARGER if c in counts}
    choice = next((c for c, b in bounds.items() if b >= finetune_min_bound(c, cases, spatial_dims, sites)),
                  trainable_choice(counts, True))
    listed = ", ".join(f"{c} {b:.2g}" for c, b in bounds.items())
    rule = ", ".join(f"{c} {b * scale:.2g} from {n} cases" for c, (n, b) in cohort_bounds(spatial_dims).items())
    averaged = "a single site" if sites == 1 else f"{sites} sites averaged per round"
    reason = "the largest set whose bound over the run reaches its threshold" if choice in bounds else \
        "no larger set's bound over the run reaches its threshold"
    return choice, (f"{choice}: {reason} when fine-tuning at N={cases} in {spatial_dims}D, {averaged} ({rule}, else "
                    f"{FINETUNE_MIN_BOUND * scale:.2g}; {listed})")


def spends_budget(top_bound: float, pretrained: bool) -> bool:
    """Whether the rule spends the compute budget: from scratch, when the run can learn (bound >= 1)."""
    return top_bound >= 1 and not pretrained


def best_candidate(cands: list[Candidate], parameters: int, pretrained: bool = False) -> Candidate:
    """The best signal-to-noise bound over the run; within 10% of it, when spends_budget: the candidates that spend
    at least half the most per-case passes, and of those the largest batch (then the most steps); otherwise the
    fewest per-case passes (then steps)."""
    top = best_bound(cands, parameters)
    near = [c for c in cands if c.snr_over_run(parameters) >= 0.9 * top]
    if not spends_budget(top, pretrained):
        return min(near, key=lambda c: (c.steps * c.batch, c.steps))
    most = max(c.steps * c.batch for c in near)
    return max((c for c in near if 2 * c.steps * c.batch >= most), key=lambda c: (c.batch, c.steps))


def rule_text(top_bound: float, pretrained: bool) -> str:
    if spends_budget(top_bound, pretrained):
        return RULE
    return RULE_SHORT["fine-tuning" if pretrained else "unlearnable"]


def best_bound(cands: list[Candidate], parameters: int) -> float:
    return max(c.snr_over_run(parameters) for c in cands)


def suggest(cands: list[Candidate], counts: dict[str, int], pretrained: bool, max_batch: int,
            epsilon: float, clip_given: bool = False, spatial_dims: int = 2, sites: int = 1) -> tuple[Candidate, dict]:
    """Settings of the best candidate among batches <= max_batch (memory), as a settings file; dp_trainable as
    choose() picks it."""
    choice = trainable_choice(counts, pretrained)
    fitting = [c for c in cands if c.batch <= max_batch] or [min(cands, key=lambda c: c.batch)]
    best = best_candidate(fitting, counts[choice], pretrained)
    if pretrained and not clip_given:
        choice = finetune_trainable(counts, best, spatial_dims, sites)[0]
    epochs, iterations = split_steps(best.steps)
    settings = {"target_epsilon": epsilon, "expected_batch_size": best.batch, "num_epochs": epochs,
                "num_iterations_per_epoch": iterations, "dp_trainable": choice, "momentum": MOMENTUM,
                **({"initial_lr": finetune_lr(epsilon)} if pretrained else {})}
    return best, settings


def split_steps(steps: int) -> tuple[int, int]:
    """(epochs, iterations per epoch): the fewest epochs of at most nnU-Net's 250 iterations that divide T."""
    epochs = next(e for e in range(math.ceil(steps / ITERATIONS_PER_EPOCH), steps + 1) if steps % e == 0)
    return epochs, steps // epochs


def finetune_lr(epsilon: float) -> float:
    return LOW_EPSILON_FINETUNE_LR if epsilon < LOW_EPSILON else FINETUNE_LR


def unset_batch(plan_batch: int, num_cases: int) -> int:
    """The plan's batch where the settings leave expected_batch_size out, at most N/2 (an input, never an error)."""
    return max(1, min(plan_batch, num_cases // 2))


def powers_of_two(limit: int) -> list[int]:
    return [2 ** k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def spending_steps(batch: int, budget: int, unit: int = STEP_QUANTUM) -> int:
    """Steps that spend at most ``budget`` per-case passes at ``batch``: a multiple of ``unit`` (STEP_QUANTUM; in a
    federation rounds x epochs per round), at most nnU-Net's run (0 when not even one unit fits)."""
    return min(NNUNET_STEPS // unit * unit, budget // batch // unit * unit)


def step_grid(unit: int) -> list[int]:
    """STEP_GRID in multiples of ``unit`` (each entry rounded, at least one unit)."""
    return sorted({max(1, round(t / unit)) * unit for t in STEP_GRID})


def search_pairs(num_cases: int, budget: int, steps: int | None = None, batch: int | None = None,
                 unit: int = ITERATIONS_PER_EPOCH) -> list[tuple[int, int]]:
    """The (T, B) the rule calibrates, T*B <= budget (per-case passes), T a multiple of ``unit``: B powers of two up
    to N/2 for a fixed T; the step grid for a fixed B; otherwise per T of the grid the largest such B and a quarter
    of it (for a fixed T a larger B never lowers the bound; the quarter finds a cheaper point within 10%), and the
    largest SPENDING_BATCHES such B with the steps that spend the budget. At most 15 calibrations."""
    grid = step_grid(unit)
    if steps is not None and batch is not None:
        return [(steps, batch)]
    if steps is not None:
        return [(steps, b) for b in powers_of_two(min(num_cases // 2, budget // steps))] or [(steps, 1)]
    if batch is not None:
        return [(t, batch) for t in grid if t * batch <= budget] or [(grid[0], batch)]
    pairs = set()
    for t in grid:
        fits = powers_of_two(min(num_cases // 2, budget // t))
        pairs |= {(t, b) for b in {fits[-1], max(1, fits[-1] // 4)}} if fits else set()
    for b in powers_of_two(num_cases // 2)[-SPENDING_BATCHES:]:
        t = spending_steps(b, budget, unit if unit != ITERATIONS_PER_EPOCH else STEP_QUANTUM)
        if t:
            pairs.add((t, b))
    return sorted(pairs) or [(grid[0], 1)]


@dataclass(frozen=True)
class Inputs:
    """What the rule decides from: nothing here comes from private data beyond the number of cases N."""
    num_cases: int
    epsilon: float
    delta: float
    counts: dict
    pretrained: bool
    plan_batch: int
    budget: int | None = None  # per-case passes; None = nnU-Net's standard run for this plan
    accountant: str = "rdp"
    epochs: int | None = None  # federated: rounds x epochs per round (federation.json); the rule then chooses the
    # iterations per epoch, so T is a multiple of it
    clip_given: bool = False  # max_grad_norm set (e.g. measured on public data for the default set): keep that set
    spatial_dims: int = 2  # of the configuration (2d: 2, 3d_*: 3); 2 keeps the conservative fine-tuning threshold
    sites: int = 1  # updates the global model averages per round (federation.json's quorum); 1: a single site


def budget(inp: Inputs) -> int:
    """Per-case passes the run may take: nnU-Net's standard run for the plan, capped by dp_max_case_passes."""
    return min(NNUNET_STEPS * inp.plan_batch, inp.budget or NNUNET_STEPS * inp.plan_batch)


def trainable_counts(network) -> dict[str, int]:
    """Trainable coordinates under each dp_trainable choice the network has."""
    from .trainable import CHOICES, count_parameters, select_trainable
    counts = {}
    for choice in CHOICES:
        try:
            chosen = select_trainable(network, choice)
        except SettingsError:
            continue  # the network has nothing of that kind
        counts[choice] = count_parameters(p for name, p in network.named_parameters() if name in chosen)
    return counts


def rule_candidates(inp: Inputs, explicit: dict) -> tuple[str, int | None, list[Candidate]]:
    """(dp_trainable, the fixed steps or None, the calibrated candidates) of the rule for these inputs."""
    choice = explicit.get("dp_trainable") or trainable_choice(inp.counts, inp.pretrained)
    if choice not in inp.counts:
        raise ValueError(f"dp_trainable={choice!r} selects no parameter of this network")
    iterations = explicit.get("num_iterations_per_epoch")
    if inp.epochs is not None:  # federated: the epochs are the federation's
        steps = inp.epochs * iterations if iterations is not None else None
    elif explicit.get("num_epochs") is not None or iterations is not None:
        steps = (explicit.get("num_epochs") or 1000) * (iterations or ITERATIONS_PER_EPOCH)
    else:
        steps = None
    given_batch = explicit.get("expected_batch_size")  # the user's, up to N (checked by the trainer)
    pairs = search_pairs(inp.num_cases, budget(inp), steps, given_batch, inp.epochs or ITERATIONS_PER_EPOCH)
    return choice, steps, calibrated(inp.num_cases, inp.epsilon, inp.delta, pairs, inp.accountant,
                                     inp.num_cases if given_batch else None)


def choose(inp: Inputs, explicit: dict) -> tuple[dict, Candidate, str]:
    """The values of B, T (as num_epochs x num_iterations_per_epoch; federated: num_iterations_per_epoch),
    dp_trainable, momentum and initial_lr that ``explicit`` (the settings' values of these keys) leaves out; returns
    (chosen, candidate, why)."""
    choice, steps, cands = rule_candidates(inp, explicit)
    best = best_candidate(cands, inp.counts[choice], inp.pretrained)  # fine-tuning: the same for every d
    trainable_why = ""
    if inp.pretrained and not explicit.get("dp_trainable"):
        if inp.clip_given:
            trainable_why = f"; {choice}: max_grad_norm is given (measured for it unless dp_trainable is set)"
        else:
            choice, trainable_why = finetune_trainable(inp.counts, best, inp.spatial_dims, inp.sites)
            trainable_why = f"; dp_trainable {trainable_why}"
    chosen = {"expected_batch_size": best.batch, "dp_trainable": choice, "momentum": MOMENTUM}
    if steps is None and inp.epochs is not None:
        chosen["num_iterations_per_epoch"] = best.steps // inp.epochs
    elif steps is None:
        chosen["num_epochs"], chosen["num_iterations_per_epoch"] = split_steps(best.steps)
    if inp.pretrained:
        chosen["initial_lr"] = finetune_lr(inp.epsilon)
    chosen = {k: v for k, v in chosen.items() if explicit.get(k) is None}
    bound = best_bound(cands, inp.counts[choice])
    run = "" if inp.epochs is None else f"{inp.epochs} epochs (rounds x epochs per round), "
    why = (f"N={inp.num_cases}, epsilon {inp.epsilon}, d={inp.counts[choice]:,} ({choice}), "
           f"{'public weights' if inp.pretrained else 'from scratch'}, {run}budget {budget(inp):,} per-case passes: "
           f"{rule_text(bound, inp.pretrained)} among {len(cands)} (T, B): T={best.steps}, B={best.batch}, "
           f"sigma {best.sigma:.3g}, bound {best.snr_over_run(inp.counts[choice]):.3g}{trainable_why}")
    return chosen, best, why
