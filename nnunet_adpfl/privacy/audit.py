"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023): an epsilon LOWER bound from
canaries, next to the accounted epsilon (an upper bound, if the mechanism is implemented as accounted).

The run trains a small model on CPU with the project's own mechanism: ``poisson_mask`` sampling, the clipping
rules through ``clipped_sum``, ``add_noise`` with sigma from ``calibrate_noise_multiplier`` and the
``PrivacyAccountant``; mode ``adpfl`` adds ADP-FL's adaptive clipping (``QuantileClipTracker``), calibrated
noise schedule, random private-step mask and top-k upload with error feedback, in the same account.

Data: a cohort of synthetic images (4 classes, content only in a central window, zero background) plus m
canaries, each a single bright pixel in the background at a pixel of its own, with a random label, included by
a seeded secret coin. The model is a bias-free linear softmax classifier, so a canary's gradient lies on its
pixel's weights only: canaries are orthogonal to each other and to the cohort (input-space 'Dirac canaries',
the paper's strongest white-box setting). Score of canary i: <u_i, theta_0 - theta_T>, u_i its unit gradient at
theta_0. Guesses: the top k scores IN, the bottom k OUT; :mod:`.audit_bound` turns the right guesses into
the bound. The noise and the coins are seeded (reproducible audit, not a private training).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .accounting import MECHANISMS, PrivacyAccountant, calibrate_noise_multiplier
from .adaptive import (NoiseSchedule, QuantileClipTracker, calibrate_schedule, default_sigma_count,
                       noise_aware_clip_lr)
from ..common.atomic import write_json_atomic
from .audit_bound import count_correct, epsilon_lower_bound, top_bottom_guesses
from .clipping import make_rule
from .noisy_step import add_noise, clipped_sum, make_noise_generator
from .per_case_grads import PerCaseGradients
from .sampling import poisson_mask
from .sparsify import ErrorFeedback, MaskedPerCaseGradients, masked_add_noise, step_mask

RULES = ("dpsgd", "autos", "nsgd", "psac", "adpfl")
BREAKS = ("none", "no_noise", "no_clip", "weak_noise")
NOISE_FACTOR = {"none": 1.0, "no_noise": 0.0, "no_clip": 1.0, "weak_noise": 0.1}  # times the accounted noise
INNER = 16          # side of the central window holding the cohort's image content
CLASSES = 4
ADPFL = {"schedule": "linear", "end_ratio": 0.5, "step_density": 0.5, "upload_density": 0.25}
REPORT_NAME = "audit_report.json"
PLOT_NAME = "audit_scores.png"


