"""Privacy invariants of the DP trainer on the real nnU-Net trainer (issue 36): nothing unnoised in a checkpoint,
the newest account restored, no resume from checkpoint_best, an earlier account in the folder reported, the loader
sampling at the accountant's rate, K augmented patches of a case clipped together, the sampling seed flagged."""
import json
import math

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.privacy.local_log import read_local_log
from nnunet_adpfl.privacy.report import REPORT_NAME
from nnunet_adpfl.privacy.sampling import batch_to_device
from tests.test_dp_trainer import SHORT, make_trainer


def trainer_in(tmp_path, monkeypatch, settings, folder="fold"):
    t = make_trainer(settings={**SHORT, **settings}, tmp_path=tmp_path, monkeypatch=monkeypatch)
    t.output_folder = str(tmp_path / folder)  # not the session's shared results folder
    return t


def a_case(t, multiplicity=1):
    """The K patches of one included case from the trainer's own loader."""
    batch = next(b for b in iter(lambda: next(t.dataloader_train), None) if b["keys"])
    target = [x[:multiplicity] for x in batch["target"]] if isinstance(batch["target"], list) \
        else batch["target"][:multiplicity]
    return {"data": batch["data"][:multiplicity], "target": target, "keys": batch["keys"][:multiplicity]}


def test_checkpoints_carry_no_unnoised_value_and_restore_the_newest_account(nnunet_paths, tmp_path, monkeypatch):
    t = trainer_in(tmp_path, monkeypatch, {"log_alignment": True})
    t.on_train_start()
    case = a_case(t)
    for epoch in range(2):  # two logged epochs: the restore must take the newest accountant state
        t.current_epoch = epoch
        t.on_train_epoch_end([t.train_step(case) for _ in range(epoch + 1)])
    path = tmp_path / "fold" / "checkpoint_final.pth"
    t.save_checkpoint(str(path))
    logging = torch.load(path, map_location="cpu", weights_only=False)["logging"]
    local = read_local_log(tmp_path / "fold")
    unnoised = [v for k in ("train_loss", "cos_raw_clipped", "cos_raw_noisy") for v in local[k]]
    assert len(unnoised) == 6 and all(math.isfinite(v) for v in unnoised)
    released = [v for series in logging.values() for v in series if isinstance(v, float) and math.isfinite(v)]
    assert not set(unnoised) & set(released)
    assert all(math.isnan(v) for v in logging["train_losses"]) and not [k for k in logging if "cos" in k]

    t2 = trainer_in(tmp_path, monkeypatch, {"log_alignment": True})
    t2.load_checkpoint(str(path))
    assert t2.accountant.steps == 3 and t2.accountant.history == t.accountant.history
    t.on_train_end()


def test_resume_from_checkpoint_best_is_refused_and_a_fresh_start_reports_the_earlier_account(
        nnunet_paths, tmp_path, monkeypatch):
    t = trainer_in(tmp_path, monkeypatch, {})
    t.on_train_start()
    t.on_train_epoch_end([t.train_step({"data": None, "target": None, "keys": []})])
    spent = json.loads((tmp_path / "fold" / REPORT_NAME).read_text())
    t.save_checkpoint(str(tmp_path / "fold" / "checkpoint_best.pth"))
    t.on_train_end()

    resumed = trainer_in(tmp_path, monkeypatch, {})
    resumed.load_checkpoint(str(tmp_path / "fold" / "checkpoint_best.pth"))
    with pytest.raises(SettingsError, match="cannot continue from .*checkpoint_best.pth"):
        resumed.on_train_start()

    fresh = trainer_in(tmp_path, monkeypatch, {})
    fresh.on_train_start()
    earlier = fresh.write_privacy_report(final=False)["earlier_accounts_in_this_folder"]
    assert [(e["steps"], e["epsilon"]) for e in earlier] == [(1, spent["epsilon"])]
    assert "holds the account of earlier training" in open(fresh.log_file).read()
    fresh.on_train_end()


def test_loader_samples_at_the_accountants_rate_with_an_expected_batch_unlike_the_plans(
        nnunet_paths, tmp_path, monkeypatch):
    t = trainer_in(tmp_path, monkeypatch, {"expected_batch_size": 3})
    t.initialize()
    loader = t.get_dataloaders()[0].data_loader
    assert t._expected_batch_size() != t.batch_size
    # count inclusions only: no case is loaded
    monkeypatch.setattr(nnUNetDataLoader, "generate_train_batch", lambda self: {"keys": list(self._draw)})
    np.random.seed(0)
    draws = 2000
    included = sum(len(loader.generate_train_batch()["keys"]) for _ in range(draws))
    n, q = t.num_training_cases, t._sample_rate()
    assert q == 3 / n
    assert abs(included / (draws * n) - q) < 5 * math.sqrt(q * (1 - q) / (draws * n))


def test_training_workers_are_the_ordered_augmenter(nnunet_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    t = trainer_in(tmp_path, monkeypatch, {})
    t.initialize()
    train, val = t.get_dataloaders()
    assert type(train) is MultiThreadedAugmenter  # not batchgenerators' NonDetMultiThreadedAugmenter
    for augmenter in (train, val):
        augmenter._finish()


def test_k_augmented_patches_of_a_case_are_clipped_together(nnunet_paths, tmp_path, monkeypatch):
    clip, k = 1e-4, 3
    t = trainer_in(tmp_path, monkeypatch, {"augmentation_multiplicity": k, "max_grad_norm": clip})
    t.on_train_start()
    case = a_case(t, k)
    assert len(set(case["keys"])) == 1 and len(case["keys"]) == k
    sums = t._clipped_sums(*batch_to_device(case, t.device), clip)
    assert sums.batch_size == 1 and sums.norms[0] > clip  # one case, clipped
    norm = torch.sqrt(sum(g.pow(2).sum() for g in sums.clipped))
    assert norm <= clip * (1 + 1e-5)  # sensitivity C, not K * C
    t.on_train_end()


def test_the_sampling_seed_voids_the_guarantee_in_the_report(nnunet_paths, tmp_path, monkeypatch):
    t = trainer_in(tmp_path, monkeypatch, {"seed": 3, "noise_seed": None})
    t.on_train_start()
    report = t.write_privacy_report(final=False)
    assert report["guarantee_void_deterministic_sampling"] is True
    assert report["guarantee_void_deterministic_noise"] is False
    assert "seed is set: the Poisson draws are predictable" in open(t.log_file).read()
    t.on_train_end()
