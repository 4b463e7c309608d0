"""3-site federations through the stock nnUNetv2_train: NP-FL, DP-FL, the plan-mismatch refusal, and kills of
a site and of the aggregator that end (deterministic mode) with the same weights as an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from nnunet_adpfl.federation import files as ff
from nnunet_adpfl.federation.aggregator import create_federation
from nnunet_adpfl.nnunet.pipeline import nnunet_command, wait_all as pipeline_wait_all
from nnunet_adpfl.privacy.adaptive import noise_aware_clip_lr
from nnunet_adpfl.workflows.stages import (Layout, stage_data, stage_plan, new_run, start_aggregator, start_site,
                                         site_validation, summarise)

SITES = ["A", "B", "C"]
CONFIG = "2d"
ITERATIONS = 3
SHORT = {"num_val_iterations_per_epoch": 1, "target_epsilon": 8}
DETERMINISTIC = {**SHORT, "seed": 1, "noise_seed": 2}  # seeded sampling, augmentation and noise
ROUNDS = 2  # the resumed round and the upload residual carried into it; 3 cost a minute of the default suite


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Synthetic skin data over 3 sites, one federated plan, every site preprocessed with it."""
    work = tmp_path_factory.mktemp("federation")
    lay = Layout(work, SITES, run="planning")
    pooled = stage_data(lay, "skin", num_cases=18, scale=0.25, seed=0)  # >= 5 cases per site (5 folds)
    create_federation(lay.fed, lay.keys, SITES, 1, 1, "npfl", configuration=CONFIG)
    stage_plan(lay, pooled, CONFIG)
    return work, pooled


def wait_all(procs: dict, timeout: float = 600) -> None:
    end = time.time() + timeout

    def before_the_deadline() -> None:
        assert time.time() < end, "federation did not finish in time"
    try:
        bad = pipeline_wait_all(procs, 1, before_the_deadline)
        assert not bad, f"failed: {bad}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs.values()), {n: p.returncode for n, p in procs.items()}


def run_federation(work, run, trainer, mode, rounds, settings, n_proc_da="1", initial_weights=None,
                   release_ema_decay=None):
    lay = Layout(work, SITES, run)
    new_run(lay, work / "planning", mode, rounds, 1, ITERATIONS, CONFIG, seed=0, initial_weights=initial_weights,
            release_ema_decay=release_ema_decay)
    procs = {"aggregator": start_aggregator(lay)}
    procs.update({s: start_site(lay, s, trainer, CONFIG, settings, n_proc_da) for s in SITES})
    return lay, procs


def fold(lay, site, pooled, trainer):
    return lay.results / site / pooled.name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"


def final_weights(lay, site, pooled, trainer):
    return torch.load(fold(lay, site, pooled, trainer) / "checkpoint_final.pth", weights_only=False)["network_weights"]


def global_tensors(lay, r):
    return ff.stored_global(lay.fed, r)


def assert_sites_hold_global(lay, pooled, trainer, rounds):
    g = global_tensors(lay, rounds)
    for site in SITES:
        w = final_weights(lay, site, pooled, trainer)
        assert all(torch.equal(w[k].cpu(), g[k]) for k in g), site


@pytest.mark.slow  # ~2 min; the default suite runs the ADP-FL federation end to end (NP-FL: the main job)
def test_npfl_federation(planned):
    work, pooled = planned
    lay, procs = run_federation(work, "npfl", "nnUNetTrainerFL", "npfl", 2, SHORT)
    wait_all(procs)
    assert_sites_hold_global(lay, pooled, "nnUNetTrainerFL", 2)
    manifest = ff.read_json(ff.global_paths(lay.fed, 2)[1])
    assert manifest["sites"] == SITES
    assert not (fold(lay, "A", pooled, "nnUNetTrainerFL") / "privacy_report.json").exists()


@pytest.mark.slow  # ~2 min; the default suite checks the same end-of-training step without nnU-Net
def test_released_model_is_the_ema_of_the_globals_at_every_site(planned):
    work, pooled = planned
    lay, procs = run_federation(work, "dpfl_ema", "nnUNetTrainerDPFL", "dpfl", 3, SHORT, release_ema_decay=0.5)
    wait_all(procs)
    g = [global_tensors(lay, r) for r in (1, 2, 3)]
    expected = {k: 0.25 * g[0][k] + 0.25 * g[1][k] + 0.5 * g[2][k] if v.is_floating_point() else v
                for k, v in g[2].items()}
    for site in SITES:
        w = final_weights(lay, site, pooled, "nnUNetTrainerDPFL")
        assert all(torch.allclose(w[k].cpu(), expected[k], atol=1e-6) for k in expected), site
        report = json.loads((fold(lay, site, pooled, "nnUNetTrainerDPFL") / "privacy_report.json").read_text())
        assert "EMA of the global models" in report["released_model"]


