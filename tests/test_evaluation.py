"""evaluation.py: per-case metrics read from label files, and their summaries (hand-computed values)."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_adpfl.evaluation.evaluation import dataset_labels, evaluate_folder, mean_per_label, summarise_cases
from nnunet_adpfl.evaluation.metrics import nanmean


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing[::-1])  # SimpleITK is x, y, z
    sitk.WriteImage(image, str(path))


@pytest.fixture()
def folders(tmp_path):
    dataset, pred = tmp_path / "Dataset900_T", tmp_path / "pred"
    (dataset / "labelsTs").mkdir(parents=True)
    pred.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 0,
        "file_ending": ".nii.gz"}))
    ref = np.zeros((4, 8, 8))
    ref[1:3, 2:6, 2:6] = 1  # 32 voxels of a, no b
    pred1 = np.zeros_like(ref)
    pred1[1:3, 2:6, 2:4] = 1  # half of a
    _write(ref, dataset / "labelsTs" / "c1.nii.gz", (2.0, 1.0, 1.0))
    _write(pred1, pred / "c1.nii.gz", (2.0, 1.0, 1.0))
    ref2 = np.zeros((4, 8, 8))
    ref2[0:2, 0:2, 0:2] = 2
    _write(ref2, dataset / "labelsTs" / "c2.nii.gz")
    _write(ref2, pred / "c2.nii.gz")  # perfect; a absent from both
    return dataset, pred


def test_per_case_values_and_conventions(folders):
    dataset, pred = folders
    records = evaluate_folder(dataset, pred, tolerance_mm=1.0, add_foreground=True)
    assert [r["case"] for r in records] == ["c1", "c2"]
    c1, c2 = records
    assert c1["dice"]["a"] == pytest.approx(2 * 16 / (32 + 16))
    assert math.isnan(c1["dice"]["b"]) and math.isnan(c1["hd95"]["b"])  # absent from both: undefined
    assert c1["dice"]["foreground"] == pytest.approx(c1["dice"]["a"])
    # prediction misses columns 4-5 of a: the reference's far face is 2 mm (2 voxels of 1 mm) from the prediction
    assert c1["hd95"]["a"] == pytest.approx(2.0)
    assert 0 < c1["nsd"]["a"] < 1
    assert c2["dice"]["b"] == 1.0 and c2["hd95"]["b"] == 0.0 and c2["nsd"]["b"] == 1.0
    summary = summarise_cases(records)
    assert summary["dice"]["a"]["n"] == 1 and summary["dice"]["b"]["n"] == 1
    assert summary["dice"]["foreground"]["mean"] == pytest.approx((c1["dice"]["a"] + 1.0) / 2)
    assert summary["dice"]["foreground"]["std"] == pytest.approx(abs(c1["dice"]["a"] - 1.0) / 2)
    assert mean_per_label(records) == {name: s["mean"] for name, s in summary["dice"].items()}


def test_one_empty_mask_is_penalised(folders):
    dataset, pred = folders
    _write(np.zeros((4, 8, 8)), pred / "c2.nii.gz")  # b predicted empty
    c2 = evaluate_folder(dataset, pred)[1]
    assert c2["dice"]["b"] == 0.0 and c2["nsd"]["b"] == 0.0
    assert c2["hd95"]["b"] == pytest.approx(math.sqrt(4 ** 2 + 8 ** 2 + 8 ** 2))  # image diagonal (mm)


def test_missing_prediction_and_unknown_metric_are_errors(folders):
    dataset, pred = folders
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_folder(dataset, pred, metrics=("dice", "iou"))
    (pred / "c2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="c2"):
        evaluate_folder(dataset, pred)


def test_labels_regions_and_mean():
    js = {"labels": {"background": 0, "wt": [1, 2, 3], "tc": [2, 3], "et": 3}}
    assert dataset_labels(js, add_foreground=True) == {"wt": (1, 2, 3), "tc": (2, 3), "et": 3}  # regions: no union
    js = {"labels": {"background": 0, "kidney": 1, "tumor": 2}}
    assert dataset_labels(js)["kidney"] == 1 and "foreground" not in dataset_labels(js)
    assert dataset_labels(js, {"mass": [2]}, add_foreground=True) == {"kidney": 1, "tumor": 2, "foreground": (1, 2),
                                                                       "mass": (2,)}
    js = {"labels": {"background": 0, "kidney": 1, "tumor": 2, "ignore": 3}}  # nnU-Net's ignore label: no class
    assert dataset_labels(js, add_foreground=True) == {"kidney": 1, "tumor": 2, "foreground": (1, 2)}
    assert nanmean([1.0, float("nan"), 3.0]) == 2.0 and math.isnan(nanmean([float("nan")]))
