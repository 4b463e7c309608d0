"""What the DP trainers log at the start of private training, fresh and resumed (issue 37), and the small-fold
warning in the log and the privacy report."""
import json
from pathlib import Path

import numpy as np
import pytest

from test_dp_trainer import SHORT, make_trainer

from nnunet_adpfl.privacy.accounting import PrivacyAccountant
from nnunet_adpfl.privacy.report import NO_NOISE_WARNING, REPORT_NAME, privacy_report
from nnunet_adpfl.privacy.small_fold import SIGMA_WARN, cases_for_sigma, small_fold_warning


def _log(trainer) -> str:
    with open(trainer.log_file) as f:
        return f.read()


def test_fresh_start_log_explains_steps_frozen_tensors_and_weights(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        log = _log(t)
        assert "6 planned steps (all within budget)" in log
        assert f"engine {t.privacy['per_case'].engine} (auto)" in log and "engine auto" not in log  # what runs
        assert ("(2 tensors frozen: not reached by the loss, e.g. nnU-Net's deep-supervision head of weight 0)"
                in log)  # dp_trainable all: nnU-Net's lowest deep-supervision output has loss weight 0
        assert "initial weights: random initialisation (nnU-Net's)" in log
        assert "small fold" not in log and t.write_privacy_report(final=False)["small_fold_warning"] is None
    finally:
        t.on_train_end()


def test_resumed_start_says_so_and_counts_the_remaining_steps(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    t.accountant.step(t.privacy["noise_multiplier"], t.privacy["sample_rate"], 3)  # as if 3 steps were trained
    t.on_train_epoch_end([{"loss": np.array(1.0)}])
    path = str(tmp_path / "checkpoint_latest.pth")
    t.save_checkpoint(path)
    resumed = make_trainer(settings=SHORT, tmp_path=tmp_path, monkeypatch=monkeypatch)
    resumed.load_checkpoint(path)  # what nnUNetv2_train --c does
    resumed.on_train_start()
    try:
        log = _log(resumed)
        assert "6 planned steps (3 taken before this start, 3 remaining, all within budget)" in log
        assert ("resumed from a checkpoint at epoch 1 (3 private steps accounted); first start from: random "
                "initialisation (nnU-Net's)") in log
        assert "initial weights: random" not in log
    finally:
        resumed.on_train_end()


def test_small_fold_warns_once_in_log_and_report(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "target_epsilon": 0.3}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        assert t.privacy["noise_multiplier"] > SIGMA_WARN
        warning = t.write_privacy_report(final=False)["small_fold_warning"]
        assert warning.startswith(f"small fold: {t.num_training_cases} training cases")
        assert _log(t).count(f"WARNING: {warning}") == 1
    finally:
        t.on_train_end()


def test_cases_for_sigma_is_the_smallest_n_within_the_budget():
    b, eps, delta, steps = 2, 8.0, 1e-5, 25000
    n = cases_for_sigma(SIGMA_WARN, b, eps, delta, steps)

    def spent(cases):
        return PrivacyAccountant("rdp", delta).epsilon([(SIGMA_WARN, b / cases, steps)])
    assert spent(n) <= eps < spent(n - 1)
    assert cases_for_sigma(SIGMA_WARN, b, eps, delta, steps, start=n + 5) == n + 5  # already enough
    assert small_fold_warning(SIGMA_WARN, 3, b, eps, delta, steps) is None
    message = small_fold_warning(50.0, 3, b, eps, delta, steps)
    assert f"About {n} training cases would allow sigma 4" in message and "q = 0.667" in message


def test_no_noise_warns_in_log_and_report(nnunet_paths, tmp_path, monkeypatch):
    t = make_trainer(settings={**SHORT, "target_epsilon": None, "noise_multiplier": 0.0}, tmp_path=tmp_path,
                     monkeypatch=monkeypatch)
    t.on_train_start()
    try:
        assert _log(t).count(f"WARNING: {NO_NOISE_WARNING}") == 1
        t.accountant.step(0.0, t.privacy["sample_rate"], 2)  # as if 2 steps were trained
        content = t.write_privacy_report(final=False)
        assert content["epsilon"] is None and content["guarantee_void_no_noise"] is True
        json.loads((Path(t.output_folder) / REPORT_NAME).read_text(), parse_constant=_refuse)  # valid JSON
    finally:
        t.on_train_end()


def _refuse(token):
    raise ValueError(f"{token} is not JSON")


def test_the_report_flags_no_guarantee_only_without_noise():
    def report(sigma):
        acc = PrivacyAccountant("rdp", 1e-5)
        acc.step(sigma, 0.1, 100)
        return privacy_report(accountant=acc, noise_multiplier=sigma, sample_rate=0.1, clipping={}, max_grad_norm=1.0,
                              num_cases=20, expected_batch_size=2, target_epsilon=None, planned_steps=100,
                              budget_exhausted=False, trainer="t", final=True, deterministic_noise=False)
    assert report(0.0)["guarantee_void_no_noise"] and report(0.0)["epsilon"] is None
    assert not report(1.0)["guarantee_void_no_noise"] and report(1.0)["epsilon"] > 0
