"""``nnunet-adpfl compare``: which runs a method list means, input errors, and a tiny end-to-end comparison through
the stock nnU-Net commands (report, CSV, JSON, plots; a second call reuses every finished run)."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest

from nnunet_adpfl.workflows.compare import _floats, _regions, plan_runs
from nnunet_adpfl.evaluation.evaluation import METRICS


def test_methods_expand_to_runs():
    runs = plan_runs(["centralized", "local", "npfl", "dpfl", "adpfl", "nnUNetTrainerPSAC",
                      "nnUNetTrainerADPFLMorph"], ["A", "B"], [1.0, 8.0])
    got = {r.name: (r.trainer, r.kind, r.site, r.epsilon, r.mode) for r in runs}
    assert got == {
        "centralized": ("nnUNetTrainerBaselineBudget", "centralized", None, None, None),
        "local A": ("nnUNetTrainerBaselineBudget", "local", "A", None, None),
        "local B": ("nnUNetTrainerBaselineBudget", "local", "B", None, None),
        "npfl": ("nnUNetTrainerFL", "federated", None, None, "npfl"),
        "dpfl eps=1": ("nnUNetTrainerDPFL", "federated", None, 1.0, "dpfl"),
        "dpfl eps=8": ("nnUNetTrainerDPFL", "federated", None, 8.0, "dpfl"),
        "adpfl eps=1": ("nnUNetTrainerADPFL", "federated", None, 1.0, "adpfl"),
        "adpfl eps=8": ("nnUNetTrainerADPFL", "federated", None, 8.0, "adpfl"),
        "nnUNetTrainerPSAC eps=1": ("nnUNetTrainerPSAC", "centralized", None, 1.0, None),
        "nnUNetTrainerPSAC eps=8": ("nnUNetTrainerPSAC", "centralized", None, 8.0, None),
        "nnUNetTrainerADPFLMorph eps=1": ("nnUNetTrainerADPFLMorph", "federated", None, 1.0, "adpfl"),
        "nnUNetTrainerADPFLMorph eps=8": ("nnUNetTrainerADPFLMorph", "federated", None, 8.0, "adpfl"),
    }
    assert len({r.slug for r in runs}) == len(runs)
    # nnU-Net's own trainers are found too (not private, centralised)
    assert plan_runs(["nnUNetTrainer"], ["A", "B"], [8.0])[0].kind == "centralized"


def test_bad_methods_and_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="no nnU-Net trainer named 'nnUNetTrainerNope'"):
        plan_runs(["nnUNetTrainerNope"], ["A", "B"], [8.0])
    with pytest.raises(SystemExit, match="repeat"):
        plan_runs(["npfl", "nnUNetTrainerFL"], ["A", "B"], [8.0])
    with pytest.raises(SystemExit, match="repeat"):
        plan_runs(["dpfl", "dpfl"], ["A", "B"], [8.0])
    with pytest.raises(ValueError):
        _floats("1,-4")
    with pytest.raises(ValueError):
        _regions("masses")
    assert _regions("masses=2,3") == ("masses", (2, 3))


def _compare(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnunet_adpfl.cli", "compare", *args], capture_output=True,
                          text=True, env=env)


def test_dataset_without_site_map_is_refused(tmp_path):
    (tmp_path / "Dataset777_X").mkdir()
    out = _compare("--dataset", "777", "--raw", str(tmp_path), "--work-dir", str(tmp_path / "w"))
    assert out.returncode != 0 and "sites.json is missing" in out.stderr
    (tmp_path / "Dataset777_X" / "sites.json").write_text(json.dumps({"sites": {"A": ["a1", "a2"], "B": ["b1"] * 6}}))
    out = _compare("--dataset", "777", "--raw", str(tmp_path), "--work-dir", str(tmp_path / "w"))
    assert out.returncode != 0 and "{'A': 2} have fewer than 5 training cases" in out.stderr
    out = _compare("--dataset", "777", "--raw", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--sites", "B,Z")
    assert out.returncode != 0 and "unknown: ['Z']" in out.stderr


@pytest.mark.slow  # ~6 min alone on 2 cores; the default suite keeps the compare CLI's checks and report parts
def test_tiny_comparison_end_to_end(tmp_path):
    """Standard nnU-Net (pooled) vs DP-FL on a 2-site synthetic skin dataset: 1 round x 1 step each."""
    work = tmp_path / "cmp"
    args = ["--synthetic", "skin", "--num-cases", "12", "--num-sites", "2", "--num-test-cases", "2",
            "--work-dir", str(work), "--methods", "centralized,dpfl", "--epsilons", "8", "--rounds", "1",
            "--iterations", "1", "--regions", "lesion_again=1", "--lr", "0.02"]
    first = _compare(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = work / "report"
    summary = json.loads((report / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert list(runs) == ["centralized", "dpfl eps=8"]
    assert runs["centralized"]["epsilon_spent"] is None
    assert 7.0 < runs["dpfl eps=8"]["epsilon_spent"] <= 8.0 * 1.01 and runs["dpfl eps=8"]["delta"] == 1e-5
    assert runs["dpfl eps=8"]["bytes_uploaded"] > 0 and runs["centralized"]["bytes_uploaded"] is None
    for r in runs.values():
        assert set(r["summary"]) == set(METRICS)
        dice = r["summary"]["dice"]
        assert dice["lesion"]["n"] == 2 and 0.0 <= dice["lesion"]["mean"] <= 1.0
        assert dice["lesion_again"] == dice["lesion"]
        assert len(r["curves"]["train_loss"]) == 1
    assert len(runs["dpfl eps=8"]["curves"]["epsilon"]) == 1
    with open(report / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * len(METRICS) * 2  # runs x cases x metrics x (lesion, lesion_again)
    text = (report / "report.md").read_text()
    assert "| centralized | " in text and "| dpfl eps=8 | " in text and "(target 8)" in text
    for png in ("dice_vs_epsilon.png", "training_curves.png", "example_slices.png"):
        assert (report / png).stat().st_size > 10_000 and f"]({png})" in text
    for log in (work / "logs" / "centralized" / "train.log", work / "logs" / "dpfl_eps_8" / "train_A.log"):
        assert "Current learning rate: 0.02" in log.read_text()
    # the two simulated sites share the machine's cores
    assert f"torch CPU threads: {max(1, os.cpu_count() // 2)}" in (work / "logs" / "dpfl_eps_8" / "train_A.log").read_text()
    # the same shared plan for the pooled (centralised) and the site data
    central = next((work / "centralized" / "nnUNet_preprocessed").glob("Dataset501_*/nnUNetPlans.json"))
    site = next((work / "site_A" / "nnUNet_preprocessed").glob("Dataset501_*/nnUNetPlans.json"))
    assert json.loads(central.read_text())["configurations"] == json.loads(site.read_text())["configurations"]

    # a second call reuses the finished runs; a run that fails (here: an invalid setting) is reported, the others
    # stay in the report, the exit status says so, and it is not stored (the next call retries it)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gamma": -1}))
    again = _compare(*[*args[:args.index("--methods")], "--methods", "centralized,dpfl,nnUNetTrainerDPSGD",
                       *args[args.index("--epsilons"):], "--settings", str(bad)])
    assert again.returncode == 1 and "nnUNetTrainerDPSGD eps=8: FAILED" in again.stdout, again.stdout[-3000:]
    assert again.stdout.count("done before, kept") == 2
    rerun = json.loads((report / "summary.json").read_text())
    assert rerun["runs"] == summary["runs"]
    [failed] = rerun["failed_runs"]
    assert failed["name"] == "nnUNetTrainerDPSGD eps=8" and "gamma" in failed["reason"]
    assert "## Runs that failed" in (report / "report.md").read_text()
    assert len(list((work / "runs").glob("*.json"))) == 2


def test_task_table_lists_methods_by_dataset(tmp_path):
    from nnunet_adpfl.evaluation.compare_report import task_table

    def report(name, runs, failed=()):
        folder = tmp_path / name
        folder.mkdir()
        summary = {"dataset": name, "mean_dice_over": ["a", "b"], "failed_runs": [{"name": f} for f in failed],
                   "runs": [{"name": n, "summary": {"dice": {"a": {"mean": a}, "b": {"mean": b}}}} for n, a, b in runs]}
        (folder / "summary.json").write_text(json.dumps(summary))
        return folder

    skin = report("Skin", [("npfl", 0.9, 0.7), ("dpfl eps=8", 0.5, None)])
    kidney = report("Kidney", [("npfl", 0.2, 0.4)], failed=["dpfl eps=8"])
    lines = task_table([skin, kidney]).splitlines()
    assert lines[2:] == ["| method | Skin | Kidney |", "|---|---|---|", "| npfl | 0.800 | 0.300 |",
                         "| dpfl eps=8 | 0.500 | failed |"]
    with pytest.raises(SystemExit, match="summary.json not found"):
        task_table([tmp_path / "nowhere"])


def test_failure_reason_names_the_error_and_explains_divergence():
    from nnunet_adpfl.workflows.compare import _failure_reason

    tail = "command failed (1): nnUNetv2_predict\n--- last output ---\nTraceback (most recent call last):\n  File x\n"
    assert _failure_reason(tail + "ValueError: bad spacing\n") == "ValueError: bad spacing"
    assert "the model diverged" in _failure_reason(tail + "RuntimeError: Encountered inf in predicted array.")
    assert _failure_reason("['B'] failed; see /logs\nB: (no output)") == "['B'] failed; see /logs"


def test_curves_of_a_dp_run_read_the_local_training_loss(tmp_path):
    """A DP checkpoint logs NaN as its (unnoised) training loss; the comparison plots the site's local log."""
    import torch

    from nnunet_adpfl.privacy.local_log import record_epoch
    from nnunet_adpfl.workflows.compare import _curves

    logging = {"train_losses": [math.nan, math.nan], "val_losses": [0.9, 0.8], "mean_fg_dice": [0.1, 0.2],
               "epsilon": [1.0, 2.0]}
    torch.save({"logging": logging}, tmp_path / "checkpoint_final.pth")
    assert all(math.isnan(v) for v in _curves(tmp_path)["train_loss"])
    for epoch, loss in enumerate((0.7, 0.6)):
        record_epoch(tmp_path, epoch, {"train_loss": loss})
    curves = _curves(tmp_path)
    assert curves["train_loss"] == [0.7, 0.6] and curves["val_loss"] == [0.9, 0.8] and curves["epsilon"] == [1.0, 2.0]


