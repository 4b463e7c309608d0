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
        assert 1 <= len(pairs) <= 15
        assert all(1 <= b <= n // 2 and t * b <= budget for t, b in pairs)
        assert all(b & (b - 1) == 0 for _, b in pairs)  # powers of two
    assert {t for t, _ in dp_defaults.search_pairs(100, 10**6, steps=60)} == {60}
    assert {b for _, b in dp_defaults.search_pairs(100, 10**6, batch=8)} == {8}


def test_rule_best_bound_then_budget_from_scratch_fewest_passes_otherwise():
    c = dp_defaults.Candidate
    cands = [c(1000, 4, 0.1, 1.0), c(1000, 8, 0.2, 1.9), c(4000, 8, 0.2, 4.0), c(250, 16, 0.4, 1.0)]
    # bounds (x sqrt d): 126, 133, 126, 253: the last, alone within 10% of the best
    assert dp_defaults.best_candidate(cands, 100) == cands[3]
    flat = [c(1000, 4, 0.1, 1.0), c(1000, 8, 0.2, 1.9), c(16000, 2, 0.05, 1.9)]  # 126, 133, 133: all within 10%
    assert dp_defaults.best_candidate(flat, 100, pretrained=True) == flat[0]  # fine-tuning: fewest passes
    assert dp_defaults.best_candidate(flat, 10**6) == flat[0]  # bound < 1 (learns little): fewest passes
    # from scratch, bound >= 1: at least half the most passes (32000: only (16000, 2)), then the largest B
    assert dp_defaults.best_candidate(flat, 100) == flat[2]
    flat.append(c(64000, 1, 0.025, 1.9))  # 133 and 64000 passes: (16000, 2) still spends half, with a larger B
    assert dp_defaults.best_candidate(flat, 100) == flat[2]
    flat.append(c(8000, 8, 0.2, 5.3))  # 135 and 64000 passes: of the three with >= 32000, the largest B
    assert dp_defaults.best_candidate(flat, 100) == flat[4]


def test_issue_numbers_real_calibration():
    """Issue 39: N = 2,700, B = 256, 500 steps, epsilon 8 -> sigma 1.57, noise 0.006 per coordinate, bound about 6.6
    (d = 3e5); N = 20, B = 4, 200 steps -> sigma 2.01, noise 0.50, bound about 0.05."""
    big = dp_defaults.calibrated(2700, 8.0, 1e-5, [(500, 256)])[0]
    assert big.sigma == pytest.approx(1.57, abs=0.01) and big.noise_std(1.0) == pytest.approx(0.0061, abs=2e-4)
    assert big.snr_over_run(3 * 10**5) == pytest.approx(6.6, abs=0.1)
    small = dp_defaults.calibrated(20, 8.0, 1e-5, [(200, 4)])[0]
    assert small.sigma == pytest.approx(2.01, abs=0.01) and small.noise_std(1.0) == pytest.approx(0.50, abs=0.01)
    assert small.snr_over_run(3 * 10**5) == pytest.approx(0.05, abs=0.005)


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
    tuned, _, _ = dp_defaults.choose(dp_defaults.Inputs(200, 2.0, 1e-5, COUNTS, True, 2, clip_given=True), {})
    assert tuned["dp_trainable"] == "norm_bias" and tuned["initial_lr"] == dp_defaults.LOW_EPSILON_FINETUNE_LR
    capped, best_capped, _ = dp_defaults.choose(dp_defaults.Inputs(200, 8.0, 1e-5, COUNTS, False, 2, budget=3000),
                                                {})
    assert best_capped.steps * best_capped.batch <= 3000


MAIN_JOB_COUNTS = {"all": 162_246, "decoder": 96_102, "norm_bias": 1_446}  # the main job's 2D net


BRAIN_W32_COUNTS = {"all": 325_190, "decoder": 182_819, "norm_bias": 1_027}  # the 3D net of "Near the threshold"


def test_fine_tuning_trains_the_largest_set_whose_bound_reaches_the_threshold_for_its_cohort():
    def pick(sigma, cases=23, counts=MAIN_JOB_COUNTS, dims=2, sites=3):  # bound 8*sqrt(50)/(sigma*sqrt(d))
        return dp_defaults.finetune_trainable(counts, dp_defaults.Candidate(50, 8, 8 / cases, sigma), dims, sites)
    assert pick(0.5)[0] == "all"  # all 0.28
    choice, why = pick(1.0)  # all 0.14, decoder 0.18
    assert choice == "decoder" and why.startswith("decoder: the largest set whose bound over the run reaches its "
                                                  "threshold when fine-tuning at N=23 in 2D, 3 sites averaged per "
                                                  "round") and "all 0.14, decoder 0.18" in why
    assert pick(1.82)[0] == "norm_bias"  # all 0.077, decoder 0.10: the main job's 23 cases per site
    assert pick(0.5, counts={"norm_bias": 1_446, "decoder": 96_102})[0] == "decoder"  # a network without that set
    assert pick(1.0, cases=79)[0] == "decoder" and pick(1.0, cases=80)[0] == "all"  # 2D: 0.15 below 80 cases, 0.09 from
    assert pick(2.2, cases=80)[0] == "norm_bias"  # all 0.064, decoder 0.083: below 0.09 at 80 cases too
    assert pick(1.0, cases=39, dims=3)[0] == "decoder" and pick(1.0, cases=40, dims=3)[0] == "all"  # 3D: from 40
    brain = dict(counts=BRAIN_W32_COUNTS, dims=3)  # 3D decoder: 0.065 from 20 cases
    assert pick(2.02, cases=20, **brain)[0] == "decoder" and pick(2.02, cases=19, **brain)[0] == "norm_bias"
    assert pick(2.1, cases=20, **brain)[0] == "norm_bias"  # decoder 0.063 < 0.065
    assert pick(1.0, cases=79, dims=1)[0] == "decoder"  # other dimensions: 2D's cut
    # fewer sites average less noise: thresholds x sqrt(3/K); more than 3 keep 3's
    assert pick(2.02, cases=20, sites=1, **brain)[0] == "norm_bias"  # decoder 0.065 < 0.065 * sqrt(3) = 0.113
    assert pick(1.16, cases=20, sites=1, **brain)[0] == "decoder"  # decoder 0.114
    assert pick(1.3, cases=20, sites=2, **brain)[0] == "decoder" and pick(1.8, cases=20, sites=2, **brain)[0] == \
        "norm_bias"  # decoder 0.102 / 0.074 against 0.065 * sqrt(3/2) = 0.080
    assert pick(2.02, cases=20, sites=10, **brain)[0] == "decoder" and pick(2.1, cases=20, sites=10, **brain)[0] == \
        "norm_bias"
    assert "in 3D, a single site (all 0.16 from 40 cases, decoder 0.11 from 20 cases, else 0.26;" in \
        pick(2.02, cases=20, sites=1, **brain)[1]


def test_fine_tuning_choice_at_the_measured_cohorts_and_what_keeps_the_default_set():
    """The runs behind the thresholds (B = 8, 5 rounds x 10 steps): 2D at epsilon 8, 23 cases per site ->
    norm_bias, 124 and 201 -> all (the measured winners); 3D (brain, width 32) at epsilon 8 and 5, 82-134 cases ->
    all (above decoder and norm_bias on 3 seeds each), at epsilon 8, 41-67 cases -> all or decoder (both far above
    norm_bias, 3 seeds), 20-33 cases -> decoder (above norm_bias and all, 3 seeds); a given max_grad_norm or
    dp_trainable keeps its set."""
    fixed = {"expected_batch_size": 8, "num_iterations_per_epoch": 10}

    def chosen(n, epsilon=8.0, counts=MAIN_JOB_COUNTS, sites=3, **kw):
        inp = dp_defaults.Inputs(n, epsilon, 1e-5, counts, True, 8, epochs=5, sites=sites, **kw)
        return dp_defaults.choose(inp, fixed)
    small, best, why = chosen(23)
    assert small["dp_trainable"] == "norm_bias" and best.sigma == pytest.approx(1.82, abs=0.01)
    assert ("norm_bias: no larger set's bound over the run reaches its threshold when fine-tuning at N=23 in 2D, 3 "
            "sites averaged per round (all 0.09 from 80 cases, decoder 0.09 from 80 cases, else 0.15; all 0.077, "
            "decoder 0.1)") in why
    assert chosen(124)[0]["dp_trainable"] == chosen(201)[0]["dp_trainable"] == "all"
    for n, epsilon in ((103, 8.0), (134, 8.0), (82, 8.0), (103, 5.0), (134, 5.0), (82, 5.0), (51, 8.0), (67, 8.0)):
        brain, best, why = chosen(n, epsilon, BRAIN_W32_COUNTS, spatial_dims=3)
        assert brain["dp_trainable"] == "all", (n, epsilon, why)
    assert best.snr_over_run(BRAIN_W32_COUNTS["all"]) == pytest.approx(0.107, abs=0.001)  # N = 67 at epsilon 8
    site_c, best, why = chosen(41, 8.0, BRAIN_W32_COUNTS, spatial_dims=3)  # all 0.082 < 0.09 <= decoder 0.109
    assert site_c["dp_trainable"] == "decoder" and "(all 0.09 from 40 cases, decoder 0.065 from 20" in why
    for n in (25, 33, 20):  # all 0.058 / 0.071 / 0.049, decoder 0.078 / 0.095 / 0.065
        assert chosen(n, 8.0, BRAIN_W32_COUNTS, spatial_dims=3)[0]["dp_trainable"] == "decoder", n
    # one site alone (brain, N = 26: decoder 0.080 fell below norm_bias) and at N = 44
    alone, best, why = chosen(26, 8.0, BRAIN_W32_COUNTS, spatial_dims=3, sites=1)
    assert alone["dp_trainable"] == "norm_bias" and best.snr_over_run(BRAIN_W32_COUNTS["decoder"]) == \
        pytest.approx(0.080, abs=0.001) and "a single site" in why
    # the same cohort in 2D: 0.15 (in 2D at 36-60 cases all at 0.11-0.14 was no better than norm_bias)
    assert chosen(51, 8.0, BRAIN_W32_COUNTS)[0]["dp_trainable"] == "norm_bias"
    kept, _, why = chosen(201, clip_given=True)
    assert kept["dp_trainable"] == "norm_bias" and "max_grad_norm is given" in why
    assert "dp_trainable" not in dp_defaults.choose(
        dp_defaults.Inputs(201, 8.0, 1e-5, MAIN_JOB_COUNTS, True, 8, epochs=5), {**fixed, "dp_trainable": "decoder"})[0]


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
    assert "when fine-tuning at N=8 in 3D, a single site (all 0.16 from 40 cases" in trainer.dp_defaults["why"]
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


SENSIBLE_N = (20, 160, 450, 2700, 3300)  # one hospital's site up to HAM10000 over 3 sites


def test_rule_is_sensible_from_20_to_3300_cases(fast_calibration):
    """From scratch (d = 3e5, plan batch 2, nnU-Net's budget of 500,000 per-case passes): a cohort too small to learn
    (bound < 1) gets the cheapest run within 10% of the best bound; larger ones spend at least half the budget with
    the largest batch within 10% of the best bound; the budget and N/2 are never exceeded."""
    batches = []
    for n in SENSIBLE_N:
        inp = dp_defaults.Inputs(n, 8.0, 1e-5, {"all": 3 * 10**5}, pretrained=False, plan_batch=2)
        chosen, best, why = dp_defaults.choose(inp, {})
        _, _, cands = dp_defaults.rule_candidates(inp, {})
        top = dp_defaults.best_bound(cands, 3 * 10**5)
        assert best.batch <= n // 2 and best.steps * best.batch <= 500_000 and best.steps % dp_defaults.STEP_QUANTUM == 0
        near = [c for c in cands if c.snr_over_run(3 * 10**5) >= 0.9 * top]
        assert best in near
        if top < 1:
            assert "below 1" in why and best.steps * best.batch == min(c.steps * c.batch for c in near)
        else:
            assert best.steps * best.batch >= 250_000 and "the budget spent" in why
            most = max(c.steps * c.batch for c in near)
            assert best == max((c for c in near if 2 * c.steps * c.batch >= most), key=lambda c: (c.batch, c.steps))
        batches.append(best.batch)
    assert batches[0] < batches[-1]
    tuning = dp_defaults.Inputs(2700, 8.0, 1e-5, COUNTS, True, 2)
    _, tuned, why = dp_defaults.choose(tuning, {})
    cands = dp_defaults.rule_candidates(tuning, {})[2]
    top = dp_defaults.best_bound(cands, COUNTS["norm_bias"])
    assert top >= 1 and "fine-tuning public weights: the fewest" in why  # fine-tuning: the cheapest run in the band
    assert tuned.steps * tuned.batch == min(c.steps * c.batch for c in cands
                                            if c.snr_over_run(COUNTS["norm_bias"]) >= 0.9 * top)


@pytest.mark.slow  # real calibration of about 70 (T, B): minutes on a loaded machine
def test_rule_with_real_calibration_from_20_to_3300_cases():
    """The same with Opacus' calibration: 20 cases learn little (bound < 1: 250 steps); from 450 cases the run spends
    the budget with a batch of at least 128 and noise of at most 0.1 per coordinate per step."""
    for n in SENSIBLE_N:
        inp = dp_defaults.Inputs(n, 8.0, 1e-5, {"all": 3 * 10**5}, pretrained=False, plan_batch=2)
        _, best, _ = dp_defaults.choose(inp, {})
        assert best.batch <= n // 2 and best.steps * best.batch <= 500_000
        if n == 20:
            assert best.steps == 250
        if n >= 450:
            assert best.steps * best.batch >= 250_000 and best.batch >= 128 and best.noise_std(1.0) <= 0.1


def test_federated_steps_are_multiples_of_the_rounds(fast_calibration):
    """A site: the federation fixes rounds x epochs per round (here 20 x 2); the rule chooses the iterations per epoch
    (and B) with the site's N, the budget spent over the whole run."""
    inp = dp_defaults.Inputs(2700, 8.0, 1e-5, {"all": 3 * 10**5}, False, 2, epochs=40)
    chosen, best, why = dp_defaults.choose(inp, {})
    assert "num_epochs" not in chosen and chosen["num_iterations_per_epoch"] * 40 == best.steps
    assert best.steps * best.batch >= 250_000 and "40 epochs (rounds x epochs per round)" in why
    assert all(t % 40 == 0 for t, _ in dp_defaults.search_pairs(2700, 500_000, unit=40))
    fixed, best_fixed, _ = dp_defaults.choose(inp, {"num_iterations_per_epoch": 5})
    assert best_fixed.steps == 200 and "num_iterations_per_epoch" not in fixed


def make_federation(tmp_path, settings: dict, initial_weights=None, quorum=None) -> dict:
    """A dpfl federation of sites A, B over 3 rounds x 2 epochs; returns site A's settings."""
    from nnunet_adpfl.federation.aggregator import create_federation
    fed, keys = tmp_path / "fed", tmp_path / "keys"
    create_federation(fed, keys, ["A", "B"], 3, 2, "dpfl", configuration="3d_fullres", initial_weights=initial_weights,
                      quorum=quorum)
    return {"federation_dir": str(fed), "site_id": "A", "site_key_file": str(keys / "A.key"), **settings}


def test_federated_trainer_uses_the_rule_with_the_sites_cases(nnunet_paths, tmp_path, monkeypatch,
                                                              fast_calibration):
    trainer = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path, {}), tmp_path=tmp_path,
                           monkeypatch=monkeypatch)
    trainer.initialize()
    record, n = trainer.dp_defaults, len(trainer.do_split()[0])
    assert record["mode"] == "auto (federated: site A)" and f"N={n}," in record["why"]
    assert "6 epochs (rounds x epochs per round)" in record["why"]
    chosen = record["chosen"]
    assert set(chosen) == {"expected_batch_size", "num_iterations_per_epoch", "dp_trainable", "momentum"}
    assert trainer.num_epochs == 6 and trainer.num_iterations_per_epoch == chosen["num_iterations_per_epoch"]
    assert trainer.dp_settings["expected_batch_size"] == chosen["expected_batch_size"] <= n // 2
    inp = dp_defaults.Inputs(n, 8.0, 1e-5, dp_defaults.trainable_counts(trainer.network), False, trainer.batch_size,
                             epochs=6)
    assert dp_defaults.choose(inp, {})[0] == chosen  # the rule's choice for the site's N over the federation's run
    with open(trainer.log_file) as f:
        assert f"DP defaults (auto (federated: site A)): chose {chosen}" in f.read()


