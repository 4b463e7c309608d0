"""DP-aware defaults (training/dp_defaults.py): the plan's batch never stops training, the rule picks what the
settings leave out, explicit settings win, 'nnunet' restores nnU-Net's defaults, and ``recipe`` prints the trainer's
choice."""
import json
import math

import pytest

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.training import dp_defaults
from nnunet_adpfl.cli import main
from nnunet_adpfl.workflows import recipe

from test_dp_trainer import make_trainer, started  # noqa: F401 (fixture)

COUNTS = {"all": 10**6, "decoder": 5 * 10**5, "norm_bias": 2000}


def fake_sigma(epsilon, delta, q, steps, accountant="rdp"):
    """Deterministic stand-in for Opacus' calibration (seconds per call): noise grows with q*sqrt(T)/epsilon."""
    return 0.5 + 2 * q * math.sqrt(steps) / epsilon


@pytest.fixture
def fast_calibration(monkeypatch):
    monkeypatch.setattr(dp_defaults, "calibrate", fake_sigma)


def test_unset_batch_is_the_plans_at_most_half_the_cases():
    assert dp_defaults.unset_batch(10, 8) == 4  # ResEnc presets: plan batch 10, fold of 8 cases
    assert dp_defaults.unset_batch(2, 8) == 2 and dp_defaults.unset_batch(10, 3) == 1


def test_search_stays_small_within_the_budget_and_half_the_cases():
    for n, budget in ((8, 25_000_000), (390, 500_000), (2700, 2_500_000), (20, 2000)):
        pairs = dp_defaults.search_pairs(n, budget)
        assert 1 <= len(pairs) <= 12
        assert all(1 <= b <= n // 2 and t * b <= budget for t, b in pairs)
        assert all(b & (b - 1) == 0 for _, b in pairs)  # powers of two
    assert {t for t, _ in dp_defaults.search_pairs(100, 10**6, steps=60)} == {60}
    assert {b for _, b in dp_defaults.search_pairs(100, 10**6, batch=8)} == {8}


def test_rule_best_bound_then_fewest_passes_within_ten_percent():
    c = dp_defaults.Candidate
    cands = [c(1000, 4, 0.1, 1.0), c(1000, 8, 0.2, 1.9), c(4000, 8, 0.2, 4.0), c(250, 16, 0.4, 1.0)]
    # bounds (x sqrt d): 126, 133, 126, 253: the last, alone within 10% of the best
    assert dp_defaults.best_candidate(cands, 100) == cands[3]
    cheap = [c(1000, 4, 0.1, 1.0), c(1000, 8, 0.2, 1.9)]  # 126 within 10% of 133 and half the passes
    assert dp_defaults.best_candidate(cheap, 100) == cheap[0]


def test_choose_fills_only_what_is_not_given(fast_calibration):
    inp = dp_defaults.Inputs(200, 8.0, 1e-5, COUNTS, pretrained=False, plan_batch=2)
    chosen, best, why = dp_defaults.choose(inp, {})
    assert set(chosen) == {"expected_batch_size", "num_epochs", "num_iterations_per_epoch", "dp_trainable",
                           "momentum"}
    assert chosen["num_epochs"] * chosen["num_iterations_per_epoch"] == best.steps
    assert chosen["expected_batch_size"] == best.batch <= 100 and chosen["dp_trainable"] == "all"
    assert "N=200" in why and f"T={best.steps}, B={best.batch}" in why
    fixed, best_fixed, _ = dp_defaults.choose(inp, {"num_epochs": 3, "dp_trainable": "decoder", "momentum": 0.5})
    assert best_fixed.steps == 3 * 250 and set(fixed) == {"expected_batch_size"}
    above_half, _, _ = dp_defaults.choose(inp, {"expected_batch_size": 150})  # explicit, > N/2: allowed as before
    assert "expected_batch_size" not in above_half
    tuned, _, _ = dp_defaults.choose(dp_defaults.Inputs(200, 2.0, 1e-5, COUNTS, True, 2), {})
    assert tuned["dp_trainable"] == "norm_bias" and tuned["initial_lr"] == dp_defaults.LOW_EPSILON_FINETUNE_LR
    capped, best_capped, _ = dp_defaults.choose(dp_defaults.Inputs(200, 8.0, 1e-5, COUNTS, False, 2, budget=3000),
                                                {})
    assert best_capped.steps * best_capped.batch <= 3000


def b10_plan(nnunet_paths) -> str:
    """nnU-Net's plan of the test dataset with the batch of the ResEnc presets (10)."""
    root, env = nnunet_paths
    folder = next((root / "nnUNet_preprocessed").glob("Dataset501_*"))
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlansB10"
    plans["configurations"]["3d_fullres"]["batch_size"] = 10
    (folder / "nnUNetPlansB10.json").write_text(json.dumps(plans))
    return "nnUNetPlansB10"


def b10_trainer(nnunet_paths, tmp_path, monkeypatch, settings):
    from nnunetv2.run.run_training import get_trainer_from_args
    import torch
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(settings))
    monkeypatch.setenv("nnUNet_adpfl_config", str(f))
    return get_trainer_from_args("501", "3d_fullres", 0, "nnUNetTrainerDPSGD", b10_plan(nnunet_paths),
                                 device=torch.device("cpu"))


