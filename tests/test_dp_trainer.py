"""The DP trainers fix every nnU-Net default that breaks DP; each test fails if that fix regresses."""
import json

import numpy as np
import pytest
import torch

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.training.losses import PerCaseLoss
from nnunet_adpfl.privacy.sampling import PoissonDataLoader, poisson_mask

TRAINERS = {"nnUNetTrainerDPSGD": "flat", "nnUNetTrainerAutoS": "autos", "nnUNetTrainerNSGD": "nsgd",
            "nnUNetTrainerPSAC": "psac"}


def make_trainer(name="nnUNetTrainerDPSGD", device="cpu", settings=None, tmp_path=None, monkeypatch=None):
    from nnunetv2.run.run_training import get_trainer_from_args
    if settings is not None:
        f = tmp_path / f"settings_{name}.json"
        f.write_text(json.dumps(settings))
        monkeypatch.setenv("nnUNet_adpfl_config", str(f))
    return get_trainer_from_args("501", "3d_fullres", 0, name, "nnUNetPlans", device=torch.device(device))


SHORT = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "noise_seed": 0,
         "dp_defaults": "nnunet"}  # the plan's batch (test_dp_defaults.py tests the rule)


@pytest.fixture
def started(nnunet_paths, tmp_path, monkeypatch):
    trainer = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    trainer.on_train_start()
    yield trainer
    trainer.on_train_end()


@pytest.mark.parametrize("name,rule", TRAINERS.items())
def test_trainers_found_through_nnUNet_extTrainer(nnunet_paths, name, rule):
    trainer = make_trainer(name)
    assert trainer.rule.name == rule and type(trainer).__name__ == name


def test_a_cascade_stage_is_refused(nnunet_paths):
    """3d_cascade_fullres takes each case's segmentation by the 3d_lowres models (trained on the same patients) as
    input: their privacy cost would not be in this run's report."""
    trainer = make_trainer()
    plans = json.loads(json.dumps(trainer.plans_manager.plans))
    plans["configurations"]["3d_fullres"]["previous_stage"] = "3d_lowres"
    plans["continue_training"] = False  # as get_trainer_from_args sets it
    with pytest.raises(SettingsError, match="previous stage"):
        type(trainer)(plans, "3d_fullres", 0, trainer.dataset_json, torch.device("cpu"))


def test_amp_and_compile_off_even_on_cuda(nnunet_paths, monkeypatch):
    monkeypatch.setenv("nnUNet_compile", "true")
    trainer = make_trainer(device="cuda")  # constructing does not touch the GPU
    assert trainer.grad_scaler is None
    assert trainer._do_i_compile() is False


def test_network_loss_and_loader_are_dp_safe(started):
    t = started
    assert not any(getattr(m, "inplace", False) for m in t.network.modules())  # LeakyReLU(inplace=True) off
    assert isinstance(t.loss, PerCaseLoss)  # per-case Dice, never batch Dice
    dl = t.dataloader_train.data_loader if hasattr(t.dataloader_train, "data_loader") else t.dataloader_train.generator
    assert isinstance(dl, PoissonDataLoader)
    assert dl.get_do_oversample == dl._probabilistic_oversampling  # per-case foreground coin, not batch position
    assert dl.sample_rate == pytest.approx(t.batch_size / t.num_training_cases)
    # nnU-Net's lowest deep-supervision head (loss weight 0) is frozen, everything else is private-trained
    frozen = {n for n, p in t.network.named_parameters() if not p.requires_grad}
    assert frozen == {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}


def test_loader_batches_are_poisson_samples_with_one_patch_per_case(started):
    t = started
    sizes, keys_seen = [], []
    for _ in range(40):
        batch = next(t.dataloader_train)
        keys = list(batch["keys"])
        assert len(keys) == len(set(keys))  # no case twice (nnU-Net samples with replacement)
        if keys:
            assert batch["data"].shape[0] == len(keys)
        else:
            assert batch["data"] is None
        sizes.append(len(keys))
        keys_seen += keys
    assert len(set(sizes)) > 1  # the batch size varies
    assert set(keys_seen) <= set(t.get_tr_and_val_datasets()[0].identifiers)


