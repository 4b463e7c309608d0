"""DP-aware defaults (setting ``dp_defaults``): what the settings file leaves out of the expected batch B, the
steps, ``dp_trainable``, momentum and the fine-tuning learning rate, chosen from N (the fold's training cases),
epsilon, delta, the trainable parameter counts and a compute budget. ``nnunet-adpfl recipe`` prints the same rule.

With Poisson rate q = B/N, T steps and noise multiplier sigma (calibrated to epsilon), each step adds Gaussian noise
of std sigma*C/B per trainable coordinate to a mean clipped gradient of norm <= C. Over d coordinates the noise norm
is sigma*C*sqrt(d)/B, so one step's signal-to-noise ratio is at most B/(sigma*sqrt(d)); averaging T steps gains
about sqrt(T). The rule takes the best bound over the run and, within 10% of it, the fewest per-case passes T*B.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..common.config import SettingsError, explicit_keys

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
NNUNET_STEPS = 1000 * 250  # nnU-Net's epochs x iterations per epoch
ITERATIONS_PER_EPOCH = 250  # nnU-Net's; the rule's step counts are multiples of it
STEP_GRID = (250, 1000, 4000, 16000, 64000, NNUNET_STEPS)  # coarse: each calibration costs about a second
RULED = ("expected_batch_size", "num_epochs", "num_iterations_per_epoch", "dp_trainable", "momentum", "initial_lr")
RULE = ("best signal-to-noise bound over the run B*sqrt(T)/(sigma*sqrt(d)), the fewest per-case passes T*B within "
        "10% of it")


@functools.lru_cache(maxsize=256)
def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Opacus' noise calibration, cached: the rule and the trainer calibrate the same (q, T) once."""
    from ..privacy.accounting import calibrate_noise_multiplier
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant)


@dataclass(frozen=True)
class Candidate:
    steps: int
    batch: int
    sample_rate: float
    sigma: float

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
    has. norm_bias comes first: with C from the public cohort it improved on the public model at epsilon 8 and 4 on
    every task measured, small lesions included (docs/FINETUNE.md, kidney_roi; at epsilon 1 it kept them near the
    public model only with the lower learning rate), where the decoder at the same learning rate fell below the
    public model's tumour and cyst Dice; the decoder kept more only for large structures (kidney 0.785 vs 0.740)."""
    return next((c for c in FINETUNE_TRAINABLE if c in counts), "all") if pretrained else "all"


def best_candidate(cands: list[Candidate], parameters: int) -> Candidate:
    """The best signal-to-noise bound over the run; within 10% of it, the fewest per-case passes (then steps)."""
    top = max(c.snr_over_run(parameters) for c in cands)
    return min((c for c in cands if c.snr_over_run(parameters) >= 0.9 * top),
               key=lambda c: (c.steps * c.batch, c.steps))


def suggest(cands: list[Candidate], counts: dict[str, int], pretrained: bool, max_batch: int,
            epsilon: float) -> tuple[Candidate, dict]:
    """Settings of the best candidate among batches <= max_batch (memory), as a settings file."""
    choice = trainable_choice(counts, pretrained)
    fitting = [c for c in cands if c.batch <= max_batch] or [min(cands, key=lambda c: c.batch)]
    best = best_candidate(fitting, counts[choice])
    epochs, iterations = split_steps(best.steps)
    settings = {"target_epsilon": epsilon, "expected_batch_size": best.batch, "num_epochs": epochs,
                "num_iterations_per_epoch": iterations, "dp_trainable": choice, "momentum": MOMENTUM,
                **({"initial_lr": finetune_lr(epsilon)} if pretrained else {})}
    return best, settings


