"""scripts/published_table.py: the table's arithmetic and aggregation on fake fed-compare result files (seconds)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "published_table.py"
spec = importlib.util.spec_from_file_location("published_table", SCRIPT)
pt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pt)


def _summary(eps: float | None) -> dict:
    return {"trainer": "t", "sites": {"A": {"epsilon": eps}, "B": {"epsilon": None if eps is None else eps - 0.1}},
            "wall_time_s": 120.0, "global_test_dice": {"1": 0.0}}


def _fake_task(tmp_path: Path, dice: dict[str, float]) -> Path:
    """A skin task folder as fed-compare leaves it, the reported class already scored (sidecar)."""
    task_dir = tmp_path / "published" / "skin"
    task_dir.mkdir(parents=True)
    results = {name: ({"diverged": "x"} if d is None else _summary(None if name.startswith("NP") else 7.9))
               for name, d in dice.items()}
    (task_dir / "results.json").write_text(json.dumps(results))
    sidecar = {name: {"reported_dice": {"dice": d}, "rounds": 5, "iterations": 10} for name, d in dice.items()
               if d is not None}
    log = task_dir / "logs" / pt.run_slug("DP-FL [eps 8]") / "train_A.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-12-06 05:00:00: Epoch time: 30.5 s\nother\n2026-12-06 05:01:00: Epoch time: 40.5 s\n")
    (task_dir / pt.SIDECAR).write_text(json.dumps(sidecar))
    return task_dir


def test_run_names_match_fed_compare():
    """fed-compare names a run '<run> [<label>] #<repeat>' (run_task)."""
    assert pt.run_name(pt.NP, None, 1) == "NP-FL"
    assert pt.run_name(pt.DP, 8.0, 1) == "DP-FL [eps 8]"
    assert pt.run_name(pt.ADP_ALL, 1.0, 3) == "ADP-FL (all mechanisms) [eps 1] #3"
    assert pt.run_name(pt.NP, 4.0, 2) == "NP-FL #2"  # not private: one NP-FL run per seed for every epsilon
    assert pt.run_slug("DP-FL [eps 8] #2") == "run_dp_fl__eps_8___2"  # fed_experiment.run_slug's folder name


def test_grid_order_seed_by_seed_np_once_per_seed():
    order = pt.grid(["skin", "brain"], 2, list(pt.METHODS))
    skin = [o for o in order if o[0] == "skin"]
    assert len(skin) == 2 * (1 + 3 * 3) and len(order) == len(skin) + 2 * (1 + 3)
    assert skin[0] == ("skin", 1, None, pt.NP) and skin[1] == ("skin", 1, 8.0, pt.DP)
    assert [o[1] for o in skin] == [1] * 10 + [2] * 10  # a whole row per seed first


def test_table_arithmetic(tmp_path):
    dice = {"NP-FL": 0.90, "NP-FL #2": 0.80, "DP-FL [eps 8]": 0.60, "DP-FL [eps 8] #2": 0.50,
            "ADP-FL (defaults) [eps 8]": 0.75, "ADP-FL (defaults) [eps 8] #2": None,
            "ADP-FL (all mechanisms) [eps 8]": 0.70, "ADP-FL (all mechanisms) [eps 8] #2": 0.80,
            "DP-FL [eps 4]": 0.1}
    runs = pt.collect(_fake_task(tmp_path, dice), "skin")
    rows = {r["method"]: r for r in pt.task_rows("skin", runs, 8.0)}
    assert rows[pt.NP]["mean"] == pytest.approx(0.85) and rows[pt.NP]["std"] == pytest.approx(np.std([.9, .8], ddof=1))
    assert rows[pt.DP]["mean"] == pytest.approx(0.55)  # epsilon 4's run not mixed in
    assert rows[pt.DP]["share_of_np"] == pytest.approx(0.55 / 0.85)
    assert rows[pt.ADP_DEFAULTS]["seeds"] == 2 and rows[pt.ADP_DEFAULTS]["diverged"] == 1
    assert rows[pt.ADP_DEFAULTS]["std"] is None and rows[pt.ADP_DEFAULTS]["mean"] == pytest.approx(0.75)
    assert rows[pt.ADP_DEFAULTS]["gap_closed"] == pytest.approx((0.75 - 0.55) / 0.30)
    assert rows[pt.ADP_ALL]["gap_closed"] == pytest.approx((0.75 - 0.55) / 0.30)
    assert math.isnan(rows[pt.DP]["gap_closed"]) and math.isnan(rows[pt.NP]["share_of_np"])
    assert rows[pt.DP]["epsilon"] == pytest.approx(7.9) and rows[pt.DP]["wall_s"] == 120.0
    # the published row: HAM10000 ADP-FL 92.8 closes (92.8 - 85.4) / (93.1 - 85.4) = 96% of the gap
    assert rows[pt.ADP_ALL]["published_gap_closed"] == pytest.approx(7.4 / 7.7)
    assert rows[pt.DP]["published_share_of_np"] == pytest.approx(85.4 / 93.1)
    text = pt.build_table(tmp_path)
    assert rows[pt.DP]["round_s"] == pytest.approx(35.5)  # median over the rounds of site A's log (seed 1 only)
    assert "| DP-FL | 55.0 ± 7.1 | 2 | 65% | - | 85.4 | 92% | - | 7.90 | 2.0 min | 36 s |" in text
    assert "| ADP-FL (defaults) | 75.0 | 2 (1 diverged) | 88% | 67% |" in text
    assert "epsilon 4" in text and "epsilon 1" not in text  # only the epsilons that have a private run
    assert "### skin (published, 5 rounds x 10 steps), lesion Dice, epsilon 8" in text
    pt.check_run_length(tmp_path / "published" / "skin", 5, 10)
    with pytest.raises(SystemExit, match="5 rounds x 10 steps"):
        pt.check_run_length(tmp_path / "published" / "skin", 2, 10)


def test_no_gap_is_not_a_share():
    assert math.isnan(pt.gap_closed(0.5, 0.8, 0.8)) and math.isnan(pt.gap_closed(0.5, 0.9, 0.8))
    assert pt.gap_closed(0.9, 0.5, 0.7) == pytest.approx(2.0)  # above NP-FL: more than the whole gap


def test_no_share_of_a_reference_that_learned_nothing():
    """NP-FL at 0.1 Dice points (brain's necrotic core in 80 steps): 4 points would read as 3,000% of it."""
    assert math.isnan(pt.share(0.04, 0.001)) and math.isnan(pt.gap_closed(0.06, 0.04, 0.045))
    assert pt.share(0.04, 0.05) == pytest.approx(0.8) and pt.gap_closed(0.05, 0.04, 0.06) == pytest.approx(0.5)


def test_scoring_unions_labels_and_skips_empty_cases(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    labels, preds = tmp_path / "labelsTs", tmp_path / "pred"
    labels.mkdir(), preds.mkdir()

    def write(folder, name, values):
        sitk.WriteImage(sitk.GetImageFromArray(np.array(values, dtype=np.uint8).reshape(1, 1, -1)),
                        str(folder / f"{name}.nii.gz"))

    write(labels, "a", [2, 3, 0, 1]); write(preds, "a", [3, 2, 0, 0])  # tumour and cyst swapped: union Dice 1
    write(labels, "b", [2, 0, 0, 0]); write(preds, "b", [0, 3, 0, 1])  # union Dice 0
    write(labels, "c", [1, 0, 0, 0]); write(preds, "c", [1, 1, 0, 0])  # no tumour+cyst in either: not scored
    score = pt.score_predictions(labels, preds, (2, 3), ".nii.gz")
    assert score == {"dice": 0.5, "cases": 3, "scored": 2}
    assert pt.score_predictions(labels, preds, (2,), ".nii.gz")["dice"] == pytest.approx(0.0)
    (preds / "c.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="c.nii.gz"):
        pt.score_predictions(labels, preds, (2, 3), ".nii.gz")


def test_workflow_device_from_environment(monkeypatch):
    """published_table.py run --device cuda sets $nnUNet_adpfl_device; unset, the workflows use the CPU."""
    from nnunet_adpfl.nnunet.pipeline import DEVICE_VAR, workflow_device

    monkeypatch.delenv(DEVICE_VAR, raising=False)
    assert workflow_device() == "cpu"
    monkeypatch.setenv(DEVICE_VAR, "cuda")
    assert workflow_device() == "cuda"


def test_compute_settings_get_their_own_folder_and_reach_fed_compare(tmp_path):
    """--scale and --max-features change every run's cost and result: a folder of their own, and fed-compare gets
    them (the published cohort's size and test set kept)."""
    assert pt.cohort_folder(tmp_path, None).name == "published"
    assert pt.cohort_folder(tmp_path, 1500).name == "1500cases"
    assert pt.cohort_folder(tmp_path, None, 0.5, 8).name == "published_scale0.5_width8"
    assert len({pt.cohort_folder(tmp_path, n, s, w).name for n in (None, 1500) for s in (None, 0.5)
                for w in (None, 8)}) == 8
    run = pt.build_parser().parse_args(["run", "--scale", "0.5", "--max-features", "8"])
    a = pt.fed_compare_args("brain", tmp_path, run, pt.DP, 8.0, 1)
    assert (a.scale, a.max_features, a.num_cases, a.num_test_cases, a.cohort_size) == (0.5, 8, 1350, 135, "small")
    a = pt.fed_compare_args("brain", tmp_path, pt.build_parser().parse_args(["run"]), pt.DP, 8.0, 1)
    assert a.cohort_size == "published" and a.max_features == 32
    run = pt.build_parser().parse_args(["run", "--scale", "0", "--num-test-cases", "0"])
    a = pt.fed_compare_args("brain", tmp_path, run, pt.DP, 8.0, 1)
    assert (a.scale, a.num_test_cases) == (0.0, 0)  # passed on (the generator refuses scale 0), not replaced
    run = pt.build_parser().parse_args(["run", "--dp-memory-mib", "0"])
    settings = json.loads(pt.fed_compare_args("brain", tmp_path, run, pt.DP, 8.0, 1).private_settings)
    assert settings["dp_memory_limit_mib"] == 0  # passed on (the settings refuse it), not dropped for the default
