"""The federated comparison's table: per-class Dice, the share of the DP-FL -> NP-FL gap closed, bytes."""
import math

from nnunet_adpfl.fed_experiment import ALL_MECHANISMS, RUNS, WITHOUT, format_task


def result(dice: dict, eps, mb_per_round: float) -> dict:
    return {"global_test_dice": dice, "rounds": 2, "wall_time_s": 10.0, "bytes_uploaded": mb_per_round * 2 * 3 * 1e6,
            "sites": {s: {"validation_dice": 0.5, "epsilon": eps} for s in "ABC"}}


def test_table_reports_the_gap_closed_and_handles_nan_classes():
    results = {"NP-FL": result({"kidney": 0.9, "cyst": 0.7}, None, 1.0),
               "DP-FL": result({"kidney": 0.5, "cyst": 0.3}, 7.9, 1.0),
               "ADP-FL (defaults)": result({"kidney": 0.8, "cyst": math.nan}, 7.95, 0.25)}
    lines = format_task("kidney", results).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    # mean Dice: NP 0.8, DP 0.4, ADP 0.8 (NaN class left out) -> 100% of the gap
    assert "| 0.800 | 100% | 7.95 | 0.25 |" in row["ADP-FL (defaults)"]
    assert "- (not private)" in row["NP-FL"] and "| 0.400 | - | 7.90 | 1.00 |" in row["DP-FL"]


def test_a_diverged_run_is_a_row_not_a_gap():
    results = {"ADP-FL (all mechanisms)": {"diverged": "inf", "settings": {}},
               "NP-FL": result({"kidney": 0.9}, None, 1.0), "DP-FL": result({"kidney": 0.5}, 7.9, 1.0),
               "ADP-FL (defaults)": result({"kidney": 0.7}, 7.9, 1.0)}
    lines = format_task("kidney", results).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert row["ADP-FL (all mechanisms)"] == "| ADP-FL (all mechanisms) | diverged | diverged | - | - | - | - |"
    assert "| 0.700 | 50% |" in row["ADP-FL (defaults)"]


def test_ablations_switch_off_one_mechanism_each():
    for name, off in WITHOUT.items():
        trainer, settings = RUNS[f"ADP-FL (all) - {name}"]
        changed = {k for k in settings if settings[k] != ALL_MECHANISMS.get(k)}
        assert changed == set(off), name


def test_single_mechanism_runs_switch_on_exactly_one():
    for name, off in WITHOUT.items():
        trainer, settings = RUNS[f"ADP-FL: {name} only"]
        on = {k for k in settings if k in off and settings[k] == ALL_MECHANISMS[k]}
        assert on == set(off), name
        others = {k for other, o in WITHOUT.items() if other != name for k in o}
        assert all(settings[k] != ALL_MECHANISMS[k] for k in others), name
