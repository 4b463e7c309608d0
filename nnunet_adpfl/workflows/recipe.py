"""``nnunet-adpfl recipe``: suggested DP settings for a cohort size and budget, with the numbers behind them.

With Poisson rate q = B/N, T steps and noise multiplier sigma (calibrated to epsilon), each step adds Gaussian noise
of std sigma*C/B per trainable coordinate to a mean clipped gradient of norm <= C. Over d coordinates the noise norm
is sigma*C*sqrt(d)/B, so one step's signal-to-noise ratio is at most B/(sigma*sqrt(d)); averaging T steps gains
about sqrt(T). The recipe prints these for each expected batch size, step count and ``dp_trainable`` choice.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from ..privacy.accounting import calibrate_noise_multiplier
from ..training.trainable import CHOICES

# docs/FINETUNE.md's kidney fine-tuning (from public weights, C from the public cohort): 3e-2, the
# non-private learning rate, beat 3e-3 (and lower ones) at C = 1. Tried on one task, not a tuned optimum.
FINETUNE_LR = 3e-2
# below epsilon 4: kidney_roi at epsilon 1 (3 seeds each) kept tumour and cyst near the public model at 1e-2
# (DP-FL 0.568, ADP-FL 0.577 mean Dice) and lost them at 3e-2 (0.465, 0.450, 2 seeds); at epsilon 4 3e-2 kept them.
LOW_EPSILON, LOW_EPSILON_FINETUNE_LR = 4.0, 1e-2
CLIP_ADVICE = ("max_grad_norm: the median per-case gradient norm of PUBLIC data at the public weights, from "
               "nnUNetv2_train <public dataset> <configuration> all -tr nnUNetTrainerDPClipCalibration "
               "-pretrained_weights <weights> (with these settings). The SNR bounds above assume the cases' norms "
               "reach C; with the default C = 1 and norm_bias, the kidney's were 0.04 (25x more noise than needed). "
               "decoder instead of norm_bias when the public model misses a class: on brain's weak public model "
               "(enhancing tumour 0) only decoder learned it (0.72 at lr 0.03, 0.62 at 0.01; norm_bias stayed at 0 with "
               "C = 1 at lr 0.01 and with C public at 0.03). Where the public model already segments every class, decoder at lr 0.03 lost tumours and "
               "cysts below it (kidney_roi) and at lr 0.01 matched norm_bias: compare per class with the public "
               "model. For ADP-FL keep adpfl_clip_max_ratio at 1 (docs/FINETUNE.md).")
MOMENTUM = 0.9
FINETUNE_TRAINABLE = ("norm_bias", "decoder")  # preferred dp_trainable when fine-tuning, first available


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


def candidates(num_cases: int, epsilon: float, delta: float, steps: list[int], batches: list[int],
               accountant: str = "rdp") -> list[Candidate]:
    if num_cases < 2:
        raise ValueError(f"need at least 2 training cases, got {num_cases}")
    if not 0 < delta < 1 / num_cases:
        raise ValueError(f"delta must be in (0, 1/N) = (0, {1 / num_cases:.3g}), got {delta}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    out = []
    for t in steps:
        for b in batches:
            if not 1 <= b <= num_cases // 2:
                continue  # sampling rate above 1/2: little amplification left
            q = b / num_cases
            out.append(Candidate(t, b, q, calibrate_noise_multiplier(epsilon, delta, q, t, accountant)))
    if not out:
        raise ValueError(f"no expected batch size in {batches} is between 1 and N/2 = {num_cases // 2}")
    return out


def suggest(cands: list[Candidate], counts: dict[str, int], pretrained: bool, max_batch: int,
            epsilon: float) -> tuple[Candidate, dict]:
    """Settings with the best signal-to-noise over the run (the fewest steps and smallest batch within 10% of it)
    among batches <= max_batch (memory): all parameters from scratch; when fine-tuning public weights the first of
    FINETUNE_TRAINABLE the network has. norm_bias comes first: with C from the public cohort it improved on the
    public model at epsilon 8 and 4 on every task measured, small lesions included (docs/FINETUNE.md, kidney_roi;
    at epsilon 1 it kept them near the public model only with the lower learning rate), where the decoder
    at the same learning rate fell below the public model's tumour and cyst Dice; the decoder kept more only for
    large structures (kidney 0.785 vs 0.740, 3 seeds)."""
    choice = next((c for c in FINETUNE_TRAINABLE if c in counts), "all") if pretrained else "all"
    fitting = [c for c in cands if c.batch <= max_batch] or [min(cands, key=lambda c: c.batch)]
    top = max(c.snr_over_run(counts[choice]) for c in fitting)
    best = min((c for c in fitting if c.snr_over_run(counts[choice]) >= 0.9 * top),  # within 10%: the cheapest
               key=lambda c: (c.steps, c.batch))
    settings = {"target_epsilon": epsilon, "expected_batch_size": best.batch, "num_epochs": 1,
                "num_iterations_per_epoch": best.steps, "dp_trainable": choice, "momentum": MOMENTUM,
                **({"initial_lr": finetune_lr(epsilon)} if pretrained else {})}
    return best, settings


def finetune_lr(epsilon: float) -> float:
    return LOW_EPSILON_FINETUNE_LR if epsilon < LOW_EPSILON else FINETUNE_LR


def parameter_counts(plans: str, dataset_json: str, configuration: str) -> dict[str, int]:
    """Trainable coordinates under each dp_trainable choice for the plan's network."""
    from ..federation.aggregator import build_network
    from ..training.dp_trainer import make_dp_safe
    from ..training.trainable import select_trainable

    with open(plans) as f, open(dataset_json) as g:
        net = make_dp_safe(build_network(json.load(f), json.load(g), configuration))
    params = dict(net.named_parameters())
    return {c: sum(params[n].numel() for n in select_trainable(net, c)) for c in CHOICES}