def test_example_figure_neither_counts_nor_colours_ignored_voxels(tmp_path):
    """The example case is the one with the most scored foreground; the ignore label is drawn as no class."""
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.image import imread

    from nnunet_adpfl.evaluation.compare_report import plot_examples

    data, pred = tmp_path / "Dataset1_X", tmp_path / "pred"
    for folder in (data / "labelsTs", data / "imagesTs", pred):
        folder.mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "ignore": 2},
                                                   "file_ending": ".nii.gz", "channel_names": {"0": "x"}}))
    for case, (lesion, ignored) in {"big": (64, 0), "mostly_ignored": (16, 1000)}.items():
        seg = np.zeros((1, 48, 48), dtype=np.uint8)
        seg.reshape(-1)[:ignored] = 2
        seg.reshape(-1)[-lesion:] = 1
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(data / "labelsTs" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 48, 48), np.float32)),
                        str(data / "imagesTs" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros_like(seg)), str(pred / f"{case}.nii.gz"))
    assert plot_examples([{"name": "run", "predictions": str(pred)}], data, tmp_path / "ex.png") == "big"
    (data / "labelsTs" / "big.nii.gz").unlink()
    plot_examples([{"name": "run", "predictions": str(pred)}], data, tmp_path / "ignored.png")
    rgb = imread(tmp_path / "ignored.png")[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1)) > 0.2  # the overlay's colours on a grey image
    assert 0 < coloured.sum() < 1000  # the 16 lesion pixels, scaled; the 1000 ignored ones would be far more
