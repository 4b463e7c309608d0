"""Deterministic synthetic nnU-Net v2 raw datasets for multi-site (federated) experiments.

The tasks imitate real segmentation problems: ``skin`` (2D RGB dermoscopy lesions, PNG), ``kidney`` (3D
KiTS-like abdominal CT, NIfTI), ``kidney_roi`` (the same CT cropped to one kidney's region, as KiTS pipelines
do: tumours and cysts span enough voxels to learn at small scales) and ``brain`` (3D BraTS-like 4-channel MRI,
NIfTI, region-based labels). Training cases are spread unevenly over sites "A", "B", ... and every site
has its own acquisition shift (intensity offset/scale, noise, blur, resolution, bias field).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import string
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from . import brain, kidney, skin
from .shapes import Case, TaskSpec, site_profiles

TASKS = ("skin", "kidney", "brain", "kidney_roi")

_SITE_WEIGHTS = (1.0, 1.3, 0.8)  # relative site sizes, cycled when there are more than three sites
_MIN_CASES_PER_SITE = 2
_STREAM_TRAIN, _STREAM_TEST, _STREAM_SITES = 0, 1, 2  # independent random streams per seed
_STREAM_PUBLIC, _STREAM_PUBLIC_SITES, _STREAM_PUBLIC_TEST = 3, 4, 5  # the public cohort: other cases, other scanners
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

_SPECS = {"skin": skin.SPEC, "kidney": kidney.SPEC, "brain": brain.SPEC, "kidney_roi": kidney.ROI_SPEC}

# ----------------------------------------------------------------------------- dataset writing


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not valid or value < minimum or (maximum is not None and value > maximum):
        bounds = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _validate(task: str, dataset_id: int, num_cases: int, num_sites: int, num_test_cases: int, seed: int,
              scale: float, dataset_name: str | None) -> TaskSpec:
    if task not in _SPECS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    _check_int("dataset_id", dataset_id, 1, 999)
    _check_int("num_cases", num_cases, 1)
    _check_int("num_sites", num_sites, 1, len(string.ascii_uppercase))
    _check_int("num_test_cases", num_test_cases, 0)
    _check_int("seed", seed, 0)
    if num_cases < _MIN_CASES_PER_SITE * num_sites:
        raise ValueError(f"num_cases={num_cases} is too small for num_sites={num_sites}: every site needs at least "
                         f"{_MIN_CASES_PER_SITE} training cases, so use num_cases >= {_MIN_CASES_PER_SITE * num_sites}")
    if not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale < 0.25:
        raise ValueError(f"scale must be a finite number >= 0.25, got {scale!r}")
    if dataset_name is not None and not _NAME_PATTERN.match(dataset_name):
        raise ValueError(f"dataset_name must be letters, digits, '_' or '-' (no spaces/paths), got {dataset_name!r}")
    return _SPECS[task]


def _site_sizes(num_cases: int, num_sites: int) -> list[int]:
    """Unequal site sizes ~ 1 : 1.3 : 0.8 (largest remainder), at least two cases per site."""
    weights = np.array([_SITE_WEIGHTS[i % 3] * (1 + 0.15 * (i // 3)) for i in range(num_sites)])
    ideal = num_cases * weights / weights.sum()
    sizes = np.floor(ideal).astype(int)
    sizes[np.argsort(sizes - ideal, kind="stable")[: num_cases - sizes.sum()]] += 1
    while sizes.min() < _MIN_CASES_PER_SITE:
        sizes[sizes.argmax()] -= 1
        sizes[sizes.argmin()] += 1
    return sizes.tolist()


def _reset_dataset_folder(folder: Path) -> None:
    """Create the raw-dataset sub-folders, removing stale cases from an earlier run."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        if (folder / sub).exists():
            shutil.rmtree(folder / sub)
        (folder / sub).mkdir(parents=True)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_nifti(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK order is (x, y, z)
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_case(case: Case, case_id: str, folder: Path, split: str, file_ending: str) -> None:
    images, labels = folder / f"images{split}", folder / f"labels{split}"
    if file_ending == ".png":
        Image.fromarray(case.channels[0]).save(images / f"{case_id}_0000.png")
        Image.fromarray(case.label).save(labels / f"{case_id}.png")
        return
    for channel, array in enumerate(case.channels):
        _write_nifti(array, case.spacing, images / f"{case_id}_{channel:04d}{file_ending}")
    _write_nifti(case.label, case.spacing, labels / f"{case_id}{file_ending}")


def _dataset_json(spec: TaskSpec, name: str, task: str, num_training: int, seed: int) -> dict:
    content = {
        "name": name,
        "description": f"Synthetic {task} dataset from nnunet_adpfl.data.synthetic (seed {seed})",
        "reference": "synthetic",
        "licence": "CC0",
        "channel_names": spec.channel_names,
        "labels": spec.labels,
        "numTraining": num_training,
        "file_ending": spec.file_ending,
    }
    if spec.regions_class_order is not None:
        content["regions_class_order"] = list(spec.regions_class_order)
    return content


def generate_dataset(task: str, output_root: str | Path, dataset_id: int = 501, num_cases: int = 24,
                     num_sites: int = 3, num_test_cases: int = 6, seed: int = 0, scale: float = 1.0,
                     dataset_name: str | None = None, public: bool = False) -> Path:
    """Write output_root/DatasetXXX_<Name>/ in nnU-Net raw format and return that folder.

    Training cases are named ``<site>_<index>`` and spread unevenly over sites A, B, ...; test cases
    ``test_<index>`` cycle through the sites' acquisition profiles. ``sites.json`` records the split.
    ``public``: the task's public cohort for the same seed instead (default name <Name>Public): cases from
    random streams disjoint from the private cohort's and its test set's, acquired with their own site profiles
    (a scanner shift), for pretraining the weights that private training starts from.
    """
    spec = _validate(task, dataset_id, num_cases, num_sites, num_test_cases, seed, scale, dataset_name)
    name = dataset_name or (spec.name + "Public" if public else spec.name)
    folder = Path(output_root) / f"Dataset{dataset_id:03d}_{name}"
    _reset_dataset_folder(folder)
    site_names = list(string.ascii_uppercase[:num_sites])
    stream_train, stream_test, stream_sites = (_STREAM_PUBLIC, _STREAM_PUBLIC_TEST, _STREAM_PUBLIC_SITES) if public \
        else (_STREAM_TRAIN, _STREAM_TEST, _STREAM_SITES)
    profiles = site_profiles(spec.site_ranges, np.random.default_rng([seed, stream_sites]), num_sites)

    sites: dict[str, list[str]] = {site: [] for site in site_names}
    site_of_case = np.repeat(np.arange(num_sites), _site_sizes(num_cases, num_sites))
    for index, site_index in enumerate(site_of_case):
        case_id = f"{site_names[site_index]}_{index:04d}"
        case = spec.make_case(np.random.default_rng([seed, stream_train, index]), profiles[site_index], scale)
        _write_case(case, case_id, folder, "Tr", spec.file_ending)
        sites[site_names[site_index]].append(case_id)

    test_sites = {}
    for index in range(num_test_cases):
        case_id, site_index = f"test_{index:04d}", index % num_sites
        case = spec.make_case(np.random.default_rng([seed, stream_test, index]), profiles[site_index], scale)
        _write_case(case, case_id, folder, "Ts", spec.file_ending)
        test_sites[case_id] = site_names[site_index]

    _write_json(folder / "dataset.json", _dataset_json(spec, name, task, num_cases, seed))
    _write_json(folder / "sites.json", {
        "sites": sites, "test": list(test_sites), "test_sites": test_sites, "task": task, "seed": seed,
        "profiles": dict(zip(site_names, profiles)), "cohort": "public" if public else "private",
    })
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def split_by_site(dataset_folder: str | Path, output_root: str | Path) -> dict[str, Path]:
    """From a pooled dataset written by generate_dataset, write one raw dataset per site:
    output_root/<site>/DatasetXXX_<Name>/ (same folder name, same dataset.json apart from numTraining,
    only that site's training cases; the test cases go to every site's imagesTs/labelsTs).
    Use hard links where possible, else copies. Return {site: folder}."""
    source = Path(dataset_folder)
    if not (source / "sites.json").is_file() or not (source / "dataset.json").is_file():
        raise FileNotFoundError(f"{source} has no sites.json/dataset.json; was it written by generate_dataset?")
    meta = json.loads((source / "sites.json").read_text())
    dataset_json = json.loads((source / "dataset.json").read_text())
    file_ending = dataset_json["file_ending"]

    folders = {}
    for site, cases in meta["sites"].items():
        target = Path(output_root) / site / source.name
        if target.resolve() == source.resolve():
            raise ValueError(f"output_root would overwrite the pooled dataset itself: {target}")
        _reset_dataset_folder(target)
        for split, case_ids in (("Tr", cases), ("Ts", meta.get("test", []))):
            for case_id in case_ids:
                for image in sorted((source / f"images{split}").glob(f"{case_id}_????{file_ending}")):
                    _link_or_copy(image, target / f"images{split}" / image.name)
                label = f"labels{split}/{case_id}{file_ending}"
                _link_or_copy(source / label, target / label)
        _write_json(target / "dataset.json", {**dataset_json, "numTraining": len(cases)})
        profile = {"profiles": {site: meta["profiles"][site]}} if "profiles" in meta else {}
        _write_json(target / "sites.json", {**meta, "sites": {site: cases}, **profile})
        folders[site] = target
    return folders


# ----------------------------------------------------------------------------- command line


def _read_label(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path))
    return sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))


