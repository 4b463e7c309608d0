"""The federated comparison's table: per-class Dice, the share of the DP-FL -> NP-FL gap closed, bytes."""
import json
import math

import pytest

from nnunet_adpfl.workflows.fed_experiment import ALL_MECHANISMS, RUNS, WITHOUT, format_task


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
    assert "| 0.800 | 100% | 100% | - | 7.95 | 0.25 |" in row["ADP-FL (defaults)"]
    assert "- (not private)" in row["NP-FL"] and "| 0.400 | 50% | - | - | 7.90 | 1.00 |" in row["DP-FL"]


def test_a_diverged_run_is_a_row_not_a_gap():
    results = {"ADP-FL (all mechanisms)": {"diverged": "inf", "settings": {}},
               "NP-FL": result({"kidney": 0.9}, None, 1.0), "DP-FL": result({"kidney": 0.5}, 7.9, 1.0),
               "ADP-FL (defaults)": result({"kidney": 0.7}, 7.9, 1.0)}
    lines = format_task("kidney", results).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert row["ADP-FL (all mechanisms)"] == "| ADP-FL (all mechanisms) | diverged | diverged | - | - | - | - | - | - |"
    assert "| 0.700 | 78% | 50% |" in row["ADP-FL (defaults)"]
    results["DP-FL"] = {"diverged": "inf", "settings": {}}  # no baseline, no gap (was a KeyError)
    assert "| 0.700 | 78% | - |" in format_task("kidney", results)


def test_runs_from_public_weights_are_compared_with_np_fl_from_the_same_start():
    public = {"global_test_dice": {"kidney": 0.6}, "rounds": 0, "wall_time_s": None, "bytes_uploaded": 0, "sites": {}}
    results = {"NP-FL": result({"kidney": 0.5}, None, 1.0), "DP-FL": result({"kidney": 0.1}, 7.9, 1.0),
               "public weights only (no private training)": public,
               "NP-FL from public weights": result({"kidney": 0.8}, None, 1.0),
               "DP-FL from public weights": result({"kidney": 0.72}, 7.9, 1.0),
               "ADP-FL (defaults) from public weights": result({"kidney": 0.76}, 7.9, 1.0)}
    row = {line.split(" | ")[0].strip("| "): line for line in format_task("kidney", results).splitlines()
           if line.startswith("| ")}
    # gain kept: (private - public only) / (NP-FL from public - public only) = 0.12 / 0.2 and 0.16 / 0.2
    assert "| 0.720 | 90% | - | 60% |" in row["DP-FL from public weights"]
    assert "| 0.760 | 95% | 50% | 80% |" in row["ADP-FL (defaults) from public weights"]
    assert "| 0.100 | 20% | - | - |" in row["DP-FL"]  # from scratch: no gain over the public model to keep
    assert "| 0.600 | 75% | - | - | - (not private) | - | - |" in row["public weights only (no private training)"]
    assert RUNS["DP-FL from public weights"] == RUNS["DP-FL"]


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


def test_a_run_that_diverged_is_recorded_also_when_resumed(tmp_path, monkeypatch):
    """The sites' final validation fails on a diverged model after the last global model is written; the
    experiment records the row and goes on, and a resumed experiment does the same instead of crashing."""
    import argparse

    from nnunet_adpfl.workflows import fed_experiment as fe
    from nnunet_adpfl.federation import files as ff

    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    a = parser.parse_args(["--work-dir", str(tmp_path), "--runs", "ADP-FL (all mechanisms)", "NP-FL", "--rounds", "1"])
    for name in ("stage_data", "stage_plan", "create_federation"):
        monkeypatch.setattr(fe, name, lambda *args, **kw: tmp_path)
    monkeypatch.setattr(fe, "new_run", lambda *args: None)
    trained = []

    def train(lay, trainer, *args):
        trained.append(trainer)
        lay.logs.mkdir(parents=True, exist_ok=True)
        if trainer == fe.ADPFL:  # the global model is written, then the sites' validation fails
            ff.global_paths(lay.fed, 1)[1].parent.mkdir(parents=True)
            ff.global_paths(lay.fed, 1)[1].write_text("{}")
            (lay.logs / "train_A.log").write_text(f"RuntimeError: {fe.DIVERGED}. Aborting...\n")
            raise RuntimeError(f"['A'] failed; see {lay.logs}\nA: RuntimeError: {fe.DIVERGED}. Aborting...")
        return 1.0

    monkeypatch.setattr(fe, "train_federated", train)
    monkeypatch.setattr(fe, "summarise", lambda *args: {"global_test_dice": {"kidney": 0.8}})
    results = fe.run_task(a, "kidney")
    assert "diverged" in results["ADP-FL (all mechanisms)"] and results["NP-FL"]["global_test_dice"]
    (tmp_path / "kidney" / "results.json").unlink()  # resume without the record: training is not repeated
    assert "diverged" in fe.run_task(a, "kidney")["ADP-FL (all mechanisms)"]
    assert trained == [fe.ADPFL, "nnUNetTrainerFL", "nnUNetTrainerFL"]

    monkeypatch.setattr(fe, "train_federated", lambda *args: (_ for _ in ()).throw(RuntimeError("['B'] failed: disk full")))
    (tmp_path / "kidney" / "results.json").unlink()
    with pytest.raises(RuntimeError, match="disk full"):  # other failures still stop the experiment
        fe.run_task(parser.parse_args(["--work-dir", str(tmp_path / "other"), "--runs", "DP-FL"]), "kidney")