def test_plan_batch_above_the_fold_is_an_input_not_an_error(nnunet_paths, tmp_path, monkeypatch):
    trainer = b10_trainer(nnunet_paths, tmp_path, monkeypatch, {"dp_defaults": "nnunet"})
    trainer.initialize()
    dl_train, _ = trainer.get_dataloaders()
    assert trainer.batch_size == 10 and trainer.num_training_cases == 8
    assert trainer._sample_rate() == pytest.approx(4 / 8)  # the plan's 10, at most N/2
    explicit = b10_trainer(nnunet_paths, tmp_path, monkeypatch, {"expected_batch_size": 10})
    with pytest.raises(SettingsError, match="expected_batch_size 10 exceeds the 8 training cases of fold 0"):
        explicit.initialize()


def test_nnunet_setting_restores_nnunets_defaults(nnunet_paths, tmp_path, monkeypatch):
    trainer = make_trainer(settings={"dp_defaults": "nnunet"}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.initialize()
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.initial_lr) == (1000, 250, 1e-2)
    s = trainer.dp_settings
    assert (s["expected_batch_size"], s["dp_trainable"], s["momentum"]) == (trainer.batch_size, "all", 0.9)
    assert trainer.dp_defaults["mode"] == "nnunet"


def test_trainer_fine_tuning_defaults_and_explicit_settings_win(nnunet_paths, tmp_path, monkeypatch,
                                                                fast_calibration):
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "501", "3d_fullres", "0", "-pretrained_weights", "w.pth"])
    trainer = make_trainer(settings={}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.initialize()
    assert trainer.dp_settings["dp_trainable"] == "norm_bias" and trainer.initial_lr == dp_defaults.FINETUNE_LR
    assert trainer.optimizer.param_groups[0]["lr"] == dp_defaults.FINETUNE_LR
    given = {"dp_trainable": "decoder", "initial_lr": 0.001, "num_epochs": 2, "num_iterations_per_epoch": 3,
             "expected_batch_size": 3, "momentum": 0.5}
    explicit = make_trainer(settings=given, tmp_path=tmp_path, monkeypatch=monkeypatch)
    explicit.initialize()
    assert explicit.dp_defaults["chosen"] == {}
    assert (explicit.num_epochs, explicit.num_iterations_per_epoch, explicit.initial_lr) == (2, 3, 0.001)
    assert all(explicit.dp_settings[k] == given[k] for k in ("dp_trainable", "expected_batch_size", "momentum"))


def test_recipe_prints_what_the_trainer_chooses(nnunet_paths, tmp_path, monkeypatch, capsys):
    """Real calibration: the trainer's choice (no settings but a small compute cap) is the recipe's."""
    trainer = make_trainer(settings={"dp_max_case_passes": 2000}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.initialize()
    chosen = trainer.dp_defaults["chosen"]
    assert trainer.dp_defaults["mode"] == "auto" and "expected_batch_size" in chosen and "num_epochs" in chosen
    assert chosen["expected_batch_size"] * chosen["num_epochs"] * chosen["num_iterations_per_epoch"] <= 2000
    root, _ = nnunet_paths
    folder = next((root / "nnUNet_preprocessed").glob("Dataset501_*"))
    assert main(["recipe", "--cases", str(len(trainer.do_split()[0])), "--epsilon", "8", "--max-case-passes", "2000",
                 "--plans", str(folder / "nnUNetPlans.json"), "--dataset-json", str(folder / "dataset.json")]) == 0
    printed = capsys.readouterr().out.split(recipe.TRAINER_HEAD)[1].strip()
    settings, _ = json.JSONDecoder().raw_decode(printed)
    assert settings == {"target_epsilon": 8.0, **chosen}


def test_log_and_report_say_what_was_chosen_and_why(started):
    record = started.write_privacy_report(final=False)["dp_defaults"]
    assert record == {"mode": "nnunet", "chosen": {"expected_batch_size": 2},
                      "why": "the plan's batch 2 at most N/2 = 4; other settings as given or nnU-Net's"}
    with open(started.log_file) as f:
        assert f"DP defaults (nnunet): chose {record['chosen']}; {record['why']}" in f.read()