def test_poisson_inclusion_frequency_and_independence():
    rng = np.random.default_rng(0)
    n, q, draws = 20, 0.15, 20_000
    masks = np.stack([poisson_mask(n, q, rng) for _ in range(draws)])
    freq = masks.mean(0)
    se = np.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(freq - q) < 5 * se)
    pair = (masks[:, 0] & masks[:, 1]).mean()
    assert abs(pair - q * q) < 5 * np.sqrt(q * q * (1 - q * q) / draws)
    sizes = masks.sum(1)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.var() - n * q * (1 - q)) < 0.1 * n * q * (1 - q)


def test_train_step_never_uses_batch_clip_or_autocast(started, monkeypatch):
    t = started

    def forbidden(*a, **k):
        raise AssertionError("a DP step must not call this")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", forbidden)
    monkeypatch.setattr(torch.amp.autocast_mode.autocast, "__enter__", forbidden)
    before = {n: p.detach().clone() for n, p in t.network.named_parameters()}
    steps = t.accountant.steps
    batch = next(b for b in iter(lambda: next(t.dataloader_train), None) if b["keys"])
    t.train_step(batch)
    assert t.accountant.steps == steps + 1
    for n, p in t.network.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n


def test_noise_scale_and_denominator_are_data_independent(started, monkeypatch):
    import nnunet_adpfl.training.dp_trainer as dpt
    t = started
    calls = []
    real = dpt.add_noise

    def spy(sums, noise_std, expected_batch_size, generator):
        calls.append((noise_std, expected_batch_size))
        return real(sums, noise_std, expected_batch_size, generator)

    monkeypatch.setattr(dpt, "add_noise", spy)
    for _ in range(6):
        t.train_step(next(t.dataloader_train))
    sigma, clip = t.privacy["noise_multiplier"], t.dp_settings["max_grad_norm"]
    assert all(c == (pytest.approx(sigma * clip), t.privacy["expected_batch_size"]) for c in calls)


def test_sigma_is_calibrated_to_the_target_before_training(started):
    from nnunet_adpfl.privacy.accounting import PrivacyAccountant
    t = started
    acc = PrivacyAccountant("rdp", 1e-5)
    acc.step(t.privacy["noise_multiplier"], t.privacy["sample_rate"], t._planned_steps())
    assert 0.98 * 8.0 <= acc.epsilon() <= 8.0


def test_budget_caps_steps_when_noise_is_fixed(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "num_epochs": 50, "noise_multiplier": 2.0, "target_epsilon": 4.0},
                     tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        left = t.privacy["steps_left"]
        assert 0 < left < t._planned_steps()
        t.accountant.step(2.0, t.privacy["sample_rate"], left)
        assert t.accountant.epsilon() <= 4.0
        t.accountant.step(2.0, t.privacy["sample_rate"], 1)
        assert t.accountant.epsilon() > 4.0
    finally:
        t.on_train_end()


def test_delta_must_be_below_one_over_n(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "delta": 0.2}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    with pytest.raises(SettingsError, match="delta"):
        t.on_train_start()


def test_checkpoint_restores_privacy_spend(started, tmp_path, monkeypatch):
    t = started
    for _ in range(3):
        t.train_step(next(t.dataloader_train))
    t.on_train_epoch_end([{"loss": np.array(1.0)}])
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    t2 = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t2.load_checkpoint(path)
    assert t2.accountant.history == t.accountant.history and t2.accountant.steps == 3
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["logging"]["epsilon"][-1] == pytest.approx(t.accountant.epsilon())


def test_baseline_trainer_takes_run_length_from_settings(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer("nnUNetTrainerBaselineBudget", settings={**SHORT, "initial_lr": 0.005}, tmp_path=tmp_path,
                     monkeypatch=monkeypatch)
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.initial_lr) == (2, 3, 1, 0.005)


