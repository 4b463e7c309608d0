"""The report folder of ``nnunet-adpfl compare``: report.md (tables), per_case.csv, summary.json and PNG plots
(Dice vs epsilon, training curves, example slices with reference and predictions overlaid)."""
from __future__ import annotations

import csv
import json
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from .evaluation import IGNORE, dataset_labels, reader_for, squeeze
from .metrics import nanmean

METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "NSD"}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def metrics_provenance(tolerance_mm: float) -> str:
    monai = _version("monai")
    checked = f"MONAI {monai} (installed here)" if monai else "MONAI >= 1.4 (the test dependency)"
    return (f"Metrics: `nnunet_adpfl.evaluation.metrics` of nnunet-adpfl {_version('nnunet-adpfl')}: Dice (nnU-Net "
            f"{_version('nnunetv2')}'s own counts, equal to `nnUNetv2_evaluate_folder`), HD95 (95th percentile "
            f"of the symmetric surface distances, mm, voxel spacing of the reference) and NSD (normalised surface "
            f"Dice, tolerance {tolerance_mm:g} mm). Voxels of the dataset's ignore label count in no metric, and the "
            f"ignore label is no class. HD95 and NSD are checked against {checked} "
            "(`compute_hausdorff_distance`, `compute_surface_dice`; tests/test_metrics.py) and against brute-force "
            "surface distances. Empty masks: a label absent from both reference and prediction is undefined (NaN, as "
            "in nnU-Net's evaluation) and left out of the means (n counts the cases used); absent from exactly one of "
            "them scores the worst value (Dice 0, NSD 0, HD95 = the image diagonal), so missed or hallucinated "
            "structures are penalised instead of dropped.")