def format_recipe(cands: list[Candidate], counts: dict[str, int], clip: float, suggestion: tuple, epsilon: float,
                  delta: float, num_cases: int) -> str:
    names = list(counts)
    head = (["steps", "expected batch B", "rate q", "sigma", "noise std / coord"]
            + [f"SNR {n} (d={counts[n]:,})" for n in names])
    lines = [f"epsilon {epsilon}, delta {delta}, N = {num_cases} cases, clip C = {clip}. SNR = one step's "
             "signal/noise bound B/(sigma*sqrt(d)); x sqrt(steps) in brackets. d counted on the plan's network; the "
             "trainer's log gives the exact count (it also freezes what the loss never reaches, e.g. the lowest "
             "deep-supervision output).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cands:
        snrs = [f"{c.snr(counts[n]):.3g} ({c.snr_over_run(counts[n]):.2g})" for n in names]
        lines.append(f"| {c.steps} | {c.batch} | {c.sample_rate:.3g} | {c.sigma:.3g} | {c.noise_std(clip):.3g} | "
                     + " | ".join(snrs) + " |")
    best, settings = suggestion
    lines += ["", "suggested settings (spread the steps over epochs or rounds as you like, same total):",
              json.dumps(settings, indent=2)]
    if "initial_lr" in settings:
        lines.append(CLIP_ADVICE)
    if best.snr_over_run(counts[settings["dp_trainable"]]) < 1:
        lines.append("warning: the run's signal-to-noise bound is below 1: training moves the weights little beyond "
                     "their start (more cases help most; from scratch, expect a model that learns little)")
    return "\n".join(lines)


def _cmd(args) -> int:
    if args.plans:
        if not args.dataset_json:
            raise SystemExit("error: --plans needs --dataset-json")
        counts = parameter_counts(args.plans, args.dataset_json, args.configuration)
    elif args.trainable_parameters:
        counts = {"all": args.trainable_parameters}
        if args.pretrained:
            raise SystemExit("error: --pretrained compares dp_trainable choices: give --plans and --dataset-json")
    else:
        raise SystemExit("error: give --plans and --dataset-json (counts per dp_trainable) or "
                         "--trainable-parameters D")
    try:
        cands = candidates(args.cases, args.epsilon, args.delta, args.steps, args.batch_sizes, args.accountant)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    suggestion = suggest(cands, counts, args.pretrained, args.max_batch, args.epsilon)
    print(format_recipe(cands, counts, args.clip, suggestion, args.epsilon, args.delta, args.cases))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("recipe", help="suggested DP settings for N cases and a budget: noise per coordinate, SNR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=int, required=True, help="private training cases N (at this site)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000], help="DP steps of the whole run")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="expected batches to try")
    p.add_argument("--max-batch", type=int, default=8, help="largest expected batch your memory allows")
    p.add_argument("--clip", type=float, default=1.0, help="clip norm C")
    p.add_argument("--plans", help="nnUNetPlans.json (counts the trainable parameters of each dp_trainable choice)")
    p.add_argument("--dataset-json", help="dataset.json next to the plan")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--trainable-parameters", type=int, help="number of trainable parameters d (without --plans)")
    p.add_argument("--pretrained", action="store_true", help="fine-tuning public weights (-pretrained_weights)")
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    p.set_defaults(func=_cmd)
