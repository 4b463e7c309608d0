"""``nnunet-adpfl recipe``: its sigma spends at most the budget (independent accountant), SNR arithmetic, choices."""
import json
import math

import pytest
from opacus.accountants import RDPAccountant

from nnunet_adpfl.workflows import recipe
from nnunet_adpfl.privacy.accounting import RDP_ORDERS
from nnunet_adpfl.cli import main


def test_each_candidate_spends_at_most_the_budget():
    cands = recipe.candidates(40, 4.0, 1e-5, [50, 200], [2, 8, 32])
    assert {(c.steps, c.batch) for c in cands} == {(50, 2), (50, 8), (200, 2), (200, 8)}  # 32 > N/2 dropped
    for c in cands:
        acc = RDPAccountant()
        acc.history = [(c.sigma, c.batch / 40, c.steps)]
        assert 3.8 <= acc.get_epsilon(delta=1e-5, alphas=RDP_ORDERS) <= 4.0


def test_noise_and_snr_arithmetic():
    c = recipe.Candidate(steps=100, batch=4, sample_rate=0.1, sigma=2.0)
    assert c.noise_std(clip=0.5) == pytest.approx(0.25)  # sigma * C / B
    assert c.snr(10_000) == pytest.approx(4 / (2.0 * 100))
    assert c.snr_over_run(10_000) == pytest.approx(c.snr(10_000) * 10)


def test_suggestion_uses_norm_bias_when_fine_tuning_and_respects_memory():
    cands = recipe.candidates(64, 8.0, 1e-5, [100], [2, 4, 8, 16])
    counts = {"all": 10**6, "decoder": 5 * 10**5, "norm_bias": 2000}
    best, settings = recipe.suggest(cands, counts, pretrained=True, max_batch=8, epsilon=8.0)
    assert settings["dp_trainable"] == "norm_bias" and settings["initial_lr"] == recipe.FINETUNE_LR
    _, no_norm_bias = recipe.suggest(cands, {"all": 10**6, "decoder": 5 * 10**5}, True, 8, 8.0)
    assert no_norm_bias["dp_trainable"] == "decoder"
    assert best.batch <= 8 and settings["expected_batch_size"] == best.batch
    assert settings["num_epochs"] * settings["num_iterations_per_epoch"] == best.steps
    _, scratch = recipe.suggest(cands, counts, pretrained=False, max_batch=8, epsilon=8.0)
    assert scratch["dp_trainable"] == "all" and "initial_lr" not in scratch
    low = recipe.candidates(64, 1.0, 1e-5, [100], [2, 4, 8, 16])
    _, at_eps1 = recipe.suggest(low, counts, pretrained=True, max_batch=8, epsilon=1.0)
    assert at_eps1["initial_lr"] == recipe.LOW_EPSILON_FINETUNE_LR < recipe.FINETUNE_LR
    _, at_eps4 = recipe.suggest(cands, counts, pretrained=True, max_batch=8, epsilon=4.0)
    assert at_eps4["initial_lr"] == recipe.FINETUNE_LR


@pytest.mark.parametrize("cases, epsilon, delta, match", [(1, 8, 1e-5, "at least 2"), (100, 8, 0.02, "delta"),
                                                          (100, 0, 1e-5, "epsilon")])
def test_bad_input_is_refused(cases, epsilon, delta, match):
    with pytest.raises(ValueError, match=match):
        recipe.candidates(cases, epsilon, delta, [10], [2])