def _label_presence(folder: Path, file_ending: str) -> dict[int, int]:
    """Number of training cases that contain each label value."""
    counts: dict[int, int] = {}
    for path in sorted((folder / "labelsTr").glob(f"*{file_ending}")):
        for value in np.unique(_read_label(path)):
            counts[int(value)] = counts.get(int(value), 0) + 1
    return counts


def _summary(folder: Path, split: dict[str, Path]) -> str:
    meta = json.loads((folder / "sites.json").read_text())
    spec = _SPECS[meta["task"]]
    num_training = sum(len(cases) for cases in meta["sites"].values())
    lines = [f"wrote {folder} ({meta['task']}, seed {meta['seed']}): "
             f"{num_training} training cases, {len(meta['test'])} test cases"]
    for site, cases in meta["sites"].items():
        lines.append(f"  site {site}: {len(cases):3d} cases" + (f" -> {split[site]}" if site in split else ""))
    presence = _label_presence(folder, spec.file_ending)
    lines.append("  cases containing each label: " + ", ".join(
        f"{name} ({value}) {presence.get(value, 0)}/{num_training}" for value, name in spec.label_names.items()))
    return "\n".join(lines)


def _run_make_dataset(args: argparse.Namespace) -> int:
    if not args.output_root:
        print("make-dataset: error: give --output-root or set nnUNet_raw", file=sys.stderr)
        return 2
    try:
        folder = generate_dataset(args.task, args.output_root, args.dataset_id, args.num_cases, args.num_sites,
                                  args.num_test_cases, args.seed, args.scale, args.dataset_name, args.public)
        split = split_by_site(folder, args.split_sites) if args.split_sites else {}
    except ValueError as error:
        print(f"make-dataset: error: {error}", file=sys.stderr)
        return 2
    print(_summary(folder, split))
    return 0


