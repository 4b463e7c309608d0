"""``nnunet-adpfl fed-compare``: NP-FL, DP-FL, ADP-FL (and ADP-FL minus each mechanism) as simulated 3-site
federations on one synthetic task, the same rounds x steps for every run and the same epsilon for the private
ones; per-class Dice of each final global model on held-out test cases, epsilon and bytes uploaded, and the ratios
of mean Dice: the share of NP-FL's, ADP-FL's share of the DP-FL -> NP-FL gap and, for runs from public weights, the
gain kept over the public model alone ((private - public only) / (NP-FL - public only)). Table: <work-dir>/results.md,
its numbers: <work-dir>/results_table.json.

Resumable: each run keeps its result in <work-dir>/<task>/results.json and is skipped when present. All runs of a
task share one dataset, one federated plan and one preprocessing (nnunet_adpfl.simulate).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..common.config import SettingsError, load_settings
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
NP_FROM_PUBLIC = "NP-FL" + FROM_PUBLIC
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
               **({} if a.clip in (None, PUBLIC_CLIP) else {"max_grad_norm": a.clip}),
               "num_val_iterations_per_epoch": 1, **json.loads(a.private_settings or "{}")}
    public = None
    if PUBLIC_ONLY in a.runs or any(name.endswith(FROM_PUBLIC) for name in a.runs):
        public_scale = a.scale if a.public_scale is None else a.public_scale
        public = pretrain_public(plan_lay.fed, task, work / "public", a.public_cases, public_scale, a.seed,
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
                                    a.lr, a.seed)
        results[STANDARD] = _evaluate_standard(work / "standard", checkpoint, config, pooled, "standard",
                                               time.time() - start)
        results_file.write_text(json.dumps(results, indent=2))
    for run_name, repeat in ((r, i) for r in a.runs if r not in (STANDARD, PUBLIC_ONLY) for i in range(a.repeats)):
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


# A ratio of mean Dice is reported only when its denominator is at least this: below half a Dice point the
# denominator is within one seed's run-to-run spread (skin, 3 seeds: +-0.003), so the ratio would be noise.
MIN_DENOMINATOR = 0.005


def ratio(numerator: float, denominator: float, what: str) -> dict:
    """{"value": numerator / denominator} or, where that means nothing, {"value": None, "reason": ...} (never inf
    or NaN). ``what`` names the denominator in the reason."""
    if not (np.isfinite(numerator) and np.isfinite(denominator)):
        return {"value": None, "reason": "Dice undefined (no test case has the class)"}
    if denominator < MIN_DENOMINATOR:
        return {"value": None, "reason": f"{what} = {denominator:.3f} < {MIN_DENOMINATOR}"}
    return {"value": numerator / denominator}


def comparisons(name: str, mean: dict[str, float], private: bool) -> dict:
    """A row's ratios of mean Dice, each {"value", "reference"/"references"} or with "reason" where n/a; absent
    where it does not apply. ``share_of_np_fl``: the run over NP-FL from the same start (private runs, and the
    public model alone); ``gap_closed``: (ADP - DP) / (NP - DP), ADP-FL runs; ``gain_kept``: (private - public only)
    / (NP-FL - public only), private runs from public weights: what private training adds over the public model."""
    np_ref = NP_FROM_PUBLIC if name == PUBLIC_ONLY else _reference(name, "NP-FL", mean)
    if np_ref not in mean or not (private or name == PUBLIC_ONLY):
        return {}
    out = {"share_of_np_fl": {**ratio(mean[name], mean[np_ref], f"{np_ref} Dice"), "reference": np_ref}}
    dp_ref = _reference(name, "DP-FL", mean)
    if private and name.startswith("ADP-FL") and dp_ref:
        out["gap_closed"] = {**ratio(mean[name] - mean[dp_ref], mean[np_ref] - mean[dp_ref],
                                     f"gap {np_ref} - {dp_ref}"), "references": [dp_ref, np_ref]}
    if private and FROM_PUBLIC in name and PUBLIC_ONLY in mean:
        out["gain_kept"] = {**ratio(mean[name] - mean[PUBLIC_ONLY], mean[np_ref] - mean[PUBLIC_ONLY],
                                    f"gain {np_ref} - public only"), "references": [PUBLIC_ONLY, np_ref]}
    return out


def _stats(values: list[float]) -> dict:
    """Mean, sample std and the values, NaN (a class no test case has) left out of the statistics and written as
    None, so the JSON stays standard."""
    finite = [float(v) for v in values if not np.isnan(v)]
    return {"mean": nanmean(finite) if finite else None,
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "values": [None if np.isnan(v) else float(v) for v in values]}


def table_rows(results: dict) -> list[dict]:
    """One row per run (its repeats together) with what the table shows, as numbers: per-class and mean Dice
    (mean, sample std, every repeat's value), the ratios of :func:`comparisons`, epsilon, uploads, wall time."""
    groups = group_repeats(results)
    trained = {name: [s for s in runs if "diverged" not in s] for name, runs in groups.items()}
    trained = {name: runs for name, runs in trained.items() if runs}
    per_run = {name: [nanmean(s["global_test_dice"].values()) for s in runs] for name, runs in trained.items()}
    mean = {name: nanmean(values) for name, values in per_run.items()}
    rows = []
    for name, runs in groups.items():
        row = {"run": name, "runs": len(runs), "diverged": len(runs) - len(trained.get(name, []))}
        rows.append(row)
        if name not in trained:
            continue
        ok = trained[name]
        eps = [v["epsilon"] for s in ok for v in s["sites"].values() if v["epsilon"] is not None]
        walls = [s["wall_time_s"] for s in ok if s["wall_time_s"] is not None]
        row.update({
            "dice": {c: _stats([s["global_test_dice"][c] for s in ok]) for c in ok[0]["global_test_dice"]},
            "mean_dice": _stats(per_run[name]), "epsilon": max(eps) if eps else None,
            "mb_uploaded_per_site_and_round": None if not ok[0]["rounds"] else
            float(np.mean([s["bytes_uploaded"] / (s["rounds"] * len(s["sites"])) for s in ok]) / 1e6),
            "wall_time_s": float(np.mean(walls)) if walls else None, **comparisons(name, mean, bool(eps))})
    return rows


def _mean_std(stats: dict) -> str:
    """'0.812' for one value; 'mean ± sample std' for several (NaNs left out); 'nan' where no value is defined."""
    if stats["mean"] is None:
        return "nan"
    return f"{stats['mean']:.3f}" if stats["std"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _percent(row: dict, key: str) -> str:
    """A ratio's cell: '85%', 'n/a (<reason>)', or '-' where it does not apply."""
    if key not in row:
        return "-"
    value = row[key]["value"]
    return f"n/a ({row[key]['reason']})" if value is None else f"{100 * value:.0f}%"


COLUMNS = ("mean Dice", "share of NP-FL's mean Dice kept", "share of the DP-FL -> NP-FL gap closed",
           "gain kept over public weights only", "epsilon (max over sites)", "MB uploaded per site and round",
           "training wall time")


def format_task(task: str, results: dict) -> str:
    """One table per task, a row per run, its repeats as mean ± std (numbers: :func:`table_rows`). 'kept': the
    run's mean Dice over NP-FL's from the same start; 'gap closed': (ADP - DP) / (NP - DP) for the ADP-FL rows;
    'gain kept': (private - public only) / (NP-FL - public only) for the private runs from public weights."""
    rows = table_rows(results)
    classes = next((list(r["dice"]) for r in rows if "dice" in r), [])
    lines = [f"### {task}", "", "| run | " + " | ".join([*classes, *COLUMNS]) + " |",
             "|---" * (len(classes) + len(COLUMNS) + 1) + "|"]
    for row in rows:
        label = row["run"] if row["runs"] == 1 else \
            f"{row['run']} ({row['runs']} runs" + (f", {row['diverged']} diverged)" if row["diverged"] else ")")
        if "dice" not in row:
            lines.append(f"| {label} | " + " | ".join(["diverged"] * (len(classes) + 1) + ["-"] * (len(COLUMNS) - 1))
                         + " |")
            continue
        eps = "- (not private)" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        mb = "-" if row["mb_uploaded_per_site_and_round"] is None else f"{row['mb_uploaded_per_site_and_round']:.2f}"
        wall = "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.0f} s"
        cells = [*(_mean_std(row["dice"][c]) for c in classes), _mean_std(row["mean_dice"]),
                 *(_percent(row, k) for k in ("share_of_np_fl", "gap_closed", "gain_kept")), eps, mb, wall]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
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
    p.add_argument("--runs", nargs="+", default=list(runs), choices=[*RUNS, STANDARD, PUBLIC_ONLY],
                   help=f"default: {' '.join(runs)}; all: {' | '.join([*RUNS, STANDARD, PUBLIC_ONLY])} (the public "
                   "model on the test set, no training beyond pretraining; added whenever a run starts from it)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=10, help="private steps per round and site")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8, help="expected (Poisson) batch size of the private runs")
    p.add_argument("--clip", type=_clip, default=None, help="clip norm C (initial C with adaptive clipping); 'public': "
                   "the median per-case gradient norm of the public cohort at the public weights (runs from public "
                   "weights only; no privacy cost); default: the trainers' 1, left to them (as a clip norm given "
                   "keeps dp_trainable norm_bias from public weights, leaving it out lets the DP defaults choose)")
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
    p.add_argument("--public-scale", type=float, default=None, help="spatial scale of the public cohort (default "
                   "--scale): another value images it at another resolution than the private sites, a site shift "
                   "that nnU-Net's intensity normalisation does not remove")
    p.add_argument("--num-cases", type=int, default=90, help="training cases over all sites")
    p.add_argument("--num-test-cases", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--cohort-size", choices=("small", "published"), default="small", help="published: each task at its "
                   "public dataset's size over the sites (HAM10000, KiTS23, BraTS 2024; docs/experiments/COHORTS.md), "
                   "instead of --num-cases, --num-test-cases and --scale")
    p.add_argument("--release-ema", type=float, default=None, metavar="DECAY", help="every run's final model = EMA of "
                   "its global models with this decay (federation init --release-ema); use with --label")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the public cohort and its "
                   "training, the pooled nnU-Net and the first repeat")
    p.add_argument("--repeats", type=_at_least_one, default=1, help="train every run this many times with training seeds "
                   "--seed, --seed + 1, ... (same data, plan and public model); the table shows mean ± std")


TABLE_JSON = "results_table.json"  # in the work dir: {task: table_rows(...)}, the table's numbers


def run_all(a) -> str:
    start = time.time()
    tables, numbers = [], {}
    for task in a.tasks:
        results = run_task(a, task)
        tables.append(format_task(task, results))
        numbers[task] = table_rows(results)
        _log(f"{task} done ({time.time() - start:.0f} s so far)")
    text = "\n\n".join(tables)
    print("\n" + text)
    for path in {Path(a.work_dir) / "results.md", *([Path(a.output)] if a.output else [])}:
        path.write_text(text + "\n")
        _log(f"table written to {path}")
    (Path(a.work_dir) / TABLE_JSON).write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n")
    _log(f"the table's numbers written to {Path(a.work_dir) / TABLE_JSON}")
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


def check_private_settings(a) -> None:
    """--private-settings: a JSON object of valid settings, refused before any stage runs (not when the sites start,
    after the data and the plan)."""
    try:
        settings = json.loads(a.private_settings or "{}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --private-settings is not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise SystemExit("error: --private-settings must be a JSON object of settings")
    try:
        load_settings("", overrides=settings)  # "": no settings file of the environment
    except SettingsError as e:
        raise SystemExit(f"error: --private-settings: {e}") from None


def _cmd(a) -> int:
    check_clip_choice(a)
    check_private_settings(a)
    run_all(a)
    return 0