def test_cli_prints_table_and_settings(capsys):
    assert main(["recipe", "--cases", "30", "--epsilon", "8", "--steps", "50", "--batch-sizes", "2", "4",
                 "--trainable-parameters", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "| 50 | 4 | 0.133 |" in out and '"dp_trainable": "all"' in out and "warning" in out
    assert not math.isnan(float(out.split("| 50 | 2 | 0.0667 | ")[1].split(" ")[0]))


def test_fine_tuning_recipe_says_where_the_clip_norm_comes_from():
    cands = recipe.candidates(64, 8.0, 1e-5, [100], [4])
    counts = {"all": 10**6, "norm_bias": 2000}
    tuned = recipe.format_recipe(cands, counts, 1.0, recipe.suggest(cands, counts, True, 8, 8.0), 8.0, 1e-5, 64)
    scratch = recipe.format_recipe(cands, counts, 1.0, recipe.suggest(cands, counts, False, 8, 8.0), 8.0, 1e-5, 64)
    assert "nnUNetTrainerDPClipCalibration" in tuned and "nnUNetTrainerDPClipCalibration" not in scratch
    assert "decoder instead of norm_bias when the public model misses a class" in tuned
    assert "For ADP-FL keep adpfl_clip_max_ratio at 1" in tuned
    assert "warning" not in tuned and "below 1" in scratch  # fine-tuning: the bound is held against 0.15, not 1
    noisy = recipe.Candidate(100, 4, 0.06, 30.0)  # norm_bias bound 4*10/(30*sqrt(2000)) = 0.03
    settings = {"dp_trainable": "norm_bias", "initial_lr": 0.03}
    assert "stay near the public model" in recipe.format_recipe([noisy], counts, 1.0, (noisy, settings), 8.0, 1e-5, 64)


def test_recipe_takes_the_spatial_dimensions_from_the_plan_or_the_configuration(tmp_path):
    plans = tmp_path / "nnUNetPlans.json"
    plans.write_text(json.dumps({"configurations": {"2d": {"patch_size": [40, 40]},
                                                    "3d_fullres": {"patch_size": [24, 28, 24]}}}))
    plan = recipe.read_plan(str(plans), "2d")
    assert recipe.spatial_dims(plan, "2d") == 2 and recipe.spatial_dims(plan, "3d_fullres") == 3
    assert recipe.spatial_dims(None, "2d") == 2 and recipe.spatial_dims(None, "3d_lowres") == 3
    cands = recipe.candidates(51, 8.0, 1e-5, [50], [8])  # brain's site A of "In 3D at 41-67 cases per site"
    counts = {"all": 325_190, "decoder": 182_819, "norm_bias": 1_027}
    assert recipe.suggest(cands, counts, True, 8, 8.0, spatial_dims=3, sites=3)[1]["dp_trainable"] == "all"  # 0.093
    assert recipe.suggest(cands, counts, True, 8, 8.0, spatial_dims=2, sites=3)[1]["dp_trainable"] == "norm_bias"
    assert recipe.suggest(cands, counts, True, 8, 8.0, spatial_dims=3)[1]["dp_trainable"] == "decoder"  # one site


def test_recipe_refuses_a_missing_malformed_or_foreign_plan_with_a_clear_error(tmp_path):
    bad, listed = tmp_path / "bad.json", tmp_path / "list.json"
    bad.write_text("{not json")
    listed.write_text("[1, 2]")
    for path, message in ((tmp_path / "missing.json", "cannot read --plans"), (bad, "cannot read --plans"),
                          (listed, "is not a JSON object")):
        with pytest.raises(SystemExit, match=message):
            recipe.read_plan(str(path), "3d_fullres")
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps({"configurations": {"2d": {"patch_size": [40, 40]}}}))
    with pytest.raises(SystemExit, match="has no configuration '3d_fullres'"):
        recipe.read_plan(str(plans), "3d_fullres")


def test_recipe_needs_the_sites_a_federated_fine_tuning_round_averages(capsys):
    base = ["recipe", "--cases", "30", "--epsilon", "8", "--trainable-parameters", "1000"]
    for extra, message in ((["--sites", "3"], "give --rounds too"), (["--rounds", "5", "--sites", "0"], "at least one"),
                           (["--rounds", "5", "--pretrained"], "give --sites")):
        with pytest.raises(SystemExit, match=message):
            main(base + extra)