def test_standard_nnunet_row_trains_once_on_the_pooled_data(tmp_path, monkeypatch):
    import argparse

    from nnunet_adpfl.workflows import fed_experiment as fe

    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    a = parser.parse_args(["--work-dir", str(tmp_path), "--runs", fe.STANDARD, "--rounds", "3", "--iterations", "4"])
    pooled = tmp_path / "pooled_raw" / "Dataset501_X"
    monkeypatch.setattr(fe, "stage_data", lambda *args, **kw: pooled)
    for name in ("stage_plan", "create_federation"):
        monkeypatch.setattr(fe, name, lambda *args, **kw: None)
    calls = []
    monkeypatch.setattr(fe, "train_standard", lambda *args: calls.append(args) or tmp_path / "ckpt.pth")
    monkeypatch.setattr(fe, "_evaluate_standard", lambda *args: {"global_test_dice": {"kidney": 0.8}, "mode": args[4]})
    results = fe.run_task(a, "kidney")
    assert results[fe.STANDARD]["mode"] == "standard" and len(results) == 1
    fed, raw, dataset, work, epochs, iterations, lr, seed = calls[0]
    assert dataset == pooled and raw == tmp_path / "kidney" / "pooled_raw" and (epochs, iterations, seed) == (3, 4, 0)
    fe.run_task(a, "kidney")
    assert len(calls) == 1  # resumed: the recorded row is kept


def test_repeats_are_one_row_with_mean_and_sample_std():
    results = {"NP-FL": result({"kidney": 0.8}, None, 1.0), "NP-FL #2": result({"kidney": 0.9}, None, 1.0),
               "DP-FL": result({"kidney": 0.5}, 7.9, 1.0), "DP-FL #2": result({"kidney": 0.7}, 7.95, 1.0),
               "DP-FL #3": {"diverged": "inf", "settings": {}},
               "ADP-FL (defaults)": result({"kidney": 0.75}, 7.9, 1.0)}
    row = {line.split(" | ")[0].strip("| "): line for line in format_task("kidney", results).splitlines()
           if line.startswith("| ")}
    assert set(row) == {"run", "NP-FL (2 runs)", "DP-FL (3 runs, 1 diverged)", "ADP-FL (defaults)"}
    # NP 0.85 +- 0.071, DP 0.6 +- 0.141 (the diverged repeat left out); ADP: (0.75 - 0.6) / (0.85 - 0.6) = 60%
    assert "| 0.850 ± 0.071 | 0.850 ± 0.071 | - | - | - | - (not private) |" in row["NP-FL (2 runs)"]
    assert "| 0.600 ± 0.141 | 0.600 ± 0.141 | 71% | - | - | 7.95 |" in row["DP-FL (3 runs, 1 diverged)"]
    assert "| 0.750 | 0.750 | 88% | 60% | - | 7.90 |" in row["ADP-FL (defaults)"]
    only_diverged = {"NP-FL": result({"kidney": 0.8}, None, 1.0), "DP-FL": {"diverged": "inf", "settings": {}},
                     "DP-FL #2": {"diverged": "inf", "settings": {}}}
    assert "| DP-FL (2 runs, 2 diverged) | diverged | diverged |" in format_task("kidney", only_diverged)