def add_cli(subparsers) -> None:
    """Register a `make-dataset` sub-command on an argparse subparsers object (options mirroring
    generate_dataset, plus --split-sites OUTPUT_ROOT); its handler is set with set_defaults(func=...),
    taking the parsed args and returning an int exit code; prints a short summary (folder, cases per
    site, label counts)."""
    parser = subparsers.add_parser(
        "make-dataset", help="write a synthetic multi-site nnU-Net raw dataset",
        description="Write a deterministic synthetic nnU-Net v2 raw dataset (skin, kidney, kidney_roi or brain task).")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--output-root", default=os.environ.get("nnUNet_raw"),
                        help="folder that receives DatasetXXX_<Name>/ (default: $nnUNet_raw)")
    parser.add_argument("--dataset-id", type=int, default=501)
    parser.add_argument("--num-cases", type=int, default=24, help="training cases over all sites")
    parser.add_argument("--num-sites", type=int, default=3)
    parser.add_argument("--num-test-cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the spatial size")
    parser.add_argument("--dataset-name", default=None, help="default: SynthSkin / SynthKidney / SynthBrain")
    parser.add_argument("--public", action="store_true", help="the task's public cohort (disjoint cases, another "
                        "scanner) for pretraining, instead of the private multi-site one")
    parser.add_argument("--split-sites", metavar="OUTPUT_ROOT", default=None,
                        help="also write one dataset per site to OUTPUT_ROOT/<site>/DatasetXXX_<Name>/")
    parser.set_defaults(func=_run_make_dataset)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_adpfl.data.synthetic", description=__doc__.splitlines()[0])
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_main())