def test_seeded_baseline_trainer_starts_from_the_same_weights_and_batches(nnunet_paths, tmp_path, monkeypatch):
    """With ``seed`` the standard runs of fed-compare (public pretraining, pooled nnU-Net) are reproducible: the same
    initial network and the same first augmented batches (one seeded augmentation worker)."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    starts = []
    for seed in (3, 3, 4):
        t = make_trainer("nnUNetTrainerBaselineBudget", settings={**SHORT, "seed": seed}, tmp_path=tmp_path,
                         monkeypatch=monkeypatch)
        t.on_train_start()
        try:
            batches = [next(t.dataloader_train)["data"] for _ in range(2)]
            starts.append(([p.detach().clone() for p in t.network.parameters()], batches))
        finally:
            t.on_train_end()
    (weights, batches), (weights_again, batches_again), (other_weights, other_batches) = starts
    assert all(torch.equal(a, b) for a, b in zip(weights, weights_again))
    assert all(torch.equal(a, b) for a, b in zip(batches, batches_again))
    assert not all(torch.equal(a, b) for a, b in zip(weights, other_weights))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other_batches))


def test_seeded_baseline_trainer_with_augmentation_workers_says_the_run_is_not_reproducible(nnunet_paths, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    t = make_trainer("nnUNetTrainerBaselineBudget", settings={**SHORT, "seed": 1}, tmp_path=tmp_path,
                     monkeypatch=monkeypatch)
    with open(t.log_file) as log:
        assert "set nnUNet_n_proc_DA=1 (or 0) for a reproducible run" in log.read()


def test_dp_trainable_decoder_freezes_the_encoder_and_reports_counts(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "dp_trainable": "decoder"}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        trained = {n for n, p in t.network.named_parameters() if p.requires_grad}
        assert trained == set(t.privacy["params"]) and trained
        assert all(n.startswith("decoder.") for n in trained)
        before = {n: p.detach().clone() for n, p in t.network.named_parameters()}
        t.train_step(next(b for b in iter(lambda: next(t.dataloader_train), None) if b["keys"]))
        for n, p in t.network.named_parameters():
            assert torch.equal(before[n], p.detach()) == (n not in trained), n  # frozen: no noise, no change
        counts = t.write_privacy_report(final=False)["trainable_parameters"]
        assert counts["dp_trainable"] == "decoder"
        assert counts["trainable"] == sum(p.numel() for n, p in t.network.named_parameters() if n in trained)
        assert 0 < counts["trainable"] < counts["total"]
    finally:
        t.on_train_end()


def test_multiplicity_gives_k_consecutive_patches_per_included_case(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "augmentation_multiplicity": 3}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        batch = next(b for b in iter(lambda: next(t.dataloader_train), None) if b["keys"])
        keys = list(batch["keys"])
        cases = keys[::3]
        assert keys == [k for k in cases for _ in range(3)] and len(set(cases)) == len(cases)
        assert batch["data"].shape[0] == len(keys)
        assert not torch.equal(batch["data"][0], batch["data"][1])  # each patch its own crop / augmentation
        out = t.train_step(batch)
        assert np.isfinite(out["loss"])
    finally:
        t.on_train_end()


def test_momentum_setting_reaches_the_optimizer(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "momentum": 0.5}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.initialize()
    assert {g["momentum"] for g in t.optimizer.param_groups} == {0.5}
    t0 = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t0.initialize()
    assert {g["momentum"] for g in t0.optimizer.param_groups} == {0.9}  # DP default, not nnU-Net's 0.99


def test_ema_is_the_released_model_and_survives_a_checkpoint(nnunet_paths, tmp_path, monkeypatch):
    settings = {**SHORT, "ema_decay": 0.5}
    t = make_trainer(settings=settings, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    params = t.privacy["params"]
    start = {n: p.detach().clone() for n, p in params.items()}
    iterates = []
    for _ in range(2):
        t.train_step(next(b for b in iter(lambda: next(t.dataloader_train), None) if b["keys"]))
        iterates.append({n: p.detach().clone() for n, p in params.items()})
    name = next(iter(params))
    expected = 0.25 * start[name] + 0.25 * iterates[0][name] + 0.5 * iterates[1][name]
    torch.testing.assert_close(t.ema.shadow[name], expected)
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    t2 = make_trainer(settings=settings, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t2.load_checkpoint(path)
    t2.on_train_start()
    torch.testing.assert_close(t2.ema.shadow[name], expected)
    t2.on_train_end()
    t.on_train_end()
    torch.testing.assert_close(dict(t.network.named_parameters())[name].detach(), expected)
    assert "EMA" in t.write_privacy_report(final=True)["released_model"]
