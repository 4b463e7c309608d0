"""Tests for the synthetic multi-site nnU-Net raw dataset generator."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from nnunet_adpfl.data import synthetic
from nnunet_adpfl.data.synthetic import TASKS, add_cli, generate_dataset, split_by_site
from nnunet_adpfl.nnunet.pipeline import nnunet_env

SMALL = dict(num_cases=9, num_sites=3, num_test_cases=2, seed=0)
NUM_FILES = {"skin": 1, "kidney": 1, "brain": 4, "kidney_roi": 1}
FOREGROUND = {"skin": {1}, "kidney": {1, 2, 3}, "brain": {1, 2, 3}, "kidney_roi": {1, 2, 3}}
NAMES = {"skin": "SynthSkin", "kidney": "SynthKidney", "brain": "SynthBrain", "kidney_roi": "SynthKidneyRoi"}


def read(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def case_arrays(folder: Path, case_id: str, split: str = "Tr") -> tuple[list[np.ndarray], np.ndarray]:
    ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    images = [read(p) for p in sorted((folder / f"images{split}").glob(f"{case_id}_????{ending}"))]
    return images, read(folder / f"labels{split}" / f"{case_id}{ending}")


def all_arrays(folder: Path) -> list[np.ndarray]:
    return [read(p) for p in sorted(folder.rglob("*")) if p.suffix in (".png", ".gz")]


def load_meta(folder: Path) -> tuple[dict, dict]:
    return json.loads((folder / "dataset.json").read_text()), json.loads((folder / "sites.json").read_text())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    return {task: generate_dataset(task, root, dataset_id=510 + i, **SMALL) for i, task in enumerate(TASKS)}


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task, tmp_path):
    kwargs = dict(num_cases=4, num_sites=2, num_test_cases=1, scale=0.5)
    first = all_arrays(generate_dataset(task, tmp_path / "a", seed=7, **kwargs))
    again = all_arrays(generate_dataset(task, tmp_path / "b", seed=7, **kwargs))
    other = all_arrays(generate_dataset(task, tmp_path / "c", seed=8, **kwargs))
    assert len(first) == len(again) == 4 * (NUM_FILES[task] + 1) + NUM_FILES[task] + 1
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("task", TASKS)
def test_dataset_json_and_files(task, datasets):
    folder = datasets[task]
    dataset_json, meta = load_meta(folder)
    assert folder.name == f"Dataset{510 + TASKS.index(task)}_{NAMES[task]}"
    assert {"channel_names", "labels", "numTraining", "file_ending"} <= dataset_json.keys()
    assert dataset_json["numTraining"] == SMALL["num_cases"]
    assert dataset_json["file_ending"] == (".png" if task == "skin" else ".nii.gz")
    assert ("regions_class_order" in dataset_json) == (task == "brain")
    expected_channels = {"skin": ["R", "G", "B"], "kidney": ["CT"], "brain": ["T1", "T1ce", "T2", "FLAIR"],
                         "kidney_roi": ["CT"]}[task]
    assert list(dataset_json["channel_names"].values()) == expected_channels

    ending = dataset_json["file_ending"]
    train_ids = [c for cases in meta["sites"].values() for c in cases]
    for split, ids in (("Tr", train_ids), ("Ts", meta["test"])):
        images = sorted(p.name for p in (folder / f"images{split}").iterdir())
        assert images == sorted(f"{c}_{i:04d}{ending}" for c in ids for i in range(NUM_FILES[task]))
        assert sorted(p.name for p in (folder / f"labels{split}").iterdir()) == sorted(f"{c}{ending}" for c in ids)
    assert meta["test"] == [f"test_{i:04d}" for i in range(SMALL["num_test_cases"])]


def test_region_labels_for_brain(datasets):
    dataset_json, _ = load_meta(datasets["brain"])
    assert dataset_json["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                      "enhancing tumor": 3}
    assert dataset_json["regions_class_order"] == [1, 2, 3]


def test_geometry(datasets):
    images, label = case_arrays(datasets["skin"], "A_0000")
    assert len(images) == 1 and images[0].dtype == np.uint8 and images[0].ndim == 3 and images[0].shape[2] == 3
    assert label.shape == images[0].shape[:2] and 112 <= min(label.shape) <= max(label.shape) <= 144

    for task, num_channels in (("kidney", 1), ("brain", 4), ("kidney_roi", 1)):
        folder = datasets[task]
        for path in sorted((folder / "labelsTr").iterdir()):
            spacing = sitk.ReadImage(str(path)).GetSpacing()  # (x, y, z)
            channels = sorted((folder / "imagesTr").glob(path.name.replace(".nii.gz", "_????.nii.gz")))
            assert len(channels) == num_channels
            assert {sitk.ReadImage(str(p)).GetSpacing() for p in channels} == {spacing}
            if task.startswith("kidney"):
                assert spacing[0] == spacing[1] and 0.75 <= spacing[0] <= 1.05 and 2.5 <= spacing[2] <= 5.0
            else:
                assert spacing == (1.0, 1.0, 1.0)
    for task in ("kidney", "kidney_roi"):
        kidney_shape = read(datasets[task] / "labelsTr" / "A_0000.nii.gz").shape
        assert 15 <= kidney_shape[0] <= 50 and 70 <= kidney_shape[1] == kidney_shape[2] <= 90


def test_kidney_region_makes_lesions_large_enough_to_learn(datasets):
    """Same voxel budget, one kidney's region instead of the abdomen: several times more voxels per structure."""
    def median_voxels(task: str, value: int) -> float:
        labels = [read(p) for p in sorted((datasets[task] / "labelsTr").iterdir())]
        return float(np.median([(label == value).sum() for label in labels if (label == value).any()]))

    for value in (1, 2, 3):
        assert median_voxels("kidney_roi", value) > 3 * median_voxels("kidney", value)
    assert all((read(p) == 1).any() for p in (datasets["kidney_roi"] / "labelsTr").iterdir())  # the box holds it


