"""Clip calibration on public data: the norms it reports are the per-case gradient norms of the private step's
trainable parameters, and it trains nothing."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_adpfl.privacy.sampling import batch_to_device
from nnunet_adpfl.training.clip_calibration import (CALIBRATION_FILE, read_suggested_clip, summarise_norms)
from test_dp_trainer import make_trainer


def test_summary_quantiles_and_suggestion():
    norms = np.arange(1.0, 102.0)  # 1..101: quantile q is 1 + 100 q
    s = summarise_norms(norms, quantile=0.25)
    assert s["cases_measured"] == 101 and s["suggested_max_grad_norm"] == pytest.approx(26.0)
    assert s["quantiles"]["0.5"] == pytest.approx(51.0) and s["quantiles"]["0.9"] == pytest.approx(91.0)


@pytest.mark.parametrize("norms,quantile,message", [([], 0.5, "every Poisson batch was empty"),
                                                    ([1.0, np.nan], 0.5, "not finite"),
                                                    ([1.0], 1.0, "quantile must be in")])
def test_summary_refuses_what_cannot_give_a_clip_norm(norms, quantile, message):
    with pytest.raises(ValueError, match=message):
        summarise_norms(norms, quantile)


def test_read_suggested_clip_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nnUNetTrainerDPClipCalibration"):
        read_suggested_clip(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"epsilon": 8}')
    with pytest.raises(ValueError, match="not a clip calibration"):
        read_suggested_clip(tmp_path / "other.json")
    (tmp_path / "zero.json").write_text('{"suggested_max_grad_norm": 0}')
    with pytest.raises(ValueError, match="must be > 0"):
        read_suggested_clip(tmp_path / "zero.json")


def test_calibration_reports_per_case_norms_of_the_trainable_parameters_and_trains_nothing(nnunet_paths, tmp_path,
                                                                                           monkeypatch):
    settings = {"num_iterations_per_epoch": 2, "dp_trainable": "norm_bias", "expected_batch_size": 3}
    trainer = make_trainer("nnUNetTrainerDPClipCalibration", settings=settings, tmp_path=tmp_path,
                           monkeypatch=monkeypatch)
    start, seen = trainer.on_train_start, {}

    def start_with_a_fixed_batch():
        start()
        torch.manual_seed(0)
        np.random.seed(0)
        batch = next(b for b in trainer.dataloader_train if b["data"] is not None)
        trainer.dataloader_train = itertools.repeat(batch)  # both measured batches are this one
        seen["batch"] = batch
        seen["weights"] = {k: v.clone() for k, v in trainer.network.state_dict().items()}

    monkeypatch.setattr(trainer, "on_train_start", start_with_a_fixed_batch)
    trainer.run_training()

    out = Path(trainer.output_folder)
    result = json.loads((out / CALIBRATION_FILE).read_text())
    data, target = batch_to_device(seen["batch"], trainer.device)
    params = [p for p in trainer.network.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in params) == result["trainable_parameters"] < \
        sum(p.numel() for p in trainer.network.parameters())
    reference = []  # an independent per-case loop over the same batch
    for i in range(data.shape[0]):
        loss = trainer.loss.per_case(trainer.network(data[i:i + 1]), [t[i:i + 1] for t in target]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        reference.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None))))
    expected = summarise_norms(reference * 2)
    assert result["cases_measured"] == 2 * data.shape[0]
    for q, v in expected["quantiles"].items():
        assert result["quantiles"][q] == pytest.approx(v, rel=1e-4)
    assert read_suggested_clip(out / CALIBRATION_FILE) == pytest.approx(expected["suggested_max_grad_norm"], rel=1e-4)
    assert result["dp_trainable"] == "norm_bias" and "public" in result["note"]
    after = trainer.network.state_dict()
    assert all(torch.equal(seen["weights"][k], after[k]) for k in after)  # nothing trained
    assert not list(out.glob("checkpoint*.pth"))


def test_calibrate_clip_runs_the_stock_command_and_keeps_its_result(nnunet_paths, tmp_path, monkeypatch):
    from nnunet_adpfl.workflows.pretrain import CALIBRATION_TRAINER, calibrate_clip
    root, _ = nnunet_paths
    trainer = make_trainer(settings={"dp_defaults": "nnunet"}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.initialize()  # only its network: no dp_defaults search (minutes of noise calibration on a loaded machine)
    weights = tmp_path / "public.pth"
    torch.save({"network_weights": trainer.network.state_dict()}, weights)
    settings = {"dp_trainable": "norm_bias", "expected_batch_size": 3, "target_epsilon": 8.0}
    clip = calibrate_clip(root, "Dataset501_SynthKidney", "3d_fullres", weights, settings)
    result = root / "nnUNet_results" / "Dataset501_SynthKidney" / f"{CALIBRATION_TRAINER}__nnUNetPlans__3d_fullres" / \
        "fold_all" / CALIBRATION_FILE
    stored = json.loads(result.read_text())
    assert clip == read_suggested_clip(result) > 0
    assert stored["settings"] == {"dp_trainable": "norm_bias", "expected_batch_size": 3}
    assert stored["initial_weights"]["file"] == str(weights)
    stamp = result.stat().st_mtime_ns
    assert calibrate_clip(root, "Dataset501_SynthKidney", "3d_fullres", weights, settings) == clip
    assert result.stat().st_mtime_ns == stamp  # same settings and weights: not measured again
    runs = []
    monkeypatch.setattr("nnunet_adpfl.workflows.pretrain.run", lambda command, *args: runs.append(command))
    torch.save({"network_weights": {k: v + 1 for k, v in trainer.network.state_dict().items()}}, weights)
    calibrate_clip(root, "Dataset501_SynthKidney", "3d_fullres", weights, settings)
    assert len(runs) == 1 and CALIBRATION_TRAINER in runs[0]  # other weights at the same path: measured again


def test_calibration_trainer_calibrates_no_noise(nnunet_paths, tmp_path, monkeypatch):
    """Nothing is trained or released: no noise multiplier search at the start (90-150 s on a loaded machine);
    dp_trainable is what the private run's rule chooses (public weights: norm_bias)."""
    def no_search(*args, **kwargs):
        raise AssertionError("noise calibration in the clip calibration trainer")
    monkeypatch.setattr("nnunet_adpfl.privacy.accounting.calibrate_noise_multiplier", no_search)
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "501", "3d_fullres", "all", "-pretrained_weights", "w.pth"])
    trainer = make_trainer("nnUNetTrainerDPClipCalibration", settings={"num_iterations_per_epoch": 1},
                           tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.initialize()
    assert trainer.dp_defaults["mode"] == "auto (no private step: no noise search)"
    assert trainer.dp_settings["dp_trainable"] == "norm_bias" and trainer._noise_multiplier(0.5) == 0.0


def test_clip_argument_and_public_clip_needs_public_runs():
    import argparse
    from nnunet_adpfl.workflows import fed_experiment as fe
    parser = argparse.ArgumentParser()
    fe.add_arguments(parser)
    assert parser.parse_args(["--clip", "public"]).clip == "public"
    assert parser.parse_args(["--clip", "0.5"]).clip == 0.5
    for bad in ("0", "-1", "median"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--clip", bad])
    fe.check_clip_choice(parser.parse_args(["--clip", "public", "--runs", "NP-FL", "DP-FL from public weights"]))
    for runs in (["DP-FL", "DP-FL from public weights"], ["NP-FL"]):
        with pytest.raises(SystemExit, match="--clip public"):
            fe.check_clip_choice(parser.parse_args(["--clip", "public", "--runs", *runs]))
