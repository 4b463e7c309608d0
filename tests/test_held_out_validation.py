"""A DP trainer releases no validation value of a training case (review26 C2, S1): fold 'all' trains without
validation, a split whose val cases are training cases (or with a training case listed twice) is refused."""
import json
import math

import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_adpfl.common.config import SettingsError
from nnunet_adpfl.privacy.report import REPORT_NAME
from nnunet_adpfl.training.held_out import NO_VALIDATION
from tests.test_dp_trainer import SHORT


def trainer_on(fold, tmp_path, monkeypatch, settings=None):
    from nnunetv2.run.run_training import get_trainer_from_args
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({**SHORT, **(settings or {})}))
    monkeypatch.setenv("nnUNet_adpfl_config", str(f))
    t = get_trainer_from_args("501", "3d_fullres", fold, "nnUNetTrainerDPSGD", "nnUNetPlans",
                              device=torch.device("cpu"))
    t.output_folder = str(tmp_path / "fold")  # not the session's shared results folder
    return t


def test_fold_all_releases_no_validation_value_of_its_training_cases(nnunet_paths, tmp_path, monkeypatch):
    t = trainer_on("all", tmp_path, monkeypatch, {"num_epochs": 1, "num_iterations_per_epoch": 1})
    t.run_training()
    t.perform_actual_validation()
    checkpoint = torch.load(tmp_path / "fold" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    for key in ("val_losses", "mean_fg_dice", "ema_fg_dice"):
        assert len(logging[key]) == 1 and math.isnan(logging[key][0]), key
    assert all(math.isnan(v) for v in logging["dice_per_class_or_region"][0])
    assert math.isnan(checkpoint["_best_ema"])
    assert not (tmp_path / "fold" / "checkpoint_best.pth").exists()  # no pick on training-case Dice
    assert not (tmp_path / "fold" / "validation").exists()  # no predictions or summary of training cases
    assert json.loads((tmp_path / "fold" / REPORT_NAME).read_text())["validation"] == NO_VALIDATION


def write_split(t, tmp_path, train, val):
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}]))
    t.preprocessed_dataset_folder_base = str(tmp_path)  # not the session's shared preprocessed folder


@pytest.mark.parametrize("overlap,message", [(1, "also training cases"), (0, "more than once")])
def test_a_split_that_would_validate_or_count_a_training_case_twice_is_refused(nnunet_paths, tmp_path, monkeypatch,
                                                                              overlap, message):
    t = trainer_on(0, tmp_path, monkeypatch)
    ids = sorted(infer_dataset_class(t.preprocessed_dataset_folder).get_identifiers(t.preprocessed_dataset_folder))
    train = ids[:8] + ([] if overlap else ids[:1])
    write_split(t, tmp_path, train, ids[8 - overlap:])
    with pytest.raises(SettingsError, match=message):
        t.do_split()
    write_split(t, tmp_path, ids[:8], ids[8:])
    assert t.do_split() == (ids[:8], ids[8:])  # held-out validation cases: nnU-Net's split unchanged
