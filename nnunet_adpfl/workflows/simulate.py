"""``nnunet-adpfl simulate``: a whole federation on one machine, every party a separate process.

synthetic multi-site data -> per-site aggregate fingerprints -> one federated plan -> per-site preprocessing ->
aggregator + N sites running the stock ``nnUNetv2_train`` -> summary table. Resumable: finished stages are kept.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..evaluation.metrics import nanmean
from ..federation import files as ff
from ..federation.aggregator import create_federation, load_federation
from .stages import (CONFIGURATION, MODE_OF_TRAINER, Layout, stage_data, stage_plan, summarise,
                     train_federated)


def _log(msg: str) -> None:
    print(f"[simulate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def format_summary(s: dict) -> str:
    lines = [f"## {s['trainer']} ({s['mode']}, {s['rounds']} rounds)", "",
             "| site | validation Dice (local cases) | epsilon |", "|---|---|---|"]
    for site, v in s["sites"].items():
        eps = "-" if v["epsilon"] is None else f"{v['epsilon']:.2f}"
        lines.append(f"| {site} | {v['validation_dice']:.3f} | {eps} |")
    wall = "-" if s["wall_time_s"] is None else f"{s['wall_time_s']:.0f} s"
    dice = s["global_test_dice"]
    lines += ["", "| global model on the test set | " + " | ".join(dice) + " | mean |",
              "|---|" + "---|" * (len(dice) + 1),
              "| Dice | " + " | ".join(f"{x:.3f}" for x in dice.values()) +
              f" | {nanmean(dice.values()):.3f} |", "",
              f"bytes uploaded (all sites, all rounds): {s['bytes_uploaded'] / 1e6:.1f} MB; "
              f"global models written: {s['bytes_downloaded_per_site'] / 1e6:.1f} MB; per round and site: "
              f"{s['bytes_uploaded'] / max(1, s['rounds'] * len(s['sites'])) / 1e6:.1f} MB up",
              f"wall time of the federated training: {wall}"]
    return "\n".join(lines)


def run_simulation(work_dir: Path, task: str, trainer: str, num_sites: int, rounds: int, epochs_per_round: int,
                   iterations: int, epsilon: float, num_cases: int, scale: float, seed: int,
                   transport: str = "folder") -> dict:
    if trainer not in MODE_OF_TRAINER:
        raise SystemExit(f"error: --trainer must be one of {sorted(MODE_OF_TRAINER)}")
    lay = Layout(Path(work_dir).resolve(), [chr(ord("A") + i) for i in range(num_sites)])
    lay.logs.mkdir(parents=True, exist_ok=True)
    config = CONFIGURATION[task]
    pooled = stage_data(lay, task, num_cases, scale, seed)
    if not (lay.fed / ff.FEDERATION_FILE).exists():
        create_federation(lay.fed, lay.keys, lay.sites, rounds, epochs_per_round, MODE_OF_TRAINER[trainer],
                          iterations_per_epoch=iterations, configuration=config, seed=seed)
    if load_federation(lay.fed)["mode"] != MODE_OF_TRAINER[trainer]:
        raise SystemExit(f"error: {lay.fed} holds a '{load_federation(lay.fed)['mode']}' federation; use another "
                         "--work-dir for this trainer")
    stage_plan(lay, pooled, config)
    privacy = {"target_epsilon": epsilon, "num_val_iterations_per_epoch": max(1, iterations // 5)}
    wall = None
    if not ff.global_paths(lay.fed, rounds)[1].exists() or not all(
            (Path(lay.site_env(s)["nnUNet_results"]) / pooled.name / f"{trainer}__nnUNetPlans__{config}" / "fold_0" /
             "checkpoint_final.pth").exists() for s in lay.sites):
        _log(f"federated training: {trainer}, {rounds} rounds x {epochs_per_round} epochs x {iterations} steps")
        if transport == "flower":  # the same sites and aggregator, over Flower (TLS, node authentication, loopback)
            from .flower_simulate import train_federated_flower
            wall = train_federated_flower(lay, trainer, config, privacy, rounds, log=_log)
        else:
            wall = train_federated(lay, trainer, config, privacy, rounds)
    summary = summarise(lay, trainer, config, pooled, wall)
    (lay.work / "summary.json").write_text(json.dumps(summary, indent=2))
    text = format_summary(summary)
    (lay.work / "summary.md").write_text(text + "\n")
    print("\n" + text)
    return summary


def add_cli(sub) -> None:
    p = sub.add_parser("simulate", help="a whole federation on this machine (aggregator + sites as processes)")
    p.add_argument("--work-dir", default="work_dirs/simulate")
    p.add_argument("--task", choices=tuple(CONFIGURATION), default="skin", help="skin (2D, fastest), kidney, kidney_roi or brain")
    p.add_argument("--trainer", default="nnUNetTrainerDPFL", help=f"one of {sorted(MODE_OF_TRAINER)}")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs-per-round", type=int, default=1)
    p.add_argument("--iterations", type=int, default=10, help="steps per epoch")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--num-cases", type=int, default=24, help="training cases over all sites")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", choices=("folder", "flower"), default="folder",
                   help="folder: one shared folder; flower: each site its own folder, synchronised over Flower")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(a) -> int:
    run_simulation(Path(a.work_dir), a.task, a.trainer, a.sites, a.rounds, a.epochs_per_round, a.iterations,
                   a.epsilon, a.num_cases, a.scale, a.seed, a.transport)
    return 0