def test_repeats_train_each_run_again_with_the_next_training_seed(tmp_path, monkeypatch):
    import argparse

    from nnunet_adpfl.workflows import fed_experiment as fe

    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    a = parser.parse_args(["--work-dir", str(tmp_path), "--runs", "NP-FL", "DP-FL", "--rounds", "1", "--seed", "5",
                           "--repeats", "2", "--private-settings", '{"dp_trainable": "head"}', "--release-ema", "0.8"])
    for name in ("stage_data", "stage_plan", "create_federation"):
        monkeypatch.setattr(fe, name, lambda *args, **kw: tmp_path)
    initial_seeds, trained, released = [], [], []
    monkeypatch.setattr(fe, "new_run", lambda lay, fed, mode, rounds, e, it, config, seed, public, ema:
                        initial_seeds.append(seed) or released.append(ema))
    monkeypatch.setattr(fe, "train_federated", lambda lay, trainer, config, settings, rounds: trained.append(settings))
    monkeypatch.setattr(fe, "summarise", lambda *args: {"global_test_dice": {"kidney": 0.8}})
    results = fe.run_task(a, "kidney")
    assert list(results) == ["NP-FL", "NP-FL #2", "DP-FL", "DP-FL #2"]
    assert initial_seeds == [5, 6, 5, 6] and [s["seed"] for s in trained] == [5, 6, 5, 6]
    assert released == [0.8] * 4 and results["DP-FL #2"]["release_ema_decay"] == 0.8
    assert trained[3]["dp_trainable"] == "head" and trained[3]["target_epsilon"] == 8.0
    fe.run_task(a, "kidney")
    assert len(trained) == 4  # resumed: recorded repeats are not trained again
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "0"])


@pytest.mark.parametrize("clip, written", [([], None), (["--clip", "0.5"], 0.5)])
def test_the_clip_norm_is_written_only_when_given(tmp_path, monkeypatch, clip, written):
    """Left out, the trainers' default C applies and, from public weights, the DP defaults choose dp_trainable (a
    given max_grad_norm keeps norm_bias)."""
    import argparse

    from nnunet_adpfl.workflows import fed_experiment as fe

    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    a = parser.parse_args(["--work-dir", str(tmp_path), "--runs", "DP-FL", "--rounds", "1", *clip])
    for name in ("stage_data", "stage_plan", "create_federation", "new_run"):
        monkeypatch.setattr(fe, name, lambda *args, **kw: tmp_path)
    trained = []
    monkeypatch.setattr(fe, "train_federated", lambda lay, trainer, config, settings, rounds: trained.append(settings))
    monkeypatch.setattr(fe, "summarise", lambda *args: {"global_test_dice": {"kidney": 0.8}})
    fe.run_task(a, "kidney")
    assert trained[0].get("max_grad_norm") == written


def test_labelled_runs_are_compared_with_dp_fl_of_the_same_label():
    results = {"NP-FL": result({"kidney": 0.8}, None, 1.0), "DP-FL": result({"kidney": 0.4}, 7.9, 1.0),
               "DP-FL [eps 1]": result({"kidney": 0.6}, 1.0, 1.0),
               "ADP-FL (defaults) [eps 1]": result({"kidney": 0.7}, 1.0, 1.0),
               "ADP-FL (defaults) [other]": result({"kidney": 0.6}, 1.0, 1.0)}
    lines = format_task("kidney", results).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| 0.700 | 87% | 50% |" in row["ADP-FL (defaults) [eps 1]"]  # (0.7 - 0.6) / (0.8 - 0.6); 0.7 / 0.8 = 0.87499..
    assert "| 0.600 | 75% | 50% |" in row["ADP-FL (defaults) [other]"]  # no 'DP-FL [other]': the unlabelled DP-FL


def _row(table: str) -> dict:
    return {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}


def _public_only(dice: float) -> dict:
    return {"global_test_dice": {"lesion": dice}, "rounds": 0, "wall_time_s": None, "bytes_uploaded": 0, "sites": {}}


def test_ratio_is_a_number_or_n_a_with_its_reason_never_inf_or_nan():
    from nnunet_adpfl.workflows.fed_experiment import MIN_DENOMINATOR, ratio

    assert ratio(0.3, 0.4, "x") == {"value": 0.3 / 0.4}
    assert ratio(-0.1, 0.2, "x") == {"value": -0.5}  # private below the public model: a negative gain, shown
    tiny = ratio(0.01, MIN_DENOMINATOR / 2, "gain NP-FL - public only")
    assert tiny["value"] is None and tiny["reason"] == "gain NP-FL - public only = 0.003 < 0.005"
    assert ratio(0.01, 0.0, "x")["value"] is None and ratio(0.01, -0.2, "x")["reason"] == "x = -0.200 < 0.005"
    assert ratio(math.nan, 0.5, "x")["value"] is None and "undefined" in ratio(0.5, math.nan, "x")["reason"]


