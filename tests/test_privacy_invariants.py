"""Privacy invariants of issue 36 that need no trainer: ordered Poisson draws, refused running statistics, earlier
accounts in an output folder, the local-only log."""
import json
import math
import time

import pytest
import torch
from torch import nn

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.privacy.report import REPORT_NAME
from nnunet_adpfl.privacy.sampling import training_augmenter
from nnunet_adpfl.training.trainable import make_dp_safe


class _TaggedDraws:
    """A loader whose draws say which worker made them and in which order; worker 0's draws are slow (as a draw of
    more or larger cases is)."""

    def __init__(self):
        self.thread_id, self.count = 0, 0

    def set_thread_id(self, thread_id):
        self.thread_id = thread_id

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(0.4 if self.thread_id == 0 else 0.0)
        self.count += 1
        return {"data": None, "target": None, "keys": [], "draw": (self.thread_id, self.count),
                "torch_threads": torch.get_num_threads()}


def test_training_workers_hand_out_draws_in_draw_order_whatever_their_duration():
    augmenter = training_augmenter(_TaggedDraws(), 2, False)
    try:
        batches = [next(augmenter) for _ in range(6)]
    finally:
        augmenter._finish()
    order = [b["draw"] for b in batches]
    # torch on one thread in the workers (its OpenMP pool, inherited through fork, can deadlock them)
    assert {b["torch_threads"] for b in batches} == {1}
    # round-robin over the workers, each worker's draws in sequence: fast draws never overtake slow ones
    assert order == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d, nn.InstanceNorm3d])
def test_make_dp_safe_refuses_instance_norm_running_statistics(norm):
    with pytest.raises(SettingsError, match="track_running_stats=True"):
        make_dp_safe(nn.Sequential(nn.Conv2d(1, 2, 3), norm(2, affine=True, track_running_stats=True)))
    make_dp_safe(nn.Sequential(nn.Conv2d(1, 2, 3), norm(2, affine=True)))  # nnU-Net's default: accepted


def test_earlier_accounts_are_listed_on_a_fresh_start_and_kept_on_resume(tmp_path):
    from nnunet_adpfl.privacy.resume import EARLIER_KEY, describe_earlier, earlier_accounts, refuse_uncovered_resume
    assert earlier_accounts(tmp_path, resumed=False) == [] and describe_earlier([]) is None
    first = {"epsilon": 2.5, "delta": 1e-5, "steps": 40, "history": [[1.1, 0.25, 40]], "trainer": "T",
             "written": "2026-01-01T00:00:00+00:00"}
    (tmp_path / REPORT_NAME).write_text(json.dumps({**first, "final": True}))
    assert earlier_accounts(tmp_path, resumed=False) == [first]
    assert earlier_accounts(tmp_path, resumed=True) == []  # a resumed run continues that account
    second = {**first, "steps": 7, "epsilon": 0.5}
    (tmp_path / REPORT_NAME).write_text(json.dumps({**second, EARLIER_KEY: [first]}))
    assert earlier_accounts(tmp_path, resumed=True) == [first]  # kept when the second run resumes
    assert earlier_accounts(tmp_path, resumed=False) == [first, second]
    assert "epsilon 2.5 (delta 1e-05) after 40 steps" in describe_earlier([first])
    refuse_uncovered_resume(str(tmp_path / "checkpoint_latest.pth"))
    refuse_uncovered_resume(None)
    with pytest.raises(SettingsError, match="checkpoint_best.pth"):
        refuse_uncovered_resume(str(tmp_path / "checkpoint_best.pth"))


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"earlier_accounts_in_this_folder": 3}'])
def test_an_unreadable_earlier_account_stops_with_a_clear_error(tmp_path, text):
    from nnunet_adpfl.privacy.resume import earlier_accounts
    (tmp_path / REPORT_NAME).write_text(text)
    with pytest.raises(SettingsError, match="earlier run's privacy account but cannot be read"):
        earlier_accounts(tmp_path, resumed=False)


def test_local_log_keeps_one_value_per_epoch_and_drops_those_of_an_interrupted_run(tmp_path):
    from nnunet_adpfl.privacy.local_log import epoch_values, read_local_log, record_epoch
    values = epoch_values([1.0, float("nan"), 3.0], [(0.5, 0.1), (float("nan"), 0.3)])
    assert values == {"train_loss": 2.0, "cos_raw_clipped": 0.5, "cos_raw_noisy": pytest.approx(0.2)}
    for epoch in range(3):
        record_epoch(tmp_path, epoch, {"train_loss": float(epoch)})
    record_epoch(tmp_path, 1, {"train_loss": 10.0})  # resumed at epoch 1: epoch 2's value was not kept
    assert read_local_log(tmp_path) == {"train_loss": [0.0, 10.0]}
    assert math.isnan(epoch_values([], None)["train_loss"])
