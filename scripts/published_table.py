"""Issue 39, item 3: the published ADP-FL table (HAM10000 lesion, KiTS23 tumour+cyst, BraTS 2024 necrotic core)
reproduced from scratch on the published-scale synthetic cohorts, with the project's defaults.

Grid: tasks x methods (NP-FL, DP-FL, ADP-FL with our defaults = adaptive clipping only, ADP-FL with all three
mechanisms as published) x seeds, at epsilon 8 (skin also 4 and 1), 3 sites, no per-task tuning. Every run is a
``nnunet-adpfl fed-compare`` run (the stock trainers; its results.json holds each finished run and is what makes
the grid resumable: a killed grid, started again with the same command, skips the finished runs). The private runs
leave the expected batch size to the trainers (``expected_batch_size: null``: their default), everything else is
fed-compare's default (clip norm 1, nnU-Net's learning rate, width cap 32).

The reported class is scored here from the saved test predictions: skin lesion (label 1), kidney_roi tumour+cyst
(labels 2 and 3 together, KiTS23's "masses" region as the published table reports it), brain necrotic core
(label 2). Per case Dice, NaN where reference and prediction are both empty, mean over the test cases.

    python scripts/published_table.py run --tasks skin --seeds 3 --rounds 5 --iterations 10
    python scripts/published_table.py table          # the table of what is finished, any time

The full grid on one GPU (the sites' nnUNetv2_train and nnUNetv2_predict on cuda, 20 rounds x 25 steps):

    python scripts/published_table.py run --device cuda --seeds 3 --rounds 20 --iterations 25 \
        --work-dir work_dirs/published_table_gpu

Where the published cohort does not fit, ``--num-cases N`` runs the task at N training cases over the 3 sites (the
published cohort's scale and test set size), ``--scale`` at fewer voxels per case and ``--max-features`` with a
narrower network, each in its own folder. ``--until HH:MM`` (UTC) starts no run after then.
"""
from __future__ import annotations

import argparse
import calendar
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

PUBLISHED = {  # task -> (published dataset and class, Dice % of NP-FL, DP-FL, ADP-FL at epsilon 8)
    "skin": ("HAM10000 lesion", {"NP-FL": 93.1, "DP-FL": 85.4, "ADP-FL": 92.8}),
    "kidney_roi": ("KiTS23 tumour+cyst", {"NP-FL": 81.0, "DP-FL": 69.1, "ADP-FL": 77.3}),
    "brain": ("BraTS 2024 necrotic core", {"NP-FL": 57.6, "DP-FL": 24.7, "ADP-FL": 42.1}),
}
REPORTED = {"skin": ("lesion", (1,)), "kidney_roi": ("tumour+cyst", (2, 3)), "brain": ("necrotic core", (2,))}
EPSILONS = {"skin": (8.0, 4.0, 1.0), "kidney_roi": (8.0,), "brain": (8.0,)}
NP, DP, ADP_DEFAULTS, ADP_ALL = "NP-FL", "DP-FL", "ADP-FL (defaults)", "ADP-FL (all mechanisms)"
METHODS = (NP, DP, ADP_DEFAULTS, ADP_ALL)
SIDECAR = "published_table_runs.json"  # per run: wall time with evaluation, load, the DP defaults' choice
DEFAULT_ROOT = "work_dirs/published_table"


def _log(msg: str) -> None:
    print(f"[published-table {time.strftime('%H:%M:%S', time.gmtime())} UTC] {msg}", flush=True)


def eps_label(epsilon: float) -> str:
    return f"eps {epsilon:g}"


def run_name(method: str, epsilon: float | None, seed_index: int) -> str:
    """The name fed-compare gives the run: NP-FL is not private (one run per seed for every epsilon); the private
    runs carry the epsilon as fed-compare's --label; seed k > 1 is fed-compare's repeat '#k'."""
    label = "" if method == NP else f" [{eps_label(epsilon)}]"
    return f"{method}{label}" + (f" #{seed_index}" if seed_index > 1 else "")


def run_slug(name: str) -> str:
    """fed_experiment.run_slug (without importing torch): the run's folder name."""
    return "run_" + "".join(c if c.isalnum() else "_" for c in name.lower())