def test_gain_kept_over_the_public_model_on_repeated_runs():
    """(mean private - public only) / (mean NP-FL from public - public only), per label, next to the share of
    NP-FL; the numbers in the JSON rows are the table's."""
    from nnunet_adpfl.workflows.fed_experiment import table_rows

    results = {"public weights only (no private training)": _public_only(0.6),
               "NP-FL from public weights": result({"lesion": 0.88}, None, 1.0),
               "NP-FL from public weights #2": result({"lesion": 0.92}, None, 1.0),
               "DP-FL from public weights": result({"lesion": 0.80}, 7.9, 1.0),
               "DP-FL from public weights #2": result({"lesion": 0.84}, 7.9, 1.0),
               "ADP-FL (defaults) from public weights": result({"lesion": 0.86}, 7.9, 1.0),
               "DP-FL from public weights [eps 1]": result({"lesion": 0.66}, 1.0, 1.0)}
    rows = {r["run"]: r for r in table_rows(results)}
    dp = rows["DP-FL from public weights"]
    assert dp["mean_dice"]["mean"] == pytest.approx(0.82) and dp["runs"] == 2
    assert dp["gain_kept"]["value"] == pytest.approx((0.82 - 0.6) / (0.90 - 0.6))  # 73%
    assert dp["gain_kept"]["references"] == ["public weights only (no private training)", "NP-FL from public weights"]
    assert dp["share_of_np_fl"]["value"] == pytest.approx(0.82 / 0.90) and "gap_closed" not in dp
    adp = rows["ADP-FL (defaults) from public weights"]
    assert adp["gap_closed"]["value"] == pytest.approx((0.86 - 0.82) / (0.90 - 0.82))
    assert adp["gain_kept"]["value"] == pytest.approx(0.26 / 0.30)
    assert rows["DP-FL from public weights [eps 1]"]["gain_kept"]["value"] == pytest.approx(0.06 / 0.30)
    assert rows["public weights only (no private training)"]["share_of_np_fl"]["value"] == pytest.approx(0.6 / 0.9)
    assert "gain_kept" not in rows["NP-FL from public weights"] and "gain_kept" not in rows[
        "public weights only (no private training)"]
    table = _row(format_task("skin", results))
    assert "| 0.820 ± 0.028 | 0.820 ± 0.028 | 91% | - | 73% | 7.90 |" in table["DP-FL from public weights (2 runs)"]
    assert "| 0.860 | 0.860 | 96% | 50% | 87% | 7.90 |" in table["ADP-FL (defaults) from public weights"]
    assert "| 0.660 | 73% | - | 20% | 1.00 |" in table["DP-FL from public weights [eps 1]"]


def test_denominators_near_zero_are_n_a_with_the_reason():
    results = {"public weights only (no private training)": _public_only(0.900),
               "NP-FL from public weights": result({"lesion": 0.902}, None, 1.0),  # public as good as NP-FL
               "DP-FL from public weights": result({"lesion": 0.905}, 7.9, 1.0),  # DP-FL above NP-FL: no gap
               "ADP-FL (defaults) from public weights": result({"lesion": 0.89}, 7.9, 1.0),
               "NP-FL": result({"lesion": 0.0}, None, 1.0), "DP-FL": result({"lesion": 0.0}, 7.9, 1.0)}
    text = format_task("skin", results)
    table = _row(text)
    assert "| 0.890 | 99% | n/a (gap NP-FL from public weights - DP-FL from public weights = -0.003 < 0.005) | " \
           "n/a (gain NP-FL from public weights - public only = 0.002 < 0.005) | 7.90 |" in \
           table["ADP-FL (defaults) from public weights"]
    assert "| 0.000 | n/a (NP-FL Dice = 0.000 < 0.005) | - | - | 7.90 |" in table["DP-FL"]
    assert "inf" not in text.lower().replace("(not private)", "") and "nan" not in text.lower()


def test_run_all_writes_the_table_and_its_numbers_as_standard_json(tmp_path, monkeypatch, capsys):
    import argparse
    import json

    from nnunet_adpfl.workflows import fed_experiment as fe

    results = {fe.PUBLIC_ONLY: _public_only(0.6), "NP-FL from public weights": result({"lesion": 0.9}, None, 1.0),
               "DP-FL from public weights": result({"lesion": 0.84}, 7.9, 1.0),
               "DP-FL from public weights #2": result({"lesion": math.nan}, 7.9, 1.0)}
    monkeypatch.setattr(fe, "run_task", lambda a, task: results)
    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    text = fe.run_all(parser.parse_args(["--work-dir", str(tmp_path), "--output", str(tmp_path / "t.md")]))
    assert "gain kept over public weights only" in capsys.readouterr().out and "| 80% |" in text
    assert (tmp_path / "results.md").read_text() == (tmp_path / "t.md").read_text() == text + "\n"
    rows = {r["run"]: r for r in json.loads((tmp_path / fe.TABLE_JSON).read_text())["skin"]}  # strict JSON: no NaN
    dp = rows["DP-FL from public weights"]
    assert dp["gain_kept"]["value"] == pytest.approx(0.8) and dp["dice"]["lesion"]["values"] == [0.84, None]
    assert dp["epsilon"] == 7.9 and rows[fe.PUBLIC_ONLY]["mb_uploaded_per_site_and_round"] is None


