"""``nnunet-adpfl recipe``: suggested DP settings for a cohort size and budget, with the numbers behind them.

With Poisson rate q = B/N, T steps and noise multiplier sigma (calibrated to epsilon), each step adds Gaussian noise
of std sigma*C/B per trainable coordinate to a mean clipped gradient of norm <= C. Over d coordinates the noise norm
is sigma*C*sqrt(d)/B, so one step's signal-to-noise ratio is at most B/(sigma*sqrt(d)); averaging T steps gains
about sqrt(T). The recipe prints these for each expected batch size, step count and ``dp_trainable`` choice.
"""
from __future__ import annotations

import argparse
import json

from ..training.dp_defaults import (FINETUNE_LR, LOW_EPSILON_FINETUNE_LR, Candidate, finetune_min_bound,  # noqa: F401
                                    Inputs, budget, calibrated, candidates, choose, rule_candidates, search_pairs,
                                    suggest, trainable_counts)

CLIP_ADVICE = ("max_grad_norm: the median per-case gradient norm of PUBLIC data at the public weights, from "
               "nnUNetv2_train <public dataset> <configuration> all -tr nnUNetTrainerDPClipCalibration "
               "-pretrained_weights <weights> (with these settings, dp_trainable included: a given max_grad_norm "
               "otherwise keeps norm_bias). The SNR bounds above assume the cases' norms "
               "reach C; with the default C = 1 and norm_bias, the kidney's were 0.04 (25x more noise than needed). "
               "decoder instead of norm_bias when the public model misses a class: on brain's weak public model "
               "(enhancing tumour 0) only decoder learned it (0.72 at lr 0.03, 0.62 at 0.01; norm_bias stayed at 0 with "
               "C = 1 at lr 0.01 and with C public at 0.03). Where the public model already segments every class, decoder at lr 0.03 lost tumours and "
               "cysts below it (kidney_roi) and at lr 0.01 matched norm_bias: compare per class with the public "
               "model. For ADP-FL keep adpfl_clip_max_ratio at 1 (docs/experiments/FINETUNE.md).")


def read_json(path: str, what: str) -> dict:
    """A JSON object the user named on the command line; a clear error if it is missing or not JSON."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {what} {path} is not a JSON object")
    return data


def read_plan(path: str, configuration: str) -> dict:
    """The plan, checked to hold ``configuration``."""
    plan = read_json(path, "--plans")
    if configuration not in plan.get("configurations", {}):
        raise SystemExit(f"error: --plans {path} has no configuration {configuration!r}")
    return plan


def parameter_counts(plan: dict, dataset_json: str, configuration: str) -> dict[str, int]:
    """Trainable coordinates under each dp_trainable choice for the plan's network (as the trainer counts them)."""
    from ..federation.aggregator import build_network
    from ..training.dp_trainer import make_dp_safe

    return trainable_counts(make_dp_safe(build_network(plan, read_json(dataset_json, "--dataset-json"),
                                                       configuration)))


def spatial_dims(plan: dict | None, configuration: str) -> int:
    """The configuration's spatial dimensions: its patch size's in the plan, else 2 for nnU-Net's '2d' and 3 for
    the others (3d_fullres, 3d_lowres, 3d_cascade_fullres)."""
    if plan:
        return len(plan["configurations"][configuration]["patch_size"])
    return 2 if configuration == "2d" else 3


GRID_HEAD = "suggested settings (spread the steps over epochs or rounds as you like, same total):"
TRAINER_HEAD = ("what the DP trainers choose where the settings file leaves these out (dp_defaults 'auto'; "
                "explicit settings win):")


def format_recipe(cands: list[Candidate], counts: dict[str, int], clip: float, suggestion: tuple, epsilon: float,
                  delta: float, num_cases: int, settings_head: str = GRID_HEAD, dims: int = 2, sites: int = 1) -> str:
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
    lines += ["", settings_head, json.dumps(settings, indent=2)]
    if "initial_lr" in settings:
        lines.append(CLIP_ADVICE)
    bound = best.snr_over_run(counts[settings["dp_trainable"]])
    min_bound = finetune_min_bound(settings["dp_trainable"], best.num_cases, dims, sites)
    if "initial_lr" in settings and bound < min_bound:
        lines.append(f"warning: the run's signal-to-noise bound is below {min_bound:.2g}: expect the private "
                     "run to stay near the public model (more cases help most)")
    elif "initial_lr" not in settings and bound < 1:
        lines.append("warning: the run's signal-to-noise bound is below 1: training moves the weights little beyond "
                     "their start (more cases help most; from scratch, expect a model that learns little)")
    return "\n".join(lines)