def cohort_folder(root: Path, num_cases: int | None, scale: float | None = None,
                  max_features: int | None = None) -> Path:
    """One folder per cohort and compute setting: runs of other sizes, scales or widths never share a table."""
    name = "published" if num_cases is None else f"{num_cases}cases"
    name += "" if scale is None else f"_scale{scale:g}"
    return root / (name + ("" if max_features is None else f"_width{max_features}"))


def grid(tasks: list[str], seeds: int, methods: list[str], epsilons: dict | None = None) -> list[tuple]:
    """(task, seed index, epsilon or None, method) in the order run: per task, seed by seed (a whole table row per
    seed comes first), epsilon 8 first; NP-FL once per seed."""
    order = []
    for task in tasks:
        for seed in range(1, seeds + 1):
            if NP in methods:
                order.append((task, seed, None, NP))
            for eps in (epsilons or EPSILONS)[task]:
                order += [(task, seed, eps, m) for m in methods if m != NP]
    return order


# --- scoring -----------------------------------------------------------------------------------------------------

def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """nnU-Net's convention: NaN where both are empty."""
    total = int(reference.sum()) + int(prediction.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(reference, prediction).sum()) / total


def read_label(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def score_predictions(labels_dir: Path, predictions_dir: Path, labels: tuple[int, ...], ending: str) -> dict:
    """Mean over the test cases of the Dice of the union of ``labels``; every reference needs its prediction."""
    refs = sorted(labels_dir.glob(f"*{ending}"))
    if not refs:
        raise FileNotFoundError(f"no test labels ({ending}) in {labels_dir}")
    per_case = []
    for ref in refs:
        pred = predictions_dir / ref.name
        if not pred.exists():
            raise FileNotFoundError(f"prediction {pred} missing (test label {ref})")
        per_case.append(dice(np.isin(read_label(ref), labels), np.isin(read_label(pred), labels)))
    finite = [d for d in per_case if not math.isnan(d)]
    return {"dice": float(np.mean(finite)) if finite else math.nan, "cases": len(per_case), "scored": len(finite)}


# --- running -----------------------------------------------------------------------------------------------------

def fed_compare_args(task: str, work_dir: Path, a, method: str, epsilon: float | None, seed_index: int):
    from nnunet_adpfl.workflows import fed_experiment as fe

    p = argparse.ArgumentParser()
    fe.add_arguments(p)
    argv = ["--tasks", task, "--work-dir", str(work_dir), "--runs", method, "--repeats", str(seed_index),
            "--rounds", str(a.rounds), "--iterations", str(a.iterations), "--seed", str(a.seed),
            "--private-settings", json.dumps({"expected_batch_size": None,  # the trainers' default B
                                              **({"dp_memory_limit_mib": a.dp_memory_mib} if a.dp_memory_mib is not None else {}),
                                              **json.loads(a.private_settings or "{}")})]
    if a.max_features is not None:
        argv += ["--max-features", str(a.max_features)]
    if a.num_cases is None and a.scale is None:
        argv += ["--cohort-size", "published"]
    else:
        from nnunet_adpfl.data.tasks import published_cohort

        published = published_cohort(task, a.sites)
        given = {"--num-cases": (a.num_cases, sum(published["site_cases"])), "--scale": (a.scale, published["scale"]),
                 "--num-test-cases": (a.num_test_cases, published["num_test_cases"])}
        for flag, (value, default) in given.items():  # 0 is a value (refused or kept downstream), not "unset"
            argv += [flag, str(default if value is None else value)]
    if epsilon is not None:
        argv += ["--epsilon", str(epsilon), "--label", eps_label(epsilon)]
    return p.parse_args(argv)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def dp_defaults_line(log: Path) -> str | None:
    """What the trainer chose where the settings left B (and the rest) out, from a site's training log."""
    if not log.exists():
        return None
    return next((line.split("DP defaults", 1)[1].strip(" :") for line in log.read_text(errors="replace").splitlines()
                 if "DP defaults" in line), None)


def epoch_times(log: Path) -> list[float]:
    """nnU-Net's 'Epoch time: X s' lines of a site's training log (one epoch = one round here)."""
    if not log.exists():
        return []
    return [float(line.split("Epoch time:", 1)[1].split()[0]) for line in log.read_text(errors="replace").splitlines()
            if "Epoch time:" in line]


def check_run_length(task_dir: Path, rounds: int, iterations: int) -> None:
    """One run length per task folder: the table compares runs of the same rounds x steps."""
    other = {(r["rounds"], r["iterations"]) for r in load_json(task_dir / SIDECAR).values() if "rounds" in r}
    if other - {(rounds, iterations)}:
        raise SystemExit(f"error: {task_dir} holds runs of {' and '.join(f'{r} rounds x {i} steps' for r, i in other)}"
                         f"; --rounds {rounds} --iterations {iterations} would mix run lengths in one table: use "
                         "another --work-dir")


def run_grid(a) -> None:
    from nnunet_adpfl.workflows import fed_experiment as fe

    work_dir = cohort_folder(Path(a.work_dir), a.num_cases, a.scale, a.max_features)
    epsilons = {t: tuple(a.epsilons) for t in a.tasks} if a.epsilons else None
    order = grid(a.tasks, a.seeds, a.methods, epsilons)
    deadline = _deadline(a.until)
    for task in a.tasks:
        check_run_length(work_dir / task, a.rounds, a.iterations)
    for i, (task, seed, eps, method) in enumerate(order, 1):
        name = run_name(method, eps, seed)
        task_dir = work_dir / task
        if name in load_json(task_dir / "results.json"):
            _log(f"[{i}/{len(order)}] {task}: {name}: done already")
            continue
        if deadline is not None and time.time() > deadline:
            _log(f"[{i}/{len(order)}] past --until {a.until} UTC: not starting {task}: {name} nor the "
                 f"{len(order) - i} after it")
            break
        _log(f"[{i}/{len(order)}] {task}: {name} (seed {a.seed + seed - 1}, {a.rounds} rounds x {a.iterations} "
             f"steps, load {os.getloadavg()[0]:.1f})")
        start, load = time.time(), os.getloadavg()[0]
        fe.run_task(fed_compare_args(task, work_dir, a, method, eps, seed), task)
        training_wall = load_json(task_dir / "results.json").get(name, {}).get("wall_time_s")
        sidecar, logs = load_json(task_dir / SIDECAR), task_dir / "logs" / run_slug(name)
        if name in sidecar and training_wall is None:
            pass  # summarised again (results.json lost it: grids in parallel on one folder): keep the first record
        else:
            sidecar[name] = {"wall_s_with_evaluation": time.time() - start, "training_wall_s": training_wall,
                             "load_1min_start": load, "load_1min_end": os.getloadavg()[0], "rounds": a.rounds,
                             "iterations": a.iterations,
                             "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                             "dp_defaults_site_A": dp_defaults_line(logs / "train_A.log")}
        (task_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        _log(f"[{i}/{len(order)}] {task}: {name} finished in {time.time() - start:.0f} s")
        write_table(Path(a.work_dir), a.output)


def _deadline(until: str | None) -> float | None:
    """Today's HH:MM UTC as a timestamp."""
    if until is None:
        return None
    hours, minutes = (int(x) for x in until.split(":"))
    now = time.gmtime()
    return calendar.timegm((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0, 0, 0, 0))


# --- the table -----------------------------------------------------------------------------------------------------

def collect(task_dir: Path, task: str) -> dict:
    """{run name: record} for the finished runs of a task folder: the reported class scored from the predictions
    (cached in the sidecar file), wall times, epsilon spent."""
    results = load_json(task_dir / "results.json")
    sidecar = load_json(task_dir / SIDECAR)
    pooled = next((task_dir / "pooled_raw").glob("Dataset*"), None)
    out, changed = {}, False
    for name, summary in results.items():
        extra = sidecar.setdefault(name, {})
        if "diverged" in summary:
            out[name] = {"diverged": True, **extra}
            continue
        if "reported_dice" not in extra and pooled is not None:
            ending = json.loads((pooled / "dataset.json").read_text())["file_ending"]
            preds = task_dir / f"results_{run_slug(name)}" / "predictions" / summary["trainer"]
            extra["reported_dice"] = score_predictions(pooled / "labelsTs", preds, REPORTED[task][1], ending)
            changed = True
        eps = [s["epsilon"] for s in summary["sites"].values() if s.get("epsilon") is not None]
        if "epoch_s" not in extra:  # seconds per round (nnU-Net epoch) of each site, from its training log
            logs = task_dir / "logs" / run_slug(name)
            extra["epoch_s"] = {site: epoch_times(logs / f"train_{site}.log") for site in summary["sites"]}
            changed = True
        out[name] = {"dice": extra.get("reported_dice", {}).get("dice", math.nan),
                     "wall_s": summary.get("wall_time_s") or extra.get("training_wall_s"),
                     "epsilon": max(eps) if eps else None, **extra}
    if changed:
        (task_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return out


def seeds_of(runs: dict, method: str, epsilon: float | None) -> list[dict]:
    """The records of a method's seeds (run names '<run>', '<run> #2', ...)."""
    base = run_name(method, epsilon, 1)
    return [r for name, r in runs.items() if name == base or (name.startswith(base + " #") and
                                                             name[len(base) + 2:].isdigit())]


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for one value), NaNs left out."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, None
    return float(np.mean(finite)), (float(np.std(finite, ddof=1)) if len(finite) > 1 else None)


LEARNED_DICE = 0.05  # a reference below 5 Dice points has not learned the class: no share of it is reported


def share(value: float, reference: float) -> float:
    return math.nan if not reference >= LEARNED_DICE else value / reference


def gap_closed(adp: float, dp: float, np_: float) -> float:
    """ADP-FL's share of the DP-FL -> NP-FL gap; NaN where there is no gap or NP-FL did not learn the class."""
    return math.nan if not (np_ > dp and np_ >= LEARNED_DICE) else (adp - dp) / (np_ - dp)


def _pct(x: float, digits: int = 0) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}%"


def task_rows(task: str, runs: dict, epsilon: float) -> list[dict]:
    """One row per method at ``epsilon``: Dice mean and spread over seeds, share of NP-FL, gap closed, and the
    published numbers of the same row."""
    stats = {}
    for method in METHODS:
        recs = seeds_of(runs, method, None if method == NP else epsilon)
        trained = [r for r in recs if not r.get("diverged")]
        mean, std = mean_spread([r["dice"] for r in trained])
        walls = [r["wall_s"] for r in trained if r.get("wall_s") is not None]
        epss = [r["epsilon"] for r in trained if r.get("epsilon") is not None]
        rounds = [t for r in trained for times in r.get("epoch_s", {}).values() for t in times]
        stats[method] = {"method": method, "seeds": len(recs), "diverged": len(recs) - len(trained), "mean": mean,
                         "std": std, "wall_s": float(np.mean(walls)) if walls else None,
                         "round_s": float(np.median(rounds)) if rounds else None,
                         "epsilon": max(epss) if epss else None}
    published = PUBLISHED[task][1]
    pub_np, pub_dp = published["NP-FL"], published["DP-FL"]
    for method, s in stats.items():
        s["share_of_np"] = share(s["mean"], stats[NP]["mean"]) if method != NP else math.nan
        s["gap_closed"] = (gap_closed(s["mean"], stats[DP]["mean"], stats[NP]["mean"])
                           if method.startswith("ADP-FL") else math.nan)
        pub = published["ADP-FL"] if method == ADP_ALL else published.get(method)
        s["published"] = pub
        s["published_share_of_np"] = share(pub, pub_np) if pub is not None and method != NP else math.nan
        s["published_gap_closed"] = gap_closed(pub, pub_dp, pub_np) if method == ADP_ALL else math.nan
    return list(stats.values())


def format_rows(task: str, epsilon: float, rows: list[dict], cohort: str, length: str = "") -> str:
    dataset, _ = PUBLISHED[task]
    cls = REPORTED[task][0]
    lines = [f"### {task} ({cohort}{length}), {cls} Dice, epsilon {epsilon:g}, against {dataset} (published at "
             "epsilon 8)",
             "", "| method | Dice (mean ± std over seeds) | seeds | share of NP-FL | gap closed | published Dice | "
             "published share | published gap closed | epsilon spent (max over sites) | training wall per run | "
             "median s per round and site |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["seeds"] == 0:
            dice_text = "not run"
        elif math.isnan(r["mean"]):
            dice_text = "diverged" if r["diverged"] else "-"
        else:
            dice_text = f"{100 * r['mean']:.1f}" + (f" ± {100 * r['std']:.1f}" if r["std"] is not None else "")
        seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        pub = "-" if r["published"] is None or epsilon != 8 else f"{r['published']:.1f}"
        pub_share = "-" if epsilon != 8 else _pct(r["published_share_of_np"])
        pub_gap = "-" if epsilon != 8 else _pct(r["published_gap_closed"])
        wall = "-" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min"
        per_round = "-" if r["round_s"] is None else f"{r['round_s']:.0f} s"
        eps = "not private" if r["method"] == NP else ("-" if r["epsilon"] is None else f"{r['epsilon']:.2f}")
        lines.append(f"| {r['method']} | {dice_text} | {seeds} | {_pct(r['share_of_np'])} | {_pct(r['gap_closed'])} | "
                     f"{pub} | {pub_share} | {pub_gap} | {eps} | {wall} | {per_round} |")
    return "\n".join(lines)


def build_table(root: Path) -> str:
    parts = []
    for cohort_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for task in PUBLISHED:
            task_dir = cohort_dir / task
            if not (task_dir / "results.json").exists():
                continue
            runs = collect(task_dir, task)
            lengths = sorted({(r["rounds"], r["iterations"]) for r in runs.values() if "rounds" in r})
            length = "".join(f", {r} rounds x {i} steps" for r, i in lengths)
            for eps in EPSILONS[task]:
                rows = task_rows(task, runs, eps)
                if any(r["seeds"] for r in rows if r["method"] != NP) or eps == EPSILONS[task][0]:
                    parts.append(format_rows(task, eps, rows, cohort_dir.name, length))
    return "\n\n".join(parts) if parts else "(no finished run yet)"


def write_table(root: Path, output: str | None) -> str:
    text = build_table(root)
    for path in {root / "published_table.md", *([Path(output)] if output else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the grid, writing the table after every run")
    r.add_argument("--tasks", nargs="+", default=list(PUBLISHED), choices=tuple(PUBLISHED))
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    r.add_argument("--seeds", type=int, default=3, help="training seeds --seed, --seed + 1, ... (same data)")
    r.add_argument("--epsilons", nargs="+", type=float, default=None, help="default: 8 (skin: 8 4 1)")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--iterations", type=int, default=10, help="steps per round and site")
    r.add_argument("--sites", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-cases", type=int, default=None, help="training cases over all sites instead of the "
                   "published cohort (at the published cohort's scale); its own folder under --work-dir")
    r.add_argument("--num-test-cases", type=int, default=None, help="with --num-cases or --scale (default: the "
                   "published one's)")
    r.add_argument("--scale", type=float, default=None, help="spatial scale of the cases instead of the published "
                   "cohort's (compute: fewer voxels per case); its own folder under --work-dir")
    r.add_argument("--max-features", type=int, default=None, help="network width cap of the shared plan instead of "
                   "fed-compare's 32 (compute); its own folder under --work-dir")
    r.add_argument("--device", default=None, help="device of the sites' training and of prediction (e.g. cuda; "
                   "default cpu): sets $nnUNet_adpfl_device for the runs")
    r.add_argument("--dp-memory-mib", type=int, default=None, help="dp_memory_limit_mib of every private run: the "
                   "memory bound of each site's per-case gradient chunks (compute only: the same gradients; default: "
                   "the trainers' 25%% of the available RAM per site, which 3 sites and other work can overrun)")
    r.add_argument("--private-settings", default=None, help="JSON object of settings for every private run, e.g. "
                   "'{\"dp_defaults\": \"nnunet\"}' (the plan's batch instead of the DP defaults' B); use its own "
                   "--work-dir: the run names do not carry it")
    r.add_argument("--until", default=None, metavar="HH:MM", help="start no run after this time (UTC)")
    t = sub.add_parser("table", help="the table of the finished runs")
    for q in (r, t):
        q.add_argument("--work-dir", default=DEFAULT_ROOT)
        q.add_argument("--output", default=None, help="markdown file for the table (also <work-dir>/published_table.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("nnUNet_compile", "f")
    if a.command == "run":
        if a.device:
            os.environ["nnUNet_adpfl_device"] = a.device
        run_grid(a)
    print(write_table(Path(a.work_dir), a.output))
    return 0


if __name__ == "__main__":
    from nnunet_adpfl.cli import install_sigterm_handler

    install_sigterm_handler()  # a scheduler's SIGTERM stops the running federation's sites too
    sys.exit(main())