@pytest.mark.parametrize("task", TASKS)
def test_label_values(task, datasets):
    folder = datasets[task]
    _, meta = load_meta(folder)
    seen = set()
    for case_id in (c for cases in meta["sites"].values() for c in cases):
        images, label = case_arrays(folder, case_id)
        values = set(np.unique(label).tolist())
        assert label.dtype == np.uint8 and values <= {0} | FOREGROUND[task] and 0 in values
        assert all(image.shape[: label.ndim] == label.shape for image in images)
        seen |= values
    assert seen == {0} | FOREGROUND[task]


def test_brain_regions_are_nested(datasets):
    folder = datasets["brain"]
    for path in sorted((folder / "labelsTr").iterdir()):
        label = read(path)
        assert {1, 3} <= set(np.unique(label).tolist())
        for inner, allowed in ((2, [2, 3]), (3, [1, 2, 3])):  # core inside enhancing ring inside edema
            shell = ndimage.binary_dilation(label == inner)
            assert np.isin(label[shell], allowed).all(), f"{path.name}: label {inner} touches labels outside {allowed}"
        brain = read(folder / "imagesTr" / path.name.replace(".nii.gz", "_0000.nii.gz")) > 0
        assert not (label[~ndimage.binary_dilation(brain)] > 0).any()


@pytest.mark.parametrize("task", TASKS)
def test_sites_json(task, datasets):
    folder = datasets[task]
    dataset_json, meta = load_meta(folder)
    assert meta["task"] == task and meta["seed"] == SMALL["seed"] and list(meta["sites"]) == ["A", "B", "C"]
    train_ids = [c for cases in meta["sites"].values() for c in cases]
    assert len(train_ids) == len(set(train_ids)) == dataset_json["numTraining"]
    for site, cases in meta["sites"].items():
        assert len(cases) >= 2 and all(c.startswith(f"{site}_") for c in cases)
    assert len({len(cases) for cases in meta["sites"].values()}) > 1
    assert set(meta["test_sites"]) == set(meta["test"])


def test_default_site_sizes_are_unequal():
    assert synthetic.site_sizes(24, 3) == [8, 10, 6]
    assert min(synthetic.site_sizes(10, 5)) == 2 and sum(synthetic.site_sizes(10, 5)) == 10


@pytest.mark.parametrize("task", TASKS)
def test_split_by_site(task, datasets, tmp_path):
    pooled = datasets[task]
    dataset_json, meta = load_meta(pooled)
    folders = split_by_site(pooled, tmp_path)
    assert list(folders) == ["A", "B", "C"]
    for site, folder in folders.items():
        site_json, site_meta = load_meta(folder)
        assert folder == tmp_path / site / pooled.name
        assert site_json == {**dataset_json, "numTraining": len(meta["sites"][site])}
        assert site_meta["sites"] == {site: meta["sites"][site]} and site_meta["test"] == meta["test"]
        labels = sorted(p.name.split(".")[0] for p in (folder / "labelsTr").iterdir())
        assert labels == sorted(meta["sites"][site])
        assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(
            p.name for p in (pooled / "imagesTs").iterdir())
        some_image = next((folder / "imagesTr").iterdir())
        assert os.path.samefile(some_image, pooled / "imagesTr" / some_image.name)  # hard link


