"""DP-Morph experiment (issue 5, item 6): at one site, each clipping rule (flat, Auto-S, NSGD, PSAC) without and with
morphology, and the adaptive variant, at the same epsilon and steps; Dice and HD95 per class on held-out test cases,
plus the gradient-alignment plots of the runs.

    python scripts/morph_experiment.py --work-dir work_dirs/morph_experiment --output work_dirs/morph_experiment/tables.md
    (the measured tables are kept in docs/experiments/DPMORPH.md)

Resumable: each (task, run) result is kept in <work-dir>/<task>/results.json. The plan is nnU-Net's own, with the
network width capped (--max-features) as in the ADP-FL experiment.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nnunet_adpfl.evaluation import alignment
from nnunet_adpfl.cli import install_sigterm_handler
from nnunet_adpfl.workflows.stages import CONFIGURATION
from nnunet_adpfl.evaluation.evaluation import evaluate_folder, mean_per_label
from nnunet_adpfl.federation.plan import cap_features
from nnunet_adpfl.evaluation.metrics import nanmean
from nnunet_adpfl.nnunet.pipeline import nnunet_env, run
from nnunet_adpfl.data.synthetic import generate_dataset

RULES = {"flat": "nnUNetTrainerDPSGD", "autos": "nnUNetTrainerAutoS", "nsgd": "nnUNetTrainerNSGD",
         "psac": "nnUNetTrainerPSAC"}
RUNS = {**{rule: (trainer, {}) for rule, trainer in RULES.items()},
        **{f"{rule} + morph": ("nnUNetTrainerDPMorph", {"clipping_rule": rule}) for rule in RULES},
        "flat + adaptive morph": ("nnUNetTrainerDPMorphAdaptive", {"clipping_rule": "flat"})}


def _log(msg: str) -> None:
    print(f"[morph-experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(dataset: Path, predictions: Path) -> dict:
    records = evaluate_folder(dataset, predictions, metrics=("dice", "hd95"))
    return {metric: mean_per_label(records, metric) for metric in ("dice", "hd95")}


def run_task(a, task: str) -> dict:
    work = Path(a.work_dir).resolve() / task
    config = CONFIGURATION[task]
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    env = nnunet_env(work / "shared", nnUNet_n_proc_DA="1")
    raw = Path(env["nnUNet_raw"])
    dataset = next(raw.glob("Dataset501_*"), None)
    if dataset is None:
        _log(f"{task}: writing {a.num_cases} synthetic training cases + {a.num_test_cases} test cases")
        dataset = generate_dataset(task, raw, 501, num_cases=a.num_cases, num_sites=1,
                                   num_test_cases=a.num_test_cases, seed=a.seed, scale=a.scale)
    plans_file = Path(env["nnUNet_preprocessed"]) / dataset.name / "nnUNetPlans.json"
    if not any(plans_file.parent.glob(f"nnUNetPlans_{config}")):
        _log(f"{task}: nnUNetv2_plan_and_preprocess ({config}), width capped at {a.max_features}")
        run(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", config, "-np", "2"], env, work / "plan.log")
        plans_file.write_text(json.dumps(cap_features(json.loads(plans_file.read_text()), a.max_features), indent=2))
    common = {"target_epsilon": a.epsilon, "expected_batch_size": a.batch_size, "num_epochs": a.epochs,
              "num_iterations_per_epoch": a.iterations, "num_val_iterations_per_epoch": 1, "log_alignment": True}
    if a.lr is not None:
        common["initial_lr"] = a.lr
    for name in a.runs:
        if name in results:
            continue
        trainer, extra = RUNS[name]
        slug = "".join(c if c.isalnum() else "_" for c in name)
        settings = work / "settings" / f"{slug}.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps({**common, **extra}, indent=2))
        run_env = {**env, "nnUNet_results": str(work / "results" / slug), "nnUNet_adpfl_config": str(settings)}
        _log(f"{task}: {name} ({trainer}, {a.epochs} x {a.iterations} steps)")
        start = time.time()
        run(["nnUNetv2_train", "501", config, "0", "-tr", trainer, "-device", "cpu"], run_env,
            work / "logs" / f"{slug}_train.log")
        wall = time.time() - start
        pred = work / "predictions" / slug
        run(["nnUNetv2_predict", "-i", str(dataset / "imagesTs"), "-o", str(pred), "-d", "501", "-c", config, "-f",
             "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], run_env,
            work / "logs" / f"{slug}_predict.log")
        fold = work / "results" / slug / dataset.name / f"{trainer}__nnUNetPlans__{config}" / "fold_0"
        report = json.loads((fold / "privacy_report.json").read_text())
        results[name] = {**evaluate(dataset, pred), "epsilon": report["epsilon"], "fold": str(fold),
                         "train_wall_time_s": wall}
        results_file.write_text(json.dumps(results, indent=2))
        _log(f"{task}: {name}: Dice {results[name]['dice']}, HD95 {results[name]['hd95']}")
    return results


def format_task(task: str, results: dict) -> str:
    classes = list(next(iter(results.values()))["dice"])
    head = " | ".join(f"Dice {c}" for c in classes) + " | " + " | ".join(f"HD95 {c} (mm)" for c in classes)
    lines = [f"### {task}", "", f"| run | {head} | mean Dice | epsilon | training wall time |",
             "|---" * (2 * len(classes) + 4) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['dice'][c]:.3f}" for c in classes) + " | " +
                     " | ".join(f"{r['hd95'][c]:.1f}" for c in classes) +
                     f" | {nanmean(r['dice'].values()):.3f} | {r['epsilon']:.2f} | "
                     f"{r['train_wall_time_s']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    install_sigterm_handler()  # a scheduler's SIGTERM stops the running training too
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="work_dirs/morph_experiment")
    p.add_argument("--output", default=None, help="markdown file for the tables (printed anyway)")
    p.add_argument("--plots", default=None, help="folder for the alignment PNGs (default: <work-dir>/<task>/alignment)")
    p.add_argument("--tasks", nargs="+", default=["kidney", "skin"], choices=tuple(CONFIGURATION))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: nnU-Net's 0.01)")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--batch-size", type=int, default=8, help="expected (Poisson) batch size")
    p.add_argument("--max-features", type=int, default=32)
    p.add_argument("--num-cases", type=int, default=60)
    p.add_argument("--num-test-cases", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tables = []
    for task in a.tasks:
        results = run_task(a, task)
        tables.append(format_task(task, results))
        plots = Path(a.plots) / task if a.plots else Path(a.work_dir) / task / "alignment"
        tables.append(alignment.analyse([r["fold"] for r in results.values()], list(results), plots))
    text = "\n\n".join(tables)
    print("\n" + text)
    if a.output:
        Path(a.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
