"""``nnunet-adpfl demo``: synthetic data -> nnU-Net plan -> train (standard + DP) -> predict -> table.

Every stage is skipped when its output exists, so an interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..data.synthetic import TASKS, generate_dataset
from ..evaluation.metrics import nanmean
from ..nnunet.pipeline import nnunet_env, predict, run
from ..privacy.report import REPORT_NAME
from .stages import CONFIGURATION, evaluate_folder

DEFAULT_TRAINERS = ("nnUNetTrainerBaselineBudget", "nnUNetTrainerDPSGD", "nnUNetTrainerAutoS")
DATASET_ID = 501


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(work_dir: Path, task: str, trainers: list[str], epochs: int, iterations: int, epsilon: float,
             num_cases: int, scale: float, seed: int) -> list[dict]:
    work_dir = Path(work_dir).resolve()
    env = nnunet_env(work_dir, nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"))
    config = CONFIGURATION[task]
    raw = Path(env["nnUNet_raw"])
    dataset = next(raw.glob(f"Dataset{DATASET_ID:03d}_*"), None)
    if dataset is None or not (dataset / "dataset.json").exists():
        _log(f"writing synthetic '{task}' dataset ({num_cases} training + 4 test cases) to {raw}")
        dataset = generate_dataset(task, raw, DATASET_ID, num_cases=num_cases, num_sites=1, num_test_cases=4,
                                   seed=seed, scale=scale)
    ending = json.loads((dataset / "dataset.json").read_text())["file_ending"]
    preprocessed = Path(env["nnUNet_preprocessed"]) / dataset.name
    if not (preprocessed / "nnUNetPlans.json").exists() or not any(preprocessed.glob(f"nnUNetPlans_{config}")):
        _log(f"planning and preprocessing ({config}) with nnUNetv2_plan_and_preprocess")
        t = run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", config, "-np", "2"], env,
                work_dir / "plan_and_preprocess.log")
        _log(f"  done in {t:.0f} s")

    settings = {"target_epsilon": epsilon, "num_epochs": epochs, "num_iterations_per_epoch": iterations,
                "num_val_iterations_per_epoch": max(1, iterations // 5)}
    settings_file = work_dir / "settings.json"
    settings_file.write_text(json.dumps(settings, indent=2))
    env["nnUNet_adpfl_config"] = str(settings_file)

    rows = []
    for trainer in trainers:
        fold = (Path(env["nnUNet_results"]) / dataset.name / f"{trainer}__nnUNetPlans__{config}" / "fold_0")
        logs = work_dir / "logs"
        logs.mkdir(exist_ok=True)
        train_time = None
        if not (fold / "checkpoint_final.pth").exists():
            _log(f"training {trainer}: {epochs} epochs x {iterations} steps (log: {logs / (trainer + '_train.log')})")
            train_time = run(["nnUNetv2_train", str(DATASET_ID), config, "0", "-tr", trainer, "-device", "cpu"],
                             env, logs / f"{trainer}_train.log")
            _log(f"  trained in {train_time:.0f} s")
        _log(f"predicting the test set with {trainer}")
        pred = predict(dataset / "imagesTs", work_dir / "predictions" / trainer, DATASET_ID, config, trainer, env,
                       logs / f"{trainer}_predict.log", ending)
        report_file = fold / REPORT_NAME
        privacy = json.loads(report_file.read_text()) if report_file.exists() else None
        rows.append({"trainer": trainer, "epsilon": privacy["epsilon"] if privacy else None,
                     "delta": privacy["delta"] if privacy else None,
                     "dice": evaluate_folder(dataset, pred), "train_time_s": train_time})
    (work_dir / "results.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    (work_dir / "results.md").write_text(table + "\n")
    print("\n" + table)
    return rows


def format_table(rows: list[dict]) -> str:
    labels = list(rows[0]["dice"]) if rows else []
    head = ["trainer", "epsilon", "delta", *[f"Dice {name}" for name in labels], "mean Dice", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = list(r["dice"].values())
        eps = "inf (not private)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        lines.append("| " + " | ".join([
            r["trainer"], eps, "-" if r["delta"] is None else f"{r['delta']:g}",
            *[f"{v:.3f}" for v in values], f"{nanmean(values):.3f}",
            "-" if r["train_time_s"] is None else f"{r['train_time_s']:.0f}"]) + " |")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic data -> plan -> train standard and DP nnU-Net -> predict -> table")
    p.add_argument("--work-dir", default="work_dirs/demo", help="folder for all data, models and results")
    p.add_argument("--task", choices=TASKS, default="skin", help="skin (2D, fastest), kidney, kidney_roi or brain (3D)")
    p.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS), help="comma-separated trainer names")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--iterations", type=int, default=20, help="steps per epoch")
    p.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of the DP trainers")
    p.add_argument("--num-cases", type=int, default=16)
    p.add_argument("--scale", type=float, default=0.5, help="spatial scale of the synthetic images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a) -> int:
    run_demo(Path(a.work_dir), a.task, [t for t in a.trainers.split(",") if t], a.epochs, a.iterations, a.epsilon,
             a.num_cases, a.scale, a.seed)
    return 0