def trainer_inputs(args, counts: dict[str, int], plan: dict | None, dims: int, averaged: int) -> Inputs:
    """The rule's inputs, as the DP trainer (or, with --rounds, a federated DP trainer) has them."""
    batch = plan["configurations"][args.configuration]["batch_size"] if plan else args.plan_batch
    epochs = args.rounds * args.epochs_per_round if args.rounds else None
    return Inputs(args.cases, args.epsilon, args.delta, counts, args.pretrained, batch, args.max_case_passes,
                  args.accountant, epochs, clip_given=args.clip is not None, spatial_dims=dims, sites=averaged)


def sites(args) -> int:
    """Updates the global model averages per round: --sites with --rounds (federation.json's quorum), else 1."""
    if args.sites is not None and args.sites < 1:
        raise SystemExit(f"error: --sites {args.sites}: a round averages at least one site's update")
    if args.sites is not None and not args.rounds:
        raise SystemExit("error: --sites describes a federation: give --rounds too")
    if args.rounds and args.pretrained and args.sites is None:
        raise SystemExit("error: a federated site fine-tuning public weights: give --sites (federation.json's quorum, "
                         "the fewest sites a round averages: the thresholds depend on it)")
    return args.sites or 1


def trainer_choice(args, counts: dict[str, int], plan: dict | None, dims: int,
                   averaged: int) -> tuple[list[Candidate], tuple]:
    """What the DP trainers choose with no settings file (dp_defaults 'auto'): the same function, same inputs."""
    inp = trainer_inputs(args, counts, plan, dims, averaged)
    chosen, best, _ = choose(inp, {})
    return rule_candidates(inp, {})[2], (best, {"target_epsilon": args.epsilon, **chosen})


def _cmd(args) -> int:
    averaged = sites(args)
    plan = read_plan(args.plans, args.configuration) if args.plans else None
    if plan:
        if not args.dataset_json:
            raise SystemExit("error: --plans needs --dataset-json")
        counts = parameter_counts(plan, args.dataset_json, args.configuration)
    elif args.trainable_parameters:
        counts = {"all": args.trainable_parameters}
        if args.pretrained:
            raise SystemExit("error: --pretrained compares dp_trainable choices: give --plans and --dataset-json")
    else:
        raise SystemExit("error: give --plans and --dataset-json (counts per dp_trainable) or "
                         "--trainable-parameters D")
    dims = spatial_dims(plan, args.configuration)
    try:
        if args.steps or args.batch_sizes:
            cands = candidates(args.cases, args.epsilon, args.delta, args.steps or [100, 300, 1000],
                               args.batch_sizes or [2, 4, 8, 16, 32], args.accountant)
            suggestion = suggest(cands, counts, args.pretrained, args.max_batch, args.epsilon,
                                 args.clip is not None, dims, averaged)
            head = GRID_HEAD
        else:
            (cands, suggestion), head = trainer_choice(args, counts, plan, dims, averaged), TRAINER_HEAD
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    clip = 1.0 if args.clip is None else args.clip
    print(format_recipe(cands, counts, clip, suggestion, args.epsilon, args.delta, args.cases, head, dims, averaged))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("recipe", help="what the DP trainers choose for N cases (or settings for a grid): noise, SNR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", type=int, required=True, help="private training cases N (at this site)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--steps", type=int, nargs="+", help="DP steps of the whole run to compare (with --batch-sizes: "
                   "a grid of your own instead of the trainers' choice; default of the grid 100 300 1000)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="expected batches of your grid (default 2 4 8 16 32)")
    p.add_argument("--max-batch", type=int, default=8, help="your grid: largest expected batch your memory allows")
    p.add_argument("--plan-batch", type=int, default=2, help="the plan's batch size (without --plans)")
    p.add_argument("--max-case-passes", type=int, help="setting dp_max_case_passes (default: nnU-Net's run)")
    p.add_argument("--rounds", type=int, help="a federated site: the federation's rounds (the trainer then chooses "
                   "the iterations per epoch)")
    p.add_argument("--epochs-per-round", type=int, default=1, help="with --rounds: the federation's epochs per round")
    p.add_argument("--sites", type=int, help="with --rounds and --pretrained: the fewest sites a round averages "
                   "(federation.json's quorum; below 3 the fine-tuning thresholds grow by sqrt(3/K))")
    p.add_argument("--clip", type=float, help="clip norm C, as max_grad_norm in the settings (default 1; when given "
                   "and fine-tuning, the trainers keep the default dp_trainable, the set it was measured for)")
    p.add_argument("--plans", help="nnUNetPlans.json (counts the trainable parameters of each dp_trainable choice)")
    p.add_argument("--dataset-json", help="dataset.json next to the plan")
    p.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (its spatial dimensions set "
                   "the fine-tuning thresholds)")
    p.add_argument("--trainable-parameters", type=int, help="number of trainable parameters d (without --plans)")
    p.add_argument("--pretrained", action="store_true", help="fine-tuning public weights (-pretrained_weights)")
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    p.set_defaults(func=_cmd)