def split_steps(steps: int) -> tuple[int, int]:
    """(epochs, iterations per epoch): nnU-Net's 250 per epoch where T is a multiple of it, else one epoch."""
    return (steps // ITERATIONS_PER_EPOCH, ITERATIONS_PER_EPOCH) if steps % ITERATIONS_PER_EPOCH == 0 else (1, steps)


def finetune_lr(epsilon: float) -> float:
    return LOW_EPSILON_FINETUNE_LR if epsilon < LOW_EPSILON else FINETUNE_LR


def unset_batch(plan_batch: int, num_cases: int) -> int:
    """The plan's batch where the settings leave expected_batch_size out, at most N/2 (an input, never an error)."""
    return max(1, min(plan_batch, num_cases // 2))


def powers_of_two(limit: int) -> list[int]:
    return [2 ** k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def search_pairs(num_cases: int, budget: int, steps: int | None = None, batch: int | None = None
                 ) -> list[tuple[int, int]]:
    """The (T, B) the rule calibrates, T*B <= budget (per-case passes): B powers of two up to N/2 for a fixed T;
    STEP_GRID for a fixed B; otherwise per T of STEP_GRID the largest such B and a quarter of it (for a fixed T a
    larger B never lowers the bound; the quarter finds a cheaper point within 10%). At most 12 calibrations."""
    if steps is not None and batch is not None:
        return [(steps, batch)]
    if steps is not None:
        return [(steps, b) for b in powers_of_two(min(num_cases // 2, budget // steps))] or [(steps, 1)]
    if batch is not None:
        return [(t, batch) for t in STEP_GRID if t * batch <= budget] or [(STEP_GRID[0], batch)]
    pairs = []
    for t in STEP_GRID:
        fits = powers_of_two(min(num_cases // 2, budget // t))
        pairs += [(t, b) for b in {fits[-1], max(1, fits[-1] // 4)}] if fits else []
    return sorted(pairs) or [(STEP_GRID[0], 1)]


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


def choose(inp: Inputs, explicit: dict) -> tuple[dict, Candidate | None, str]:
    """The values of B, T (as num_epochs x num_iterations_per_epoch), dp_trainable, momentum and initial_lr that
    ``explicit`` (the settings file's values of these keys) leaves out; returns (chosen, candidate, why)."""
    passes = budget(inp)
    choice = explicit.get("dp_trainable") or trainable_choice(inp.counts, inp.pretrained)
    if choice not in inp.counts:
        raise ValueError(f"dp_trainable={choice!r} selects no parameter of this network")
    fixed_steps = explicit.get("num_epochs") is not None or explicit.get("num_iterations_per_epoch") is not None
    steps = ((explicit.get("num_epochs") or 1000) * (explicit.get("num_iterations_per_epoch") or 250)
             if fixed_steps else None)
    pairs = search_pairs(inp.num_cases, passes, steps, explicit.get("expected_batch_size"))
    given_batch = explicit.get("expected_batch_size")  # the user's, up to N (checked by the trainer)
    cands = calibrated(inp.num_cases, inp.epsilon, inp.delta, pairs, inp.accountant,
                       inp.num_cases if given_batch else None)
    best = best_candidate(cands, inp.counts[choice])
    chosen = {"expected_batch_size": best.batch, "dp_trainable": choice, "momentum": MOMENTUM}
    if not fixed_steps:
        chosen["num_epochs"], chosen["num_iterations_per_epoch"] = split_steps(best.steps)
    if inp.pretrained:
        chosen["initial_lr"] = finetune_lr(inp.epsilon)
    chosen = {k: v for k, v in chosen.items() if explicit.get(k) is None}
    why = (f"N={inp.num_cases}, epsilon {inp.epsilon}, d={inp.counts[choice]:,} ({choice}), "
           f"{'public weights' if inp.pretrained else 'from scratch'}, budget {passes:,} per-case passes: "
           f"{RULE} among {len(cands)} (T, B): T={best.steps}, B={best.batch}, sigma {best.sigma:.3g}, "
           f"bound {best.snr_over_run(inp.counts[choice]):.3g}")
    return chosen, best, why


def apply_to_trainer(trainer) -> dict:
    """Chooses what the settings file leaves out and writes it into the trainer (called once its network exists);
    returns the report's record. 'nnunet' (and a fixed noise_multiplier, and the federated trainers, whose steps
    come from federation.json): today's defaults, the plan's batch at most N/2."""
    from ..common.initial_weights import pretrained_weights_argument
    s, given = trainer.dp_settings, explicit_keys()
    n = len(trainer.do_split()[0])
    if s["expected_batch_size"] is not None and s["expected_batch_size"] > n:
        raise SettingsError(f"expected_batch_size {s['expected_batch_size']} exceeds the {n} training cases of "
                            f"fold {trainer.fold}")
    federated = getattr(trainer, "federation_mode", None) is not None
    if s["dp_defaults"] == "nnunet" or s["target_epsilon"] is None or s["noise_multiplier"] is not None or federated:
        chosen = {} if s["expected_batch_size"] is not None else {
            "expected_batch_size": unset_batch(trainer.batch_size, n)}
        mode = "nnunet" if not federated else "nnunet (federated: steps from federation.json)"
        why = f"the plan's batch {trainer.batch_size} at most N/2 = {n // 2}; other settings as given or nnU-Net's"
    else:
        pretrained = pretrained_weights_argument() is not None
        inp = Inputs(n, s["target_epsilon"], s["delta"], trainable_counts(trainer.network), pretrained,
                     trainer.batch_size, s["dp_max_case_passes"], s["accountant"])
        try:
            chosen, _, why = choose(inp, {k: s[k] for k in given if k in RULED})
        except ValueError as e:
            raise SettingsError(str(e)) from None
        mode = "auto"
    for key, value in chosen.items():
        if key in ("num_epochs", "num_iterations_per_epoch", "initial_lr"):
            setattr(trainer, key, value)
        else:
            s[key] = value
    trainer.print_to_log_file(f"DP defaults ({mode}): chose {chosen or 'nothing'}; {why}")
    return {"mode": mode, "chosen": chosen, "why": why}