def test_public_weights_only_is_a_run_that_evaluates_the_public_model_without_training(tmp_path, monkeypatch):
    import argparse

    from nnunet_adpfl.workflows import fed_experiment as fe

    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    a = parser.parse_args(["--work-dir", str(tmp_path), "--runs", fe.PUBLIC_ONLY, "--scale", "0.25",
                           "--public-scale", "0.5"])
    for name in ("stage_data", "stage_plan", "create_federation"):
        monkeypatch.setattr(fe, name, lambda *args, **kw: tmp_path)
    pretrained = []
    monkeypatch.setattr(fe, "pretrain_public", lambda fed, task, work, cases, scale, *rest:
                        pretrained.append(scale) or tmp_path / "public.pth")
    monkeypatch.setattr(fe, "_evaluate_standard", lambda root, ckpt, *args: {"global_test_dice": {"lesion": 0.7},
                                                                            "checkpoint": str(ckpt)})
    monkeypatch.setattr(fe, "train_federated", lambda *args: pytest.fail("public weights only trains nothing"))
    results = fe.run_task(a, "skin")
    assert list(results) == [fe.PUBLIC_ONLY] and pretrained == [0.5]
    assert results[fe.PUBLIC_ONLY]["checkpoint"] == str(tmp_path / "public.pth")


def test_a_kept_public_cohort_written_with_other_arguments_is_refused(tmp_path):
    import json

    from nnunet_adpfl.workflows.pretrain import check_public_cohort

    (tmp_path / "sites.json").write_text(json.dumps({"task": "skin", "sites": {"A": ["A_0000"] * 60}, "scale": 0.25,
                                                     "seed": 0}))
    check_public_cohort(tmp_path, "skin", 60, 0.25, 0)  # the same cohort: reused
    with pytest.raises(SystemExit, match=r"scale 0.25 \(now 0.5\).*another work dir"):
        check_public_cohort(tmp_path, "skin", 60, 0.5, 0)


@pytest.mark.parametrize("bad, message", [("{bad", "not valid JSON"), ("[1]", "JSON object"),
                                          ('{"dp_memory_limit_mib": 0}', "must be > 0"),
                                          ('{"dp_trainabel": "all"}', "unknown setting")])
def test_bad_private_settings_are_refused_before_any_stage(tmp_path, bad, message):
    import argparse
    from nnunet_adpfl.workflows import fed_experiment as fe
    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=message):
        fe._cmd(parser.parse_args(["--work-dir", str(work), "--private-settings", bad]))
    assert not work.exists()  # refused before the data stage wrote anything
    fe.check_private_settings(parser.parse_args(["--private-settings", '{"dp_trainable": "norm_bias", '
                                                 '"dp_max_case_passes": 5200, "expected_batch_size": null}']))


@pytest.mark.parametrize("seed", [5, None])
def test_seeded_standard_training_writes_the_seed_and_runs_one_augmentation_worker(tmp_path, monkeypatch, seed):
    from nnunet_adpfl.workflows import pretrain

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setattr(pretrain, "load_federation", lambda fed: {"configuration": "2d"})
    monkeypatch.setattr(pretrain, "install_plan_and_preprocess", lambda *args: None)
    commands = []
    monkeypatch.setattr(pretrain, "run", lambda cmd, env, log: commands.append((cmd, env)))
    dataset = tmp_path / "raw" / "Dataset502_X"
    pretrain.train_standard(tmp_path / "fed", tmp_path / "raw", dataset, tmp_path / "work", 2, 3, seed=seed)
    settings = json.loads((tmp_path / "work" / "logs" / "settings.json").read_text())
    (cmd, env), = commands
    assert settings.get("seed") == seed and cmd[-3:-2] == ["nnUNetTrainerBaselineBudget"]
    assert env["nnUNet_n_proc_DA"] == ("1" if seed is not None else "2")  # several hand out batches as they finish