def test_federated_fine_tuning_from_the_federations_public_weights(nnunet_paths, tmp_path, monkeypatch,
                                                                   fast_calibration):
    public = tmp_path / "public.pth"
    public.write_bytes(b"public weights")  # only its hash goes into federation.json here
    trainer = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path, {}, public), tmp_path=tmp_path,
                           monkeypatch=monkeypatch)
    trainer.initialize()
    assert trainer.dp_settings["dp_trainable"] == "norm_bias" and trainer.initial_lr == dp_defaults.FINETUNE_LR
    why = trainer.dp_defaults["why"]
    assert "public weights" in why and "when fine-tuning at N=8 in 3D, 2 sites averaged per round (all 0.11" in why
    quorum = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path / "q", {}, public, quorum=1),
                          tmp_path=tmp_path, monkeypatch=monkeypatch)
    quorum.initialize()  # a round may close with one site's update: the thresholds of a single site
    assert "when fine-tuning at N=8 in 3D, a single site (all 0.16" in quorum.dp_defaults["why"]
    clip = make_federation(tmp_path / "c", {"max_grad_norm": 0.4}, public)
    clipped = make_trainer("nnUNetTrainerDPFL", settings=clip, tmp_path=tmp_path, monkeypatch=monkeypatch)
    clipped.initialize()
    assert "max_grad_norm is given" in clipped.dp_defaults["why"]


