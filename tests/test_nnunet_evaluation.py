"""Our evaluation against nnU-Net's own (``compute_metrics_on_folder``, what ``nnUNetv2_evaluate_folder`` runs) on the
same folders: plain labels and regions, with an ignore label, 2D (PNG) and 3D (NIfTI). Dice must be equal, the
ignore label is never a class, and ignored voxels change no metric."""
import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_adpfl.evaluation.evaluation import evaluate_folder, summarise_cases

DATASETS = {
    # name: (dataset.json labels, regions_class_order, case shape, file ending)
    "3d_labels_ignore": ({"background": 0, "kidney": 1, "lesion": 2, "ignore": 3}, None, (6, 16, 16), ".nii.gz"),
    "3d_regions_ignore": ({"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, [1, 2], (6, 16, 16),
                          ".nii.gz"),
    "2d_labels_ignore": ({"background": 0, "lesion": 1, "ignore": 2}, None, (24, 24), ".png"),
    "2d_regions": ({"background": 0, "whole": [1, 2], "core": 2}, [1, 2], (24, 24), ".png"),
}


def _write(array: np.ndarray, path) -> None:
    if str(path).endswith(".png"):
        Image.fromarray(array.astype(np.uint8)).save(path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def _cases(shape, num_labels: int, ignore: int | None, rng):
    """Reference with blobs of every label and an ignored slab (the last 4 columns; background without an ignore
    label); prediction: the reference shifted, with specks, and foreground painted inside the slab."""
    for _ in range(3):
        ref = np.zeros(shape, dtype=np.uint8)
        for label in range(1, num_labels + 1):
            lo = [int(rng.integers(0, n // 2)) for n in shape]
            ref[tuple(slice(a, a + max(2, n // 3)) for a, n in zip(lo, shape))] = label
        ref[..., -4:] = ignore or 0
        pred = np.roll(ref, 1, axis=-2)
        pred[pred == ignore] = 0
        pred[rng.random(shape) > 0.97] = 1
        pred[..., -3:] = int(rng.integers(1, num_labels + 1))
        yield ref, pred


@pytest.fixture(params=sorted(DATASETS))
def folders(request, tmp_path):
    labels, regions_class_order, shape, ending = DATASETS[request.param]
    dataset, pred_dir = tmp_path / "Dataset901_X", tmp_path / "pred"
    (dataset / "labelsTs").mkdir(parents=True)
    pred_dir.mkdir()
    dataset_json = {"channel_names": {"0": "x"}, "labels": labels, "numTraining": 0, "file_ending": ending,
                    **({"regions_class_order": regions_class_order} if regions_class_order else {})}
    (dataset / "dataset.json").write_text(json.dumps(dataset_json))
    ignore, num_labels = labels.get("ignore"), max(max(v) if isinstance(v, list) else v for v in labels.values())
    rng = np.random.default_rng(len(request.param))
    for i, (ref, pred) in enumerate(_cases(shape, num_labels - (ignore is not None), ignore, rng)):
        _write(ref, dataset / "labelsTs" / f"c{i}{ending}")
        _write(pred, pred_dir / f"c{i}{ending}")
    return dataset, pred_dir, dataset_json


class _InProcessPool:
    """Stands in for nnU-Net's spawned worker pool (seconds per start on a busy machine): same calls, this process."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def starmap(function, arguments):
        return list(itertools.starmap(function, arguments))


def test_dice_equals_nnunets_evaluation_and_ignore_is_no_class(folders, monkeypatch):
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_adpfl.evaluation.evaluation import reader_for

    dataset, pred_dir, dataset_json = folders
    monkeypatch.setattr(evaluate_predictions, "multiprocessing",
                        SimpleNamespace(get_context=lambda method: SimpleNamespace(Pool=lambda n: _InProcessPool())))
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    nnunet_keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    theirs = compute_metrics_on_folder(str(dataset / "labelsTs"), str(pred_dir), None, reader_for(dataset),
                                       dataset_json["file_ending"], nnunet_keys, lm.ignore_label, num_processes=1)
    records = evaluate_folder(dataset, pred_dir, add_foreground=True)
    names = {name: tuple(v) if isinstance(v, list) else v for name, v in dataset_json["labels"].items()
             if name not in ("background", "ignore")}
    assert sorted(names.values(), key=str) == sorted(nnunet_keys, key=str)
    for record in records:  # the ignore label is reported as no class, in no metric
        assert all("ignore" not in record[m] for m in ("dice", "hd95", "nsd"))
    for ours, case in zip(records, theirs["metric_per_case"]):
        assert case["prediction_file"].endswith(ours["case"] + dataset_json["file_ending"])
        for name, key in names.items():
            want = case["metrics"][key]["Dice"]
            got = ours["dice"][name]
            assert (math.isnan(got) and math.isnan(want)) or got == want, (ours["case"], name, got, want)
    summary = summarise_cases(records)
    for name, key in names.items():
        assert summary["dice"][name]["mean"] == pytest.approx(theirs["mean"][key]["Dice"], abs=1e-12)


def test_prediction_inside_the_ignored_region_changes_no_metric(folders):
    """The prediction's foreground painted into the ignored slab: clearing it there changes nothing."""
    dataset, pred_dir, dataset_json = folders
    if "ignore" not in dataset_json["labels"]:
        pytest.skip("no ignore label")
    before = evaluate_folder(dataset, pred_dir)
    for path in pred_dir.iterdir():
        if path.suffix == ".png":
            array = np.array(Image.open(path))
        else:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        array[..., -4:] = 0
        _write(array, path)
    after = evaluate_folder(dataset, pred_dir)
    for b, a in zip(before, after):
        for metric in ("dice", "hd95", "nsd"):
            for name in b[metric]:
                assert (math.isnan(a[metric][name]) and math.isnan(b[metric][name])) or \
                    a[metric][name] == pytest.approx(b[metric][name]), (metric, name)