def _nan_to_null(value):
    """Strict JSON for other tools: undefined (NaN) metrics become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_null(v) for v in value]
    return value


def _fmt(stat: dict, digits: int) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _mean_over(summary: dict, metric: str, labels: list[str]) -> float:
    return nanmean(summary[metric][name]["mean"] for name in labels)


def _mb_per_site_round(r: dict, num_sites: int) -> str:
    if r["bytes_uploaded"] is None:
        return "-"
    return f"{r['bytes_uploaded'] / (r['rounds'] * num_sites) / 1e6:.2f}"


def _privacy(r: dict) -> tuple[str, str]:
    if r["epsilon"] is None:
        return "∞ (not private)", "-"
    spent = "?" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
    return f"{spent} (target {r['epsilon']:g})", f"{r['delta']:g}" if r["delta"] is not None else "?"


def tables(records: list[dict], labels: list[str], all_labels: list[str], metrics, num_sites: int,
           dataset: str) -> str:
    digits = {"dice": 3, "hd95": 1, "nsd": 3}
    head = ["method", *[f"Dice {n}" for n in all_labels], "mean Dice", "epsilon", "delta", "training wall time",
            "MB uploaded per site and round"]
    lines = [f"### {dataset}: Dice (mean ± std over the test cases)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in records:
        eps, delta = _privacy(r)
        wall = "-" if r["train_wall_time_s"] is None else f"{r['train_wall_time_s']:.0f} s"
        lines.append("| " + " | ".join([r["name"], *[_fmt(r["summary"]["dice"][n], 3) for n in all_labels],
                                         f"{_mean_over(r['summary'], 'dice', labels):.3f}", eps, delta, wall,
                                         _mb_per_site_round(r, num_sites)]) + " |")
    for metric in (m for m in metrics if m != "dice"):
        head = ["method", *[f"{METRIC_TITLES[metric]} {n}" for n in all_labels], "mean"]
        lines += ["", f"### {dataset}: {METRIC_TITLES[metric]} (mean ± std over the test cases)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in records:
            lines.append("| " + " | ".join([r["name"], *[_fmt(r["summary"][metric][n], digits[metric])
                                                         for n in all_labels],
                                             f"{_mean_over(r['summary'], metric, labels):.{digits[metric]}f}"]) + " |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "trainer", "target_epsilon", "case", "metric", "label", "value"])
        for r in records:
            for case in r["cases"]:
                for metric in (m for m in METRIC_TITLES if m in case):
                    for label, value in case[metric].items():
                        w.writerow([r["name"], r["method"], r["trainer"], "" if r["epsilon"] is None else r["epsilon"],
                                    case["case"], metric, label, value])


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_dice_vs_epsilon(records: list[dict], labels: list[str], path: Path, failures: list[dict] = ()) -> None:
    """Failed private runs are drawn as crosses on the x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    failed = [f["epsilon"] for f in failures if f.get("epsilon") is not None]
    if failed:
        ax.plot(failed, [0.0] * len(failed), "x", color="black", ms=9, clip_on=False,
                label="failed run (see the report)")
    private = {}
    for r in records:
        if r["epsilon"] is not None:
            private.setdefault(r["method"], []).append((r["epsilon"], _mean_over(r["summary"], "dice", labels)))
    for method, points in private.items():
        x, y = zip(*sorted(points))
        ax.plot(x, y, "o-", label=method)
    public = {}
    for r in records:
        if r["epsilon"] is None:
            public.setdefault(r["method"], []).append(_mean_over(r["summary"], "dice", labels))
    for i, (method, values) in enumerate(public.items()):
        name = method if len(values) == 1 else f"{method} (mean of {len(values)} sites)"
        ax.axhline(nanmean(values), ls="--", color=f"C{len(private) + i}", label=f"{name} (not private)")
    if private or failed:
        ax.set_xscale("log")
        ticks = sorted({r["epsilon"] for r in records if r["epsilon"] is not None} | set(failed))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("epsilon (target; delta as in the table)")
    ax.set_ylabel("mean Dice over the test cases")
    ax.set_ylim(0, 1)
    ax.set_title("Privacy-utility: Dice vs epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(records: list[dict], path: Path) -> None:
    plt = _plt()
    panels = [("train_loss", "training loss"), ("pseudo_dice", "pseudo Dice (nnU-Net's online validation)"),
              ("epsilon", "epsilon spent")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    palette = plt.get_cmap("tab10" if len(records) <= 10 else "tab20")  # one colour per run
    for ax, (key, title) in zip(axes, panels):
        for i, r in enumerate(records):
            values = r["curves"].get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, ".-", color=palette(i % palette.N), label=r["name"])
        ax.set_title(title)
        ax.set_xlabel("epoch (= round for the federations)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    columns = min(6, max(1, len(names)))
    rows = math.ceil(len(names) / columns)
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))  # the legend below the panels, clear of the curves
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(records: list[dict], dataset_folder: Path, path: Path) -> str:
    """The test case with the most reference foreground, at its fullest slice: image, reference and every run's
    prediction overlaid (the reference's ignored voxels are no class: neither counted nor coloured). Returns the
    case id."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    reader = reader_for(dataset_folder)
    refs = sorted((dataset_folder / "labelsTs").glob(f"*{ending}"))
    ignore_label = dataset_json["labels"].get(IGNORE)

    def foreground(seg: np.ndarray) -> np.ndarray:
        return (seg > 0) & (seg != ignore_label) if ignore_label is not None else seg > 0

    loaded = [(f, reader.read_seg(str(f))) for f in refs]
    ref_file, (ref, props) = max(loaded, key=lambda item: int(foreground(item[1][0]).sum()))
    case = ref_file.name[:-len(ending)]
    ref, _ = squeeze(ref[0], props["spacing"])
    axis_slice = int(np.argmax(foreground(ref).reshape(ref.shape[0], -1).sum(1))) if ref.ndim == 3 else None

    def plane(volume: np.ndarray) -> np.ndarray:
        return volume[axis_slice] if axis_slice is not None else volume

    image, _ = reader.read_images([str(dataset_folder / "imagesTs" / f"{case}_0000{ending}")])
    image = plane(squeeze(image[0], props["spacing"])[0])
    num_labels = max([0] + [int(v) for v in np.unique(ref) if v != ignore_label]) + 1
    colours = ListedColormap(["none", "tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple"][:max(2,
                                                                                                          num_labels)])
    panels = [("image", None), ("reference", plane(ref))]
    for r in records:
        pred, _ = reader.read_seg(str(Path(r["predictions"]) / ref_file.name))
        panels.append((r["name"], plane(squeeze(pred[0], props["spacing"])[0])))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, seg) in zip(axes.flat, panels):
        ax.imshow(image, cmap="gray")
        if seg is not None:
            ax.imshow(np.ma.masked_where(~foreground(seg), seg), cmap=colours, vmin=0, vmax=colours.N - 1, alpha=0.5,
                      interpolation="nearest")
        ax.set_title(title, fontsize=9)
    where = f", slice {axis_slice}" if axis_slice is not None else ""
    fig.suptitle(f"test case {case}{where}: labels " + ", ".join(
        f"{n}={v}" for n, v in dataset_json["labels"].items() if n not in ("background", IGNORE)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return case


def failures_section(failures: list[dict], out: Path) -> list[str]:
    """``out``: the report folder; log folders are given relative to it."""
    if not failures:
        return []
    lines = ["## Runs that failed", "",
             "Not in the tables and plots above; rerunning the same command retries them (finished runs are kept).", "",
             "| run | trainer | error | logs |", "|---|---|---|---|"]
    lines += [f"| {f['name']} | {f['trainer']} | {f['reason'].replace('|', '/')} | `{os.path.relpath(f['logs'], out)}` |" for f in failures]
    return [*lines, ""]


def write_report(records: list[dict], c, out: Path, failures: list[dict] = ()) -> Path:
    """``c``: the Comparison (dataset, sites, settings); ``failures``: runs that did not finish (name, trainer,
    reason, logs)."""
    out.mkdir(parents=True, exist_ok=True)
    a = c.a
    labels = list(dataset_labels(c.dataset_json))
    all_labels = list(records[0]["summary"]["dice"]) if records else labels
    plot_dice_vs_epsilon(records, labels, out / "dice_vs_epsilon.png", failures)
    plot_training_curves(records, out / "training_curves.png")
    case = plot_examples(records, c.pooled, out / "example_slices.png")
    write_csv(records, out / "per_case.csv")
    sites = {s: len(c.site_cases[s]) for s in c.sites}
    num_test = len(records[0]["cases"]) if records else 0
    command = getattr(a, "command_line", None)
    summary = {"command": command, "dataset": c.pooled.name, "configuration": c.config, "sites": sites, "test_cases": num_test,
               "rounds_or_epochs": a.rounds, "iterations": a.iterations, "initial_lr": a.lr or 0.01, "batch_size": a.batch_size, "clip": a.clip,
               "delta": a.delta, "nsd_tolerance_mm": a.nsd_tolerance, "mean_dice_over": labels,
               "metrics": metrics_provenance(a.nsd_tolerance),
               "runs": [{k: v for k, v in r.items() if k not in ("cases",)} for r in records],
               "failed_runs": list(failures)}
    (out / "summary.json").write_text(json.dumps(_nan_to_null(summary), indent=2, allow_nan=False))
    text = "\n".join([
        f"# nnunet-adpfl compare: {c.pooled.name}", "",
        *([f"Command: `{command}`", ""] if command else []),
        f"Training cases per site: {', '.join(f'{s} {n}' for s, n in sites.items())} (fold 0 of each: nnU-Net's "
        f"80/20 split); {num_test} held-out test cases. One shared plan ({c.config}, built from the sites' aggregate "
        f"fingerprints). Budget: {a.rounds} epochs (federations: rounds of one epoch) x {a.iterations} steps per site. "
        f"Learning rate {a.lr or 0.01:g} (nnU-Net's SGD and poly schedule). "
        f"Private runs: Poisson sampling, clip norm {a.clip:g}, delta {a.delta:g}; epsilon spent is the maximum over "
        "sites (each site's own account). Standard nnU-Net (`centralized`, trainer nnUNetTrainerBaselineBudget) "
        "trains on the pooled data of all sites: the non-private baseline. Every model is the final checkpoint.", "",
        f"Mean Dice: over {', '.join(labels)}.", "",
        tables(records, labels, all_labels, a.metrics, len(c.sites), c.pooled.name), "",
        *failures_section(failures, out),
        "## Plots", "",
        "![Dice vs epsilon](dice_vs_epsilon.png)", "",
        "![Training curves](training_curves.png)", "",
        f"![Example slices: test case {case}](example_slices.png)", "",
        "## Files", "",
        "- `per_case.csv`: every metric per run, test case and label/region.",
        "- `summary.json`: settings and per-run summaries (mean, std, n), epsilon, wall time, bytes, curves.", "",
        "## Metrics", "", metrics_provenance(a.nsd_tolerance), ""])
    (out / "report.md").write_text(text)
    return out


def task_table(report_dirs: list[Path]) -> str:
    """Mean Dice of every run (rows) on every compared dataset (columns), from the report folders' summary.json:
    the seed paper's method x task table."""
    tasks, rows = [], {}
    for folder in report_dirs:
        file = Path(folder) / "summary.json"
        if not file.exists():
            raise SystemExit(f"error: {file} not found; give report folders of 'nnunet-adpfl compare'")
        summary = json.loads(file.read_text())
        task = summary["dataset"]
        tasks.append(task)
        for r in summary["runs"]:
            dice = r["summary"]["dice"]
            rows.setdefault(r["name"], {})[task] = nanmean(
                math.nan if dice[n]["mean"] is None else dice[n]["mean"] for n in summary["mean_dice_over"])
        for f in summary.get("failed_runs", []):
            rows.setdefault(f["name"], {})[task] = None
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, values in rows.items():
        cells = ["-" if t not in values else "failed" if values[t] is None else f"{values[t]:.3f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(["Mean Dice over each dataset's labels (test cases; '-': not run, 'failed': see that report).",
                      "", *lines])