def uninterrupted(planned, trainer, mode, settings):
    """A deterministic federation run to its end (single-threaded data loading)."""
    lay, procs = run_federation(planned[0], f"{mode}_reference", trainer, mode, ROUNDS, settings, n_proc_da="0")
    wait_all(procs)
    return lay


@pytest.fixture(scope="module")
def dpfl_reference(planned):
    return uninterrupted(planned, "nnUNetTrainerDPFL", "dpfl", DETERMINISTIC)


@pytest.mark.slow  # ~3 min; the default suite runs ADP-FL (a DP-FL subclass) with its privacy reports
def test_dpfl_federation_and_prediction(planned, dpfl_reference):
    work, pooled = planned
    lay = dpfl_reference
    assert_sites_hold_global(lay, pooled, "nnUNetTrainerDPFL", ROUNDS)
    for site in SITES:
        report = json.loads((fold(lay, site, pooled, "nnUNetTrainerDPFL") / "privacy_report.json").read_text())
        assert report["steps"] == ROUNDS * ITERATIONS and 0 < report["epsilon"] <= 8
        update = ff.read_json(ff.update_paths(lay.fed, ROUNDS, site)[1])
        assert update["epsilon"] == pytest.approx(report["epsilon"])
    summary = summarise(lay, "nnUNetTrainerDPFL", CONFIG, pooled, None)  # runs nnUNetv2_predict
    assert set(summary["global_test_dice"]) == {"lesion"} and summary["bytes_uploaded"] > 0