@dataclass(frozen=True)
class AuditSettings:
    rule: str = "dpsgd"
    epsilon: float = 1.0          # target epsilon: sigma (or the ADP-FL schedule) is calibrated to it
    delta: float = 1e-5
    canaries: int = 1000
    cohort: int = 200             # ordinary training cases, always included
    steps: int = 20
    rounds: int = 5               # adpfl: federated rounds (steps split evenly), one upload each
    sample_rate: float = 0.25
    clip: float = 1.0
    canary_scale: float = 10.0    # canary pixel value: gradient norm ~ 10 C, so clipping matters
    learning_rate: float = 0.5
    guesses: int | None = None    # k per side (k IN + k OUT); default canaries // 10
    confidence: float = 0.95
    seed: int = 0
    broken: str = "none"
    accountant: str = "rdp"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; use one of {RULES}")
        if self.broken not in BREAKS:
            raise ValueError(f"unknown break {self.broken!r}; use one of {BREAKS}")
        if self.accountant not in MECHANISMS:
            raise ValueError(f"unknown accountant {self.accountant!r}; use one of {MECHANISMS}")
        for name in ("canaries", "cohort", "steps", "rounds", "seed", "guesses"):
            value = getattr(self, name)
            optional = name == "guesses" and value is None
            if not optional and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.canaries < 2:
            raise ValueError(f"need at least 2 canaries, got {self.canaries}")
        if self.cohort < 0 or self.steps < 1 or self.rounds < 1:
            raise ValueError("cohort must be >= 0, steps and rounds >= 1")
        if self.rule == "adpfl" and self.steps % self.rounds:
            raise ValueError(f"adpfl: {self.steps} steps do not split into {self.rounds} equal rounds")
        for name in ("epsilon", "clip", "canary_scale", "learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1 / (self.cohort + self.canaries):
            raise ValueError(f"delta must be in (0, 1/N) with N = {self.cohort + self.canaries} cases")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.guesses is not None and not 1 <= 2 * self.guesses <= self.canaries:
            raise ValueError(f"guesses per side must be in [1, canaries / 2], got {self.guesses}")

    @property
    def guesses_per_side(self) -> int:
        return self.guesses if self.guesses is not None else max(1, self.canaries // 10)


# ---- data and model ----------------------------------------------------------------------------------
def image_side(canaries: int) -> int:
    """Smallest side (parity of INNER, so the window is centred) whose background has a pixel per canary."""
    side = INNER + 2
    while side * side - INNER * INNER < canaries:
        side += 2
    return side


def make_cohort(n: int, side: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images: a class template plus noise inside the central INNER x INNER window, zero outside."""
    templates = rng.normal(size=(CLASSES, INNER, INNER))
    labels = rng.integers(0, CLASSES, n)
    x = np.zeros((n, 1, side, side))
    lo = (side - INNER) // 2
    x[:, 0, lo:lo + INNER, lo:lo + INNER] = templates[labels] + 0.5 * rng.normal(size=(n, INNER, INNER))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


def make_canaries(m: int, side: int, scale: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """m images, each zero but for one background pixel (a different one per canary) set to ``scale``."""
    lo = (side - INNER) // 2
    rows, cols = np.divmod(np.arange(side * side), side)
    background = np.flatnonzero(~((rows >= lo) & (rows < lo + INNER) & (cols >= lo) & (cols < lo + INNER)))
    pixels = rng.permutation(background)[:m]
    x = np.zeros((m, side * side))
    x[np.arange(m), pixels] = scale
    return torch.tensor(x.reshape(m, 1, side, side), dtype=torch.float32), torch.tensor(rng.integers(0, CLASSES, m))


def make_model(side: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, CLASSES, bias=False))


def per_case_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


class NoClip:
    """Deliberately broken 'rule' (audit only): s_i = 1, so a case's contribution is unbounded."""
    def scales(self, norms: torch.Tensor, clip: float) -> torch.Tensor:
        return torch.ones_like(norms)


def clipping_rule(s: AuditSettings):
    if s.broken == "no_clip":
        return NoClip()
    return make_rule("flat" if s.rule in ("dpsgd", "adpfl") else s.rule, {})


# ---- the mechanism -----------------------------------------------------------------------------------
def noise_plan(s: AuditSettings) -> list[tuple[float, int]]:
    """(accounted noise multiplier, steps) per round, calibrated to the target epsilon before training."""
    if s.rule != "adpfl":
        return [(calibrate_noise_multiplier(s.epsilon, s.delta, s.sample_rate, s.steps, s.accountant), s.steps)]
    per_round = s.steps // s.rounds
    schedule = NoiseSchedule(ADPFL["schedule"], end_ratio=ADPFL["end_ratio"])
    sigmas = calibrate_schedule(schedule, s.epsilon, s.delta, s.sample_rate, per_round, s.rounds, s.accountant)
    return [(sigma, per_round) for sigma in sigmas]


def flat_params(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def train(s: AuditSettings, model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: list[tuple[float, int]],
          rng: np.random.Generator, generator: torch.Generator) -> PrivacyAccountant:
    """Private SGD on (x, y) with the accounted noise times NOISE_FACTOR[s.broken]; returns the account."""
    params = dict(model.named_parameters())
    engine = PerCaseGradients(model, per_case_cross_entropy, params, "vmap", chunk_size=256)
    rule, accountant = clipping_rule(s), PrivacyAccountant(s.accountant, s.delta)
    expected_batch = s.sample_rate * (s.cohort + s.canaries / 2)  # public: the coins' expected count
    adpfl = s.rule == "adpfl"
    sigma_count = default_sigma_count(expected_batch, max(p[0] for p in plan))
    tracker = QuantileClipTracker(clip=s.clip, sigma_count=sigma_count, expected_batch_size=expected_batch,
                                  learning_rate=noise_aware_clip_lr(sigma_count, expected_batch),  # the trainer's
                                  max_clip=s.clip) if adpfl else None
    feedback = ErrorFeedback() if adpfl else None
    for r, (sigma, steps) in enumerate(plan):
        masks = list(step_mask({n: p.detach() for n, p in params.items()}, ADPFL["step_density"], "random", r,
                               s.seed, None).values()) if adpfl else None
        start = {n: p.detach().clone() for n, p in params.items()}
        for _ in range(steps):
            batch = torch.from_numpy(poisson_mask(len(x), s.sample_rate, rng))
            clip = tracker.clip if adpfl else s.clip
            sums = clipped_sum(MaskedPerCaseGradients(engine, masks) if adpfl else engine, rule, clip, x[batch],
                               y[batch])
            std = (tracker.gradient_noise_multiplier(sigma) if adpfl else sigma) * clip * NOISE_FACTOR[s.broken]
            noisy = masked_add_noise(sums.clipped, masks, std, expected_batch, generator) if adpfl \
                else add_noise(sums.clipped, std, expected_batch, generator)
            with torch.no_grad():
                for p, g in zip(params.values(), noisy):
                    p.sub_(s.learning_rate * g)
            accountant.step(sigma, s.sample_rate)
            if adpfl:
                tracker.update(sums.norms, generator)
        if adpfl:  # the round's upload: top-k of the noisy update with error feedback (post-processing)
            _, sent = feedback.compress({n: p.detach() - start[n] for n, p in params.items()}, ADPFL["upload_density"])
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(start[n] + sent[n])
    return accountant


def canary_directions(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(m, d) unit per-case gradients of the canaries at the current weights."""
    params = dict(model.named_parameters())
    engine = PerCaseGradients(model, per_case_cross_entropy, params, "vmap", chunk_size=256)
    rows = [torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1) for grads, _ in engine.chunks(x, y)]
    g = torch.cat(rows)
    return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)


def run_audit(s: AuditSettings) -> tuple[dict, np.ndarray, np.ndarray]:
    """Train once with the canaries; returns (report, canary scores, secret coins)."""
    started = time.perf_counter()
    coins_seq, data_seq, sampling_seq, noise_seq = np.random.SeedSequence(s.seed).spawn(4)
    included = np.random.default_rng(coins_seq).random(s.canaries) < 0.5
    data_rng = np.random.default_rng(data_seq)
    side = image_side(s.canaries)
    cohort_x, cohort_y = make_cohort(s.cohort, side, data_rng)
    canary_x, canary_y = make_canaries(s.canaries, side, s.canary_scale, data_rng)
    model = make_model(side, s.seed)
    directions = canary_directions(model, canary_x, canary_y)
    theta0 = flat_params(dict(model.named_parameters()))
    keep = torch.from_numpy(included)
    plan = noise_plan(s)
    accountant = train(s, model, torch.cat([cohort_x, canary_x[keep]]), torch.cat([cohort_y, canary_y[keep]]), plan,
                       np.random.default_rng(sampling_seq),
                       make_noise_generator(torch.device("cpu"), int(noise_seq.generate_state(1)[0])))
    scores = (directions @ (theta0 - flat_params(dict(model.named_parameters())))).numpy().astype(float)
    k = s.guesses_per_side
    made, right = count_correct(top_bottom_guesses(scores, k, k), included)
    with torch.no_grad():
        accuracy = float((model(cohort_x).argmax(1) == cohort_y).float().mean()) if s.cohort else None
    report = {
        "accounted_epsilon": accountant.epsilon(), "empirical_epsilon_lower_bound":
            epsilon_lower_bound(s.canaries, made, right, s.delta, s.confidence),
        "confidence": s.confidence, "delta": s.delta, "canaries": s.canaries,
        "canaries_included": int(included.sum()), "guesses_made": made, "guesses_right": right,
        "mechanism": "as accounted" if s.broken == "none" else f"BROKEN ({s.broken}): the accounted epsilon is "
                                                               "what the account claims, not what the run spends",
        "noise_multipliers": [sigma for sigma, _ in plan], "steps": accountant.steps,
        "cohort_train_accuracy": accuracy, "seconds": round(time.perf_counter() - started, 2),
        "bound": "Steinke, Nasr, Jagielski 2023: Binomial tail + 2 m delta correction (their Appendix D)",
        "settings": asdict(s),
    }
    return report, scores, included


# ---- outputs -----------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    s = report["settings"]
    rows = [("rule", s["rule"]), ("break", s["broken"]), ("accounted epsilon", f"{report['accounted_epsilon']:.3f}"),
            (f"empirical epsilon lower bound ({report['confidence']:.0%})",
             f"{report['empirical_epsilon_lower_bound']:.3f}"),
            ("canaries (included)", f"{report['canaries']} ({report['canaries_included']})"),
            ("guesses made / right", f"{report['guesses_made']} / {report['guesses_right']}"),
            ("seconds", f"{report['seconds']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plot_scores(scores: np.ndarray, included: np.ndarray, report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(scores, bins=50)
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"IN ({included.sum()})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"OUT ({(~included).sum()})")
    ax.set_xlabel("canary score <u_i, theta_0 - theta_T>")
    ax.set_ylabel("canaries")
    ax.set_title(f"{report['settings']['rule']} (break {report['settings']['broken']}): accounted eps "
                 f"{report['accounted_epsilon']:.2f}, lower bound {report['empirical_epsilon_lower_bound']:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_cli(sub) -> None:
    d = AuditSettings()
    p = sub.add_parser("audit", help="empirical epsilon lower bound from canaries (one-run audit) next to the "
                                     "accounted epsilon")
    p.add_argument("--rule", choices=RULES, default=d.rule)
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="target (accounted) epsilon")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--canaries", type=int, default=d.canaries)
    p.add_argument("--cohort", type=int, default=d.cohort, help="ordinary training cases")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--rounds", type=int, default=d.rounds, help="adpfl: federated rounds")
    p.add_argument("--sample-rate", type=float, default=d.sample_rate)
    p.add_argument("--guesses", type=int, default=None, help="guesses per side (default canaries // 10)")
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--accountant", choices=MECHANISMS, default=d.accountant)
    p.add_argument("--break", dest="broken", choices=BREAKS, default="none",
                   help="deliberately broken mechanism (for checking the audit): no_noise, no_clip, weak_noise "
                        "(noise / 10)")
    p.add_argument("-o", "--output", default="audit", help="folder for audit_report.json and the plot")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    try:
        s = AuditSettings(rule=a.rule, epsilon=a.epsilon, delta=a.delta, canaries=a.canaries, cohort=a.cohort,
                          steps=a.steps, rounds=a.rounds, sample_rate=a.sample_rate, guesses=a.guesses,
                          confidence=a.confidence, seed=a.seed, broken=a.broken, accountant=a.accountant)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report, scores, included = run_audit(s)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / REPORT_NAME, report)
    plot_scores(scores, included, report, out / PLOT_NAME)
    print(format_table(report))
    print(f"report and plot in {out}")
    return 0