@pytest.mark.parametrize("task", TASKS)
def test_nnunet_verify_dataset_integrity(task, datasets, tmp_path):
    """nnU-Net's own check, in its own interpreter as nnUNetv2_plan_and_preprocess runs it: its file listing forks a
    Pool, which deadlocked (CI hung) when forked from this test process with its threads."""
    check = ("import sys\nfrom nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
             "verify_dataset_integrity(sys.argv[1], num_processes=1)\n")
    done = subprocess.run([sys.executable, "-c", check, str(datasets[task])], env=nnunet_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_kidney_tumour_not_threshold_separable(datasets):
    folder = datasets["kidney"]
    _, meta = load_meta(folder)
    pairs = [case_arrays(folder, c) for cases in meta["sites"].values() for c in cases]
    image = np.concatenate([images[0].ravel() for images, _ in pairs]).astype(np.float32)
    tumour = np.concatenate([label.ravel() for _, label in pairs]) == 2
    best = 0.0
    for threshold in np.percentile(image, np.linspace(0.5, 99.5, 200)):
        for prediction in (image > threshold, image < threshold):
            best = max(best, 2 * (prediction & tumour).sum() / (prediction.sum() + tumour.sum()))
    assert best < 0.9
    assert np.percentile(image[tumour], 5) < 60 < 110 < np.percentile(image[tumour], 95)  # heterogeneous tumour


@pytest.mark.parametrize("task, min_spread", [("skin", 3.0), ("kidney", 10.0), ("brain", 50.0)])
def test_site_shift(task, min_spread, datasets):
    folder = datasets[task]
    _, meta = load_meta(folder)
    site_means = []
    for cases in meta["sites"].values():
        images = [np.stack(case_arrays(folder, c)[0]).astype(np.float64) for c in cases]
        site_means.append(np.mean([img[img > (-500 if task == "kidney" else 0)].mean() for img in images]))
    assert max(site_means) - min(site_means) > min_spread


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="liver"), "unknown task"),
        (dict(dataset_id=0), "dataset_id"),
        (dict(dataset_id=1000), "dataset_id"),
        (dict(num_cases=0), "num_cases"),
        (dict(num_sites=0), "num_sites"),
        (dict(num_test_cases=-1), "num_test_cases"),
        (dict(num_cases=5, num_sites=3), "too small"),
        (dict(seed=-1), "seed"),
        (dict(scale=0.0), "scale"),
        (dict(dataset_name="bad name"), "dataset_name"),
    ],
)
def test_bad_inputs_raise(kwargs, message, tmp_path):
    arguments = {"task": "skin", "output_root": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_dataset(**arguments)
    assert not any(tmp_path.iterdir())


def test_custom_name_and_regeneration_removes_stale_cases(tmp_path):
    first = generate_dataset("skin", tmp_path, dataset_id=7, num_cases=6, num_test_cases=1, dataset_name="Derm")
    second = generate_dataset("skin", tmp_path, dataset_id=7, num_cases=4, num_sites=2, num_test_cases=0,
                              dataset_name="Derm")
    assert first == second == tmp_path / "Dataset007_Derm"
    assert len(list((second / "labelsTr").iterdir())) == 4 and not any((second / "imagesTs").iterdir())


def test_split_requires_generated_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="sites.json"):
        split_by_site(tmp_path, tmp_path / "out")


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["make-dataset", "--task", "skin", "--output-root", str(tmp_path / "raw"),
                              "--num-cases", "6", "--num-sites", "2", "--num-test-cases", "1", "--scale", "0.5",
                              "--split-sites", str(tmp_path / "sites")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Dataset501_SynthSkin" in out and "site A" in out and "site B" in out and "lesion" in out
    assert (tmp_path / "sites" / "B" / "Dataset501_SynthSkin" / "dataset.json").is_file()

    bad = parser.parse_args(["make-dataset", "--task", "skin", "--output-root", str(tmp_path), "--num-sites", "0"])
    assert bad.func(bad) == 2
    assert "num_sites" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nnunet_adpfl.data.synthetic", "make-dataset", "--task", "brain", "--output-root",
         str(tmp_path), "--num-cases", "2", "--num-sites", "1", "--num-test-cases", "0", "--scale", "0.4"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert result.returncode == 0, result.stderr
    assert "Dataset501_SynthBrain" in result.stdout


def test_public_cohort_is_disjoint_and_shifted(tmp_path):
    kwargs = dict(num_cases=4, num_sites=1, num_test_cases=2, scale=0.5, seed=3)
    private = generate_dataset("skin", tmp_path / "private", **kwargs)
    public = generate_dataset("skin", tmp_path / "public", dataset_id=502, public=True, **kwargs)
    assert public.name == "Dataset502_SynthSkinPublic"
    assert load_meta(public)[1]["cohort"] == "public" and load_meta(private)[1]["cohort"] == "private"
    assert load_meta(public)[1]["profiles"] != load_meta(private)[1]["profiles"]  # another scanner
    priv, pub = all_arrays(private), all_arrays(public)
    assert not any(a.shape == b.shape and np.array_equal(a, b) for a in priv for b in pub)  # no shared case
    again = all_arrays(generate_dataset("skin", tmp_path / "again", dataset_id=502, public=True, **kwargs))
    assert all(np.array_equal(a, b) for a, b in zip(pub, again))
