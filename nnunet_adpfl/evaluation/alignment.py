"""Gradient-alignment analysis over several training runs (DESIGN.md §2): one PNG per metric plus a table.

Reads the per-epoch logs a DP trainer writes with ``log_alignment: true`` (in the fold's local_only_log.json: they
are unnoised, so never in a checkpoint): cos(mean raw gradient, mean clipped gradient) and cos(mean raw gradient,
noisy step), next to epsilon (from the checkpoint).

    nnunet-adpfl alignment <fold folder> [<fold folder> ...] --names flat autos ... -o alignment/
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..privacy.local_log import read_local_log

METRICS = {"cos_raw_clipped": "cos(raw, clipped)", "cos_raw_noisy": "cos(raw, noisy step)"}


def read_logs(fold: str | Path) -> dict[str, list[float]]:
    """Per-epoch alignment of one run (local_only_log.json) and epsilon (checkpoint_final.pth, else _latest)."""
    import torch

    fold = Path(fold)
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if (fold / name).is_file():
            logging = torch.load(fold / name, map_location="cpu", weights_only=False)["logging"]
            break
    else:
        raise FileNotFoundError(f"no checkpoint_final.pth or checkpoint_latest.pth in {fold}")
    local = read_local_log(fold)
    missing = [k for k in METRICS if k not in local]
    if missing:
        raise ValueError(f"{fold}: no alignment logs {missing}; train with the setting log_alignment: true")
    return {**{k: local[k] for k in METRICS}, "epsilon": [float(v) for v in logging.get("epsilon", [])]}


def _summary(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    return (float(np.mean(finite)), finite[-1]) if finite else (float("nan"), float("nan"))


def analyse(folds: list[str | Path], names: list[str], output: str | Path) -> str:
    """Write <output>/<metric>.png for each metric and <output>/alignment.md; return the table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(names) != len(folds):
        raise ValueError(f"{len(folds)} runs but {len(names)} names")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    logs = {name: read_logs(fold) for name, fold in zip(names, folds)}
    for metric, title in METRICS.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, log in logs.items():
            ax.plot(range(len(log[metric])), log[metric], marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(f"gradient alignment: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output / f"{metric}.png", dpi=100)
        plt.close(fig)
    lines = ["| run | " + " | ".join(f"{t} mean | {t} last epoch" for t in METRICS.values()) + " | epsilon |",
             "|---" * (2 * len(METRICS) + 2) + "|"]
    for name, log in logs.items():
        cells = []
        for metric in METRICS:
            mean, last = _summary(log[metric])
            cells += [f"{mean:.3f}", f"{last:.3f}"]
        eps = _summary(log.get("epsilon", []))[1]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {eps:.2f} |")
    table = "\n".join(lines)
    (output / "alignment.md").write_text(table + "\n")
    return table


def add_cli(sub) -> None:
    p = sub.add_parser("alignment", help="gradient-alignment plots and table from several runs' fold folders")
    p.add_argument("folds", nargs="+", help="nnU-Net fold folders of runs trained with log_alignment: true")
    p.add_argument("--names", nargs="+", default=None, help="one label per run (default: the trainer folder names)")
    p.add_argument("-o", "--output", default="alignment")
    p.set_defaults(func=_cmd)


def _cmd(a) -> int:
    names = a.names or [Path(f).resolve().parent.name.split("__")[0] for f in a.folds]
    print(analyse(a.folds, names, a.output))
    print(f"plots and table in {a.output}")
    return 0
