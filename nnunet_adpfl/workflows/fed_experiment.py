"""``nnunet-adpfl fed-compare``: NP-FL, DP-FL, ADP-FL (and ADP-FL minus each mechanism) as simulated 3-site
federations on one synthetic task, the same rounds x steps for every run and the same epsilon for the private
ones; per-class Dice of each final global model on held-out test cases, epsilon and bytes uploaded.

Resumable: each run keeps its result in <work-dir>/<task>/results.json and is skipped when present. All runs of a
task share one dataset, one federated plan and one preprocessing (nnunet_adpfl.simulate).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..evaluation.metrics import nanmean
from ..federation import files as ff
from ..federation.aggregator import create_federation
from ..nnunet.pipeline import DIVERGED, predict
from .pretrain import TRAINER as STANDARD_TRAINER, calibrate_clip, pretrain_public, train_standard
from .stages import (CONFIGURATION, MODE_OF_TRAINER, Layout, evaluate_folder, new_run, stage_data, stage_plan,
                     summarise, train_federated)

ADPFL = "nnUNetTrainerADPFL"
ALL_MECHANISMS = {"adpfl_noise_schedule": "exponential", "adpfl_schedule_end_ratio": 0.5, "adpfl_adaptive_clip": True,
                  "adpfl_clip_quantile": 0.5, "adpfl_step_sparsity": "topk_prev_global", "adpfl_step_density": 0.25,
                  "adpfl_upload_density": 0.1, "adpfl_error_feedback": True}
WITHOUT = {"dynamic noise": {"adpfl_noise_schedule": "constant"}, "adaptive clipping": {"adpfl_adaptive_clip": False},
           "step sparsification": {"adpfl_step_sparsity": "none"}, "upload sparsification": {"adpfl_upload_density": None}}
ALL_OFF = {k: v for off in WITHOUT.values() for k, v in off.items()}
RUNS = {  # name -> (trainer, settings beyond the common private ones; None: not private)
    "NP-FL": ("nnUNetTrainerFL", None),
    "DP-FL": ("nnUNetTrainerDPFL", {}),
    "ADP-FL (defaults)": (ADPFL, {}),
    "ADP-FL (all mechanisms)": (ADPFL, ALL_MECHANISMS),
    **{f"ADP-FL (all) - {name}": (ADPFL, {**ALL_MECHANISMS, **off}) for name, off in WITHOUT.items()},
    **{f"ADP-FL: {name} only": (ADPFL, {**ALL_MECHANISMS, **ALL_OFF, **{k: ALL_MECHANISMS[k] for k in off}})
       for name, off in WITHOUT.items()},
}
FROM_PUBLIC = " from public weights"  # suffix: the run's round-0 model is the public model
RUNS.update({name + FROM_PUBLIC: run for name, run in list(RUNS.items())})
PUBLIC_ONLY = "public weights only (no private training)"
STANDARD = "standard nnU-Net (all sites' data pooled)"  # the centralised, non-private reference
DEFAULT_RUNS = ("NP-FL", "DP-FL", "ADP-FL (defaults)")
PUBLIC_CLIP = "public"  # --clip public: C calibrated on the public cohort at the public weights
REPEAT = " #"  # "<run> #2": the run's second repeat (training seed --seed + 1)


def _log(msg: str) -> None:
    print(f"[fed-compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_slug(name: str) -> str:
    """The folder name of a run (its federation folder and the sites' results) in a task's work dir."""
    return "run_" + "".join(c if c.isalnum() else "_" for c in name.lower())


def run_task(a, task: str) -> dict:
    work = Path(a.work_dir).resolve() / task
    sites = [chr(ord("A") + i) for i in range(a.sites)]
    config = CONFIGURATION[task]
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    plan_lay = Layout(work, sites, "plan")
    plan_lay.logs.mkdir(parents=True, exist_ok=True)
    pooled = stage_data(plan_lay, task, a.num_cases, a.scale, a.seed, num_test_cases=a.num_test_cases,
                        cohort_size=a.cohort_size)
    if not (plan_lay.fed / ff.FEDERATION_FILE).exists():
        create_federation(plan_lay.fed, plan_lay.keys, sites, a.rounds, 1, "npfl",
                          iterations_per_epoch=a.iterations, configuration=config, seed=a.seed)
    stage_plan(plan_lay, pooled, config, a.max_features)
    private = {"target_epsilon": a.epsilon, "delta": a.delta, "expected_batch_size": a.batch_size,
               "max_grad_norm": 1.0 if a.clip == PUBLIC_CLIP else a.clip, "num_val_iterations_per_epoch": 1,
               **json.loads(a.private_settings or "{}")}
    public = None
    if any(name.endswith(FROM_PUBLIC) for name in a.runs):
        public = pretrain_public(plan_lay.fed, task, work / "public", a.public_cases, a.scale, a.seed,
                                 a.public_epochs, a.iterations, a.lr)
        if a.clip == PUBLIC_CLIP:
            private["max_grad_norm"] = calibrate_clip(work / "public", public.parents[2].name, config, public, private)
        if PUBLIC_ONLY not in results:
            results[PUBLIC_ONLY] = _evaluate_standard(work / "public", public, config, pooled, "public")
            results_file.write_text(json.dumps(results, indent=2))
    if STANDARD in a.runs and STANDARD not in results:
        _log(f"{task}: {STANDARD} ({STANDARD_TRAINER}, {a.rounds * a.iterations} steps)")
        start = time.time()
        checkpoint = train_standard(plan_lay.fed, plan_lay.pool, pooled, work / "standard", a.rounds, a.iterations,
                                    a.lr)
        results[STANDARD] = _evaluate_standard(work / "standard", checkpoint, config, pooled, "standard",
                                               time.time() - start)
        results_file.write_text(json.dumps(results, indent=2))
    for run_name, repeat in ((r, i) for r in a.runs if r != STANDARD for i in range(a.repeats)):
        name = run_name + (f" [{a.label}]" if a.label else "") + (f"{REPEAT}{repeat + 1}" if repeat else "")
        if name in results:
            continue
        trainer, extra = RUNS[run_name]
        seed = a.seed + repeat  # training seed: sampling, augmentation, a from-scratch model's initialisation
        lay = Layout(work, sites, run_slug(name))
        if not (lay.fed / ff.FEDERATION_FILE).exists():
            new_run(lay, plan_lay.fed, MODE_OF_TRAINER[trainer], a.rounds, 1, a.iterations, config, seed,
                    public if run_name.endswith(FROM_PUBLIC) else None, a.release_ema)
        settings = {"num_val_iterations_per_epoch": 1} if extra is None else {**private, **extra}
        settings["seed"] = seed
        lr = a.lr if extra is None or a.private_lr is None else a.private_lr
        if lr is not None:
            settings["initial_lr"] = lr
        _log(f"{task}: {name} ({trainer}, {a.rounds} rounds x {a.iterations} steps)")
        try:
            wall = None if ff.global_paths(lay.fed, a.rounds)[1].exists() else train_federated(lay, trainer, config,
                                                                                       settings, a.rounds)
            logs = lay.logs.glob("train_*.log")
            if wall is None and any(DIVERGED in log.read_text(errors="replace") for log in logs):
                raise RuntimeError(DIVERGED)  # resumed after the sites' final validation failed on it
            summary = summarise(lay, trainer, config, pooled, wall)
        except RuntimeError as e:
            if DIVERGED not in str(e):
                raise
            # a model that diverged: a row of the table, not the end of the experiment
            summary = {"diverged": f"{DIVERGED} (nnU-Net's prediction); logs in {lay.logs}"}
        summary["settings"] = settings
        if a.release_ema is not None:
            summary["release_ema_decay"] = a.release_ema
        results[name] = summary
        results_file.write_text(json.dumps(results, indent=2))
        _log(f"{task}: {name}: " + (f"DIVERGED, {summary['diverged']}" if "diverged" in summary else
                                    f"test Dice {summary['global_test_dice']}"))
    return results


def _evaluate_standard(root: Path, checkpoint: Path, config: str, pooled: Path, mode: str,
                       wall: float | None = None) -> dict:
    """A standard nnU-Net model (fold ``all``, results under ``root``) on the test set."""
    from ..nnunet.pipeline import nnunet_env

    dataset_id = int(checkpoint.parents[2].name[len("Dataset"):].split("_")[0])
    ending = json.loads((pooled / "dataset.json").read_text())["file_ending"]
    out = predict(pooled / "imagesTs", root / "predictions", dataset_id, config, STANDARD_TRAINER, nnunet_env(root),
                  root / "logs" / "predict.log", ending, fold="all")
    return {"trainer": STANDARD_TRAINER, "mode": mode, "rounds": 0, "sites": {}, "bytes_uploaded": 0,
            "global_test_dice": evaluate_folder(pooled, out), "wall_time_s": wall, "checkpoint": str(checkpoint)}


def _reference(name: str, base: str, mean: dict) -> str | None:
    """The row a private run is compared with: ``base`` (NP-FL / DP-FL) with the same start (public or not) and the
    same --label where such a row exists (e.g. the same epsilon), else without a label."""
    ref = base + (FROM_PUBLIC if FROM_PUBLIC in name else "")
    label = name[name.index(" ["):] if " [" in name else ""
    return next((r for r in (ref + label, ref) if r in mean), None)


def group_repeats(results: dict) -> dict[str, list[dict]]:
    """Results by run, the repeats of a run ("<run> #2", ...) together, in the order of their first repeat."""
    groups: dict[str, list[dict]] = {}
    for name, s in results.items():
        base, sep, number = name.rpartition(REPEAT)
        groups.setdefault(base if sep and number.isdigit() else name, []).append(s)
    return groups


def _mean_std(values: list[float]) -> str:
    """'0.812' for one value; 'mean ± sample std' for several (NaNs left out)."""
    finite = [v for v in values if not np.isnan(v)]
    if len(finite) < 2:
        return f"{nanmean(finite):.3f}"
    return f"{np.mean(finite):.3f} ± {np.std(finite, ddof=1):.3f}"


def format_task(task: str, results: dict) -> str:
    """One table per task, a row per run, its repeats as mean ± std. 'kept': the private run's mean Dice over
    NP-FL's from the same start; 'gap closed': (ADP - DP) / (NP - DP) of the mean Dice, for the ADP-FL rows."""
    groups = group_repeats(results)
    trained = {name: [s for s in runs if "diverged" not in s] for name, runs in groups.items()}
    trained = {name: runs for name, runs in trained.items() if runs}
    classes = list(next(iter(trained.values()))[0]["global_test_dice"])
    per_run = {name: [nanmean(s["global_test_dice"].values()) for s in runs] for name, runs in trained.items()}
    mean = {name: float(np.mean(values)) for name, values in per_run.items()}
    lines = [f"### {task}", "", "| run | " + " | ".join(classes) + " | mean Dice | share of NP-FL's mean Dice kept | "
             "share of the DP-FL -> NP-FL gap closed | epsilon (max over sites) | MB uploaded per site and round | "
             "training wall time |", "|---" * (len(classes) + 7) + "|"]
    for name, runs in groups.items():
        diverged = len(runs) - len(trained.get(name, []))
        label = name if len(runs) == 1 else f"{name} ({len(runs)} runs" + (f", {diverged} diverged)" if diverged else ")")
        if name not in trained:
            lines.append(f"| {label} | " + " | ".join(["diverged"] * (len(classes) + 1)) + " | - | - | - | - | - |")
            continue
        ok = trained[name]
        eps = [v["epsilon"] for s in ok for v in s["sites"].values() if v["epsilon"] is not None]
        np_ref, dp_ref = _reference(name, "NP-FL", mean), _reference(name, "DP-FL", mean)
        kept = f"{100 * mean[name] / mean[np_ref]:.0f}%" if eps and np_ref and mean[np_ref] > 0 else "-"
        closed = "-"
        if name.startswith("ADP-FL") and np_ref and dp_ref:
            gap = mean[np_ref] - mean[dp_ref]
            closed = "n/a (no gap)" if gap <= 0 else f"{100 * (mean[name] - mean[dp_ref]) / gap:.0f}%"
        walls = [s["wall_time_s"] for s in ok if s["wall_time_s"] is not None]
        wall = f"{np.mean(walls):.0f} s" if walls else "-"
        mb = "-" if not ok[0]["rounds"] else \
            f"{np.mean([s['bytes_uploaded'] / (s['rounds'] * len(s['sites'])) for s in ok]) / 1e6:.2f}"
        dice = [_mean_std([s["global_test_dice"][c] for s in ok]) for c in classes]
        lines.append(f"| {label} | " + " | ".join(dice) + f" | {_mean_std(per_run[name])} | {kept} | {closed} | "
                     f"{f'{max(eps):.2f}' if eps else '- (not private)'} | {mb} | {wall} |")
    return "\n".join(lines)


def _clip(text: str) -> float | str:
    if text == PUBLIC_CLIP:
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 or '{PUBLIC_CLIP}', not {text!r}")
    return value


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def add_arguments(p, tasks=("skin",), runs=DEFAULT_RUNS) -> None:
    p.add_argument("--work-dir", default="work_dirs/fed_compare")
    p.add_argument("--output", default=None, help="markdown file for the tables (printed anyway)")
    p.add_argument("--tasks", nargs="+", default=list(tasks), choices=tuple(CONFIGURATION))
    p.add_argument("--runs", nargs="+", default=list(runs), choices=[*RUNS, STANDARD],
                   help=f"default: {' '.join(runs)}; all: {' | '.join([*RUNS, STANDARD])}")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=10, help="private steps per round and site")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8, help="expected (Poisson) batch size of the private runs")
    p.add_argument("--clip", type=_clip, default=1.0, help="clip norm C (initial C with adaptive clipping); 'public': "
                   "the median per-case gradient norm of the public cohort at the public weights (runs from public "
                   "weights only; no privacy cost)")
    p.add_argument("--max-features", type=int, default=32, help="network width cap of the shared plan")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate of every run (default nnU-Net's 0.01)")
    p.add_argument("--private-lr", type=float, default=None, help="learning rate of the private runs (default --lr)")
    p.add_argument("--private-settings", default=None, help="JSON object of settings for every private run, e.g. "
                   "'{\"dp_trainable\": \"norm_bias\", \"augmentation_multiplicity\": 2}'")
    p.add_argument("--label", default=None, help="appended to the run names in the results (several settings in one "
                   "work dir, sharing its data, plan and public model)")
    p.add_argument("--public-cases", type=int, default=60, help="cases of the public cohort ('... from public "
                   "weights' runs)")
    p.add_argument("--public-epochs", type=int, default=20, help="epochs x --iterations steps of public pretraining")
    p.add_argument("--num-cases", type=int, default=90, help="training cases over all sites")
    p.add_argument("--num-test-cases", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--cohort-size", choices=("small", "published"), default="small", help="published: each task at its "
                   "public dataset's size over the sites (HAM10000, KiTS23, BraTS 2024; docs/experiments/COHORTS.md), "
                   "instead of --num-cases, --num-test-cases and --scale")
    p.add_argument("--release-ema", type=float, default=None, metavar="DECAY", help="every run's final model = EMA of "
                   "its global models with this decay (federation init --release-ema); use with --label")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the public cohort and the first repeat")
    p.add_argument("--repeats", type=_at_least_one, default=1, help="train every run this many times with training seeds "
                   "--seed, --seed + 1, ... (same data, plan and public model); the table shows mean ± std")


def run_all(a) -> str:
    start = time.time()
    tables = []
    for task in a.tasks:
        tables.append(format_task(task, run_task(a, task)))
        _log(f"{task} done ({time.time() - start:.0f} s so far)")
    text = "\n\n".join(tables)
    print("\n" + text)
    for path in {Path(a.work_dir) / "results.md", *([Path(a.output)] if a.output else [])}:
        path.write_text(text + "\n")
        _log(f"table written to {path}")
    return text


def add_cli(sub) -> None:
    p = sub.add_parser("fed-compare", help="NP-FL vs DP-FL vs ADP-FL (and ablations) as simulated federations on "
                                           "synthetic data, with a result table")
    add_arguments(p)
    p.set_defaults(func=_cmd)


def check_clip_choice(a) -> None:
    """--clip public needs the public model: every private run must start from it."""
    scratch = [n for n in a.runs if n in RUNS and RUNS[n][1] is not None and not n.endswith(FROM_PUBLIC)]
    if a.clip == PUBLIC_CLIP and (scratch or not any(n.endswith(FROM_PUBLIC) for n in a.runs)):
        raise SystemExit(f"error: --clip {PUBLIC_CLIP} is calibrated on the public model: use it with private runs "
                         f"'...{FROM_PUBLIC}' only" + (f" (not {', '.join(scratch)})" if scratch else ""))


def _cmd(a) -> int:
    check_clip_choice(a)
    run_all(a)
    return 0