def test_site_with_other_plans_is_refused(planned, tmp_path):
    work, pooled = planned
    lay = Layout(work, SITES, "mismatch")
    new_run(lay, work / "planning", "npfl", 1, 1, ITERATIONS, CONFIG, seed=0)
    env = lay.site_env("A")
    own = tmp_path / "preprocessed"
    shutil.copytree(env["nnUNet_preprocessed"], own)
    plans_file = own / pooled.name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIG]["batch_size"] += 1
    plans_file.write_text(json.dumps(plans))
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"federation_dir": str(lay.fed), "site_id": "A",
                                    "site_key_file": str(lay.keys / "A.key")}))
    env = {**env, "nnUNet_preprocessed": str(own), "nnUNet_adpfl_config": str(settings)}
    out = subprocess.run([nnunet_command("nnUNetv2_train"), "501", CONFIG, "0", "-tr", "nnUNetTrainerFL", "-device",
                          "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "differ from the federation's plan" in out.stdout + out.stderr


@pytest.mark.slow  # ~3 min; the default suite fine-tunes from public weights with stock -pretrained_weights
def test_dpfl_from_public_weights_trains_only_the_decoder(planned):
    """Round 0 is the public weights file; with dp_trainable=decoder the encoder is neither noised nor uploaded
    and stays the public one; the report names the file's sha256 and says it must be public."""
    from safetensors.torch import save_file

    from nnunet_adpfl.federation.aggregator import build_initial_model, plans_files
    from nnunet_adpfl.common.initial_weights import file_sha256
    work, pooled = planned
    plans, dataset_json = (json.loads(p.read_text()) for p in plans_files(work / "planning"))
    public = build_initial_model(plans, dataset_json, CONFIG, seed=123)
    weights = work / "public.safetensors"
    save_file(public, weights)
    trainer = "nnUNetTrainerDPFL"
    lay, procs = run_federation(work, "public", trainer, "dpfl", 1, {**SHORT, "dp_trainable": "decoder"},
                                initial_weights=weights)
    wait_all(procs)
    g0, g1 = global_tensors(lay, 0), global_tensors(lay, 1)
    assert all(torch.equal(g0[k], public[k]) for k in public)
    encoder = [k for k in public if k.startswith("encoder.")]
    assert encoder and all(torch.equal(g1[k], public[k]) for k in encoder)
    assert any(not torch.equal(g1[k], public[k]) for k in public if k.startswith("decoder."))
    for site in SITES:
        manifest = ff.read_json(ff.update_paths(lay.fed, 1, site)[1])
        assert manifest["subset"] is True
        sent = ff.read_verified_tensors(ff.update_paths(lay.fed, 1, site)[0], manifest, None)
        assert sent and not any(k.startswith("encoder.") for k in sent)
        report = json.loads((fold(lay, site, pooled, trainer) / "privacy_report.json").read_text())
        origin = report["initial_weights"]
        assert origin["federation_initial_weights"]["sha256"] == file_sha256(weights)
        assert "must be public" in origin["requirement"]
        assert report["trainable_parameters"]["trainable"] < report["trainable_parameters"]["total"]


ADPFL = {**DETERMINISTIC, "adpfl_noise_schedule": "exponential", "adpfl_adaptive_clip": True,  # every mechanism
         "adpfl_step_sparsity": "topk_prev_global", "adpfl_step_density": 0.3, "adpfl_upload_density": 0.05,
         "adpfl_error_feedback": True}


@pytest.fixture(scope="module")
def adpfl_reference(planned):
    return uninterrupted(planned, "nnUNetTrainerADPFL", "adpfl", ADPFL)


def wait_for(condition, procs, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and all(p.poll() is None for p in procs.values())
        time.sleep(0.1)


@pytest.mark.parametrize("trainer, mode, settings, reference, kill_at", [
    pytest.param("nnUNetTrainerDPFL", "dpfl", DETERMINISTIC, "dpfl_reference", "next_round", marks=pytest.mark.slow),
    # the upload residual carried between rounds must survive a restart from either checkpoint of round 1: ours
    # before the upload (killed while waiting for the round to close) and nnU-Net's after it (in round 2)
    pytest.param("nnUNetTrainerADPFL", "adpfl", ADPFL, "adpfl_reference", "waiting", marks=pytest.mark.slow),
    ("nnUNetTrainerADPFL", "adpfl", ADPFL, "adpfl_reference", "next_round")])
def test_killed_site_and_aggregator_resume_to_the_same_weights(planned, trainer, mode, settings, reference, kill_at,
                                                               request):
    work, pooled = planned
    reference, rounds = request.getfixturevalue(reference), ROUNDS
    lay, procs = run_federation(work, f"{mode}_interrupted_{kill_at}", trainer, mode, rounds, settings,
                                n_proc_da="0")
    if kill_at == "waiting":  # B uploaded round 1 and waits for the others
        wait_for(lambda: ff.update_paths(lay.fed, 1, "B")[1].exists(), procs)
    else:  # B wrote nnU-Net's checkpoint after loading global model 1, and trains round 2
        closed, latest = ff.global_paths(lay.fed, 1)[1], fold(lay, "B", pooled, trainer) / "checkpoint_latest.pth"
        wait_for(lambda: closed.exists() and latest.exists() and latest.stat().st_mtime > closed.stat().st_mtime,
                 procs)
        time.sleep(0.5)
    for name in ("B", "aggregator"):
        os.kill(procs[name].pid, signal.SIGKILL)
        procs[name].wait()
    procs["aggregator"] = start_aggregator(lay)   # restarted with the same commands
    procs["B"] = start_site(lay, "B", trainer, CONFIG, settings, n_proc_da="0")
    wait_all(procs)

    g_ref, g = global_tensors(reference, rounds), global_tensors(lay, rounds)
    assert all(torch.equal(g_ref[k], g[k]) for k in g_ref)
    assert_sites_hold_global(lay, pooled, trainer, rounds)
    ref_b = json.loads((fold(reference, "B", pooled, trainer) / "privacy_report.json").read_text())
    got_b = json.loads((fold(lay, "B", pooled, trainer) / "privacy_report.json").read_text())
    assert got_b["steps"] == ref_b["steps"] == rounds * ITERATIONS  # no step counted twice or lost
    assert got_b["epsilon"] == pytest.approx(ref_b["epsilon"])


def test_adpfl_federation_spends_the_target_and_uploads_sparse(planned, adpfl_reference):
    work, pooled = planned
    trainer, lay = "nnUNetTrainerADPFL", adpfl_reference
    assert_sites_hold_global(lay, pooled, trainer, ROUNDS)
    dense_bytes = ff.global_paths(lay.fed, ROUNDS)[0].stat().st_size
    for site in SITES:
        report = json.loads((fold(lay, site, pooled, trainer) / "privacy_report.json").read_text())
        assert 0.98 * 8 <= report["epsilon"] <= 8  # the calibrated schedule spends the whole budget
        sigmas = report["adpfl"]["noise_schedule"]["noise_multiplier_per_round"]
        assert len(sigmas) == ROUNDS and sigmas[0] > sigmas[-1]  # decaying noise
        assert 0 < report["adpfl"]["adaptive_clipping"]["current_clip"] <= report["max_grad_norm"]
        clipping = report["adpfl"]["adaptive_clipping"]
        assert clipping["max_clip"] == report["max_grad_norm"]  # default ratio 1
        assert clipping["learning_rate"] == noise_aware_clip_lr(clipping["count_noise_multiplier"],
                                                                report["expected_batch_size"])  # unset: auto
        for r in range(1, ROUNDS + 1):
            manifest = ff.read_json(ff.update_paths(lay.fed, r, site)[1])
            assert manifest["encoding"] == "topk"
            assert manifest["bytes"] < dense_bytes / 5  # 5% of the coordinates at 12 bytes each: ~1/6.7
    # a site that died during its final validation: summarise finishes it with the stock --val
    validation = fold(lay, "B", pooled, trainer) / "validation"
    site_dice = json.loads((validation / "summary.json").read_text())["foreground_mean"]["Dice"]
    shutil.rmtree(validation)
    report = (fold(lay, "B", pooled, trainer) / "privacy_report.json").read_text()
    summary = summarise(lay, trainer, CONFIG, pooled, None)  # the final global model through nnUNetv2_predict
    assert set(summary["global_test_dice"]) == {"lesion"} and summary["bytes_uploaded"] > 0
    assert summary["sites"]["B"]["validation_dice"] == pytest.approx(site_dice, abs=1e-6)
    assert (validation / "summary.json").exists() and (lay.logs / "validate_B.log").exists()
    assert (fold(lay, "B", pooled, trainer) / "privacy_report.json").read_text() == report  # no step, no spend


def test_summarise_refuses_a_site_without_a_final_checkpoint(tmp_path):
    lay = Layout(tmp_path, SITES, "unfinished")
    fold_b = lay.results / "B" / "Dataset501_x" / f"nnUNetTrainerDPFL__nnUNetPlans__{CONFIG}" / "fold_0"
    fold_b.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="site B: no final checkpoint.*train_B.log"):
        site_validation(lay, "B", "nnUNetTrainerDPFL", CONFIG, fold_b)


def test_summarise_refuses_a_missing_validation_without_the_site_settings(tmp_path):
    lay = Layout(tmp_path, SITES, "settings_gone")
    fold_b = lay.results / "B" / "Dataset501_x" / f"nnUNetTrainerDPFL__nnUNetPlans__{CONFIG}" / "fold_0"
    fold_b.mkdir(parents=True)
    (fold_b / "checkpoint_final.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="site B: final validation missing.*settings/B.json"):
        site_validation(lay, "B", "nnUNetTrainerDPFL", CONFIG, fold_b)


@pytest.mark.slow  # ~1.5 min; its parts are in the default suite (ADP-FL federations, DP-Morph train/predict)
def test_adpfl_with_morphology_in_a_federation(planned):
    """The FL flavour of DP-Morph: every site trains ADP-FL through the morphology; the sites' plans still match
    the federation's (the morph entry is outside the digest) and the model folder records it for prediction."""
    work, pooled = planned
    trainer = "nnUNetTrainerADPFLMorph"
    lay, procs = run_federation(work, "adpfl_morph", trainer, "adpfl", 2, {**SHORT, "clipping_rule": "autos"})
    wait_all(procs)
    assert_sites_hold_global(lay, pooled, trainer, 2)
    for site in SITES:
        report = json.loads((fold(lay, site, pooled, trainer) / "privacy_report.json").read_text())
        assert report["dp_morph"]["operations"] == ["none", "both"] and "adpfl" in report
        assert report["clipping"]["rule"] == "autos" and 0 < report["epsilon"] <= 8
        plans = json.loads((fold(lay, site, pooled, trainer).parent / "plans.json").read_text())
        assert plans["dp_morph"] == report["dp_morph"]