def test_federated_explicit_settings_win_and_nnunet_restores(nnunet_paths, tmp_path, monkeypatch, fast_calibration):
    given = {"expected_batch_size": 3, "num_iterations_per_epoch": 4, "dp_trainable": "decoder", "momentum": 0.5}
    trainer = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path, given), tmp_path=tmp_path,
                           monkeypatch=monkeypatch)
    trainer.initialize()
    assert trainer.dp_defaults["chosen"] == {} and trainer.num_iterations_per_epoch == 4
    assert all(trainer.dp_settings[k] == v for k, v in given.items() if k != "num_iterations_per_epoch")
    old = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path / "b", {"dp_defaults": "nnunet"}),
                       tmp_path=tmp_path, monkeypatch=monkeypatch)
    old.initialize()
    assert old.dp_defaults["mode"] == "nnunet (federated: steps from federation.json)"
    assert (old.num_epochs, old.num_iterations_per_epoch, old.dp_settings["dp_trainable"]) == (6, 250, "all")
    assert old.dp_defaults["chosen"] == {"expected_batch_size": min(old.batch_size, len(old.do_split()[0]) // 2)}


def test_calibrations_are_reused_only_when_the_accountant_confirms_them(tmp_path, monkeypatch):
    """A restart reuses the rule's calibrations from the run's folder; a sigma edited below its calibration (less
    noise: more epsilon than the key says) or damaged is recalibrated, never used."""
    monkeypatch.setattr(dp_defaults, "_calibrations", {})
    sigma = dp_defaults.calibrate(8.0, 1e-5, 0.1, 200)
    dp_defaults.save_calibrations(tmp_path)
    monkeypatch.setattr(dp_defaults, "_calibrations", {})
    assert dp_defaults.load_calibrations(tmp_path) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("calibrated again")
    with monkeypatch.context() as m:
        m.setattr("nnunet_adpfl.privacy.accounting.calibrate_noise_multiplier", no_search)
        assert dp_defaults.calibrate(8.0, 1e-5, 0.1, 200) == sigma
    path = tmp_path / dp_defaults.CALIBRATION_CACHE
    for edited in (0.9 * sigma, 1.5 * sigma, "NaN", None):
        content = json.loads(path.read_text())
        content["calibrations"][0]["sigma"] = edited
        path.write_text(json.dumps(content))
        monkeypatch.setattr(dp_defaults, "_calibrations", {})
        assert dp_defaults.load_calibrations(tmp_path) == 0 and dp_defaults._calibrations == {}
    path.write_text("{not json")
    assert dp_defaults.load_calibrations(tmp_path) == 0


def test_recipe_prints_what_a_federated_site_chooses(nnunet_paths, tmp_path, monkeypatch, capsys, fast_calibration):
    """recipe --rounds/--epochs-per-round: the federated trainer's choice for the site's N (same rule, same inputs)."""
    trainer = make_trainer("nnUNetTrainerDPFL", settings=make_federation(tmp_path, {}), tmp_path=tmp_path,
                           monkeypatch=monkeypatch)
    trainer.initialize()
    root, _ = nnunet_paths
    folder = next((root / "nnUNet_preprocessed").glob("Dataset501_*"))
    assert main(["recipe", "--cases", str(len(trainer.do_split()[0])), "--epsilon", "8", "--rounds", "3",
                 "--epochs-per-round", "2", "--plans", str(folder / "nnUNetPlans.json"), "--dataset-json",
                 str(folder / "dataset.json")]) == 0
    printed = capsys.readouterr().out.split(recipe.TRAINER_HEAD)[1].strip()
    settings, _ = json.JSONDecoder().raw_decode(printed)
    assert settings == {"target_epsilon": 8.0, **trainer.dp_defaults["chosen"]}
    assert "num_iterations_per_epoch" in settings and "num_epochs" not in settings
