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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from .shapes import TaskSpec, site_profiles
from .tasks import (COHORT_SIZES, MAX_SITES, MIN_CASES_PER_SITE, PUBLISHED, SPECS, TASKS, published_cohort,
                    site_sizes)
from .writing import (CaseJob, finish_folder, prepare_folder, reset_dataset_folder, write_cases, write_json)

_STREAM_TRAIN, _STREAM_TEST, _STREAM_SITES = 0, 1, 2  # independent random streams per seed
_STREAM_PUBLIC, _STREAM_PUBLIC_SITES, _STREAM_PUBLIC_TEST = 3, 4, 5  # the public cohort: other cases, other scanners
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DEFAULT_NUM_CASES, _DEFAULT_NUM_SITES = 24, 3

# ----------------------------------------------------------------------------- dataset writing


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not valid or value < minimum or (maximum is not None and value > maximum):
        bounds = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _resolve_site_sizes(num_cases: int | None, num_sites: int | None, site_cases: Sequence[int] | None) -> list[int]:
    """Training cases per site: ``site_cases`` as given, else ``num_cases`` split unevenly over ``num_sites``."""
    if site_cases is None:
        num_cases = _DEFAULT_NUM_CASES if num_cases is None else num_cases
        num_sites = _DEFAULT_NUM_SITES if num_sites is None else num_sites
        _check_int("num_cases", num_cases, 1)
        _check_int("num_sites", num_sites, 1, MAX_SITES)
        if num_cases < MIN_CASES_PER_SITE * num_sites:
            raise ValueError(f"num_cases={num_cases} is too small for num_sites={num_sites}: every site needs at "
                             f"least {MIN_CASES_PER_SITE} training cases, so use num_cases >= "
                             f"{MIN_CASES_PER_SITE * num_sites}")
        return site_sizes(num_cases, num_sites)
    sizes = list(site_cases)
    _check_int("the number of sites in site_cases", len(sizes), 1, MAX_SITES)
    for size in sizes:
        _check_int("every entry of site_cases (a site's training cases)", size, MIN_CASES_PER_SITE)
    if num_cases is not None and num_cases != sum(sizes):
        raise ValueError(f"num_cases={num_cases} disagrees with site_cases={sizes} (total {sum(sizes)})")
    if num_sites is not None and num_sites != len(sizes):
        raise ValueError(f"num_sites={num_sites} disagrees with site_cases={sizes} ({len(sizes)} sites)")
    return [int(size) for size in sizes]


def _validate(task: str, dataset_id: int, num_test_cases: int, seed: int, scale: float,
              dataset_name: str | None, workers: int) -> TaskSpec:
    if task not in SPECS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    _check_int("dataset_id", dataset_id, 1, 999)
    _check_int("num_test_cases", num_test_cases, 0)
    _check_int("seed", seed, 0)
    _check_int("workers", workers, 1)
    if not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale < 0.25:
        raise ValueError(f"scale must be a finite number >= 0.25, got {scale!r}")
    if dataset_name is not None and not _NAME_PATTERN.match(dataset_name):
        raise ValueError(f"dataset_name must be letters, digits, '_' or '-' (no spaces/paths), got {dataset_name!r}")
    return SPECS[task]


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


def generate_dataset(task: str, output_root: str | Path, dataset_id: int = 501, num_cases: int | None = None,
                     num_sites: int | None = None, num_test_cases: int = 6, seed: int = 0, scale: float = 1.0,
                     dataset_name: str | None = None, public: bool = False, site_cases: Sequence[int] | None = None,
                     workers: int = 1, progress: bool = False) -> Path:
    """Write output_root/DatasetXXX_<Name>/ in nnU-Net raw format and return that folder.

    Training cases are named ``<site>_<index>`` and spread over sites A, B, ...: ``site_cases`` cases per site
    when given, else ``num_cases`` (default 24) split unevenly (~ 1 : 1.3 : 0.8) over ``num_sites`` (default 3);
    ``published_cohort(task)`` gives the sizes of the task's public dataset. Test cases ``test_<index>`` cycle
    through the sites' acquisition profiles. ``sites.json``, written last, records the split.
    ``public``: the task's public cohort for the same seed instead (default name <Name>Public): cases from
    random streams disjoint from the private cohort's and its test set's, acquired with their own site profiles
    (a scanner shift), for pretraining the weights that private training starts from.
    ``workers``: processes that draw and write cases (the output does not depend on it; they are spawned, so a
    script calling this with workers > 1 needs the usual ``if __name__ == "__main__":`` guard); ``progress``: a
    progress bar on stderr. A run interrupted with the same arguments resumes: its complete cases are kept.
    """
    sizes = _resolve_site_sizes(num_cases, num_sites, site_cases)
    spec = _validate(task, dataset_id, num_test_cases, seed, scale, dataset_name, workers)
    name = dataset_name or (spec.name + "Public" if public else spec.name)
    folder = Path(output_root) / f"Dataset{dataset_id:03d}_{name}"
    site_names = list(string.ascii_uppercase[:len(sizes)])
    stream_train, stream_test, stream_sites = (_STREAM_PUBLIC, _STREAM_PUBLIC_TEST, _STREAM_PUBLIC_SITES) if public \
        else (_STREAM_TRAIN, _STREAM_TEST, _STREAM_SITES)
    profiles = site_profiles(spec.site_ranges, np.random.default_rng([seed, stream_sites]), len(sizes))

    sites: dict[str, list[str]] = {site: [] for site in site_names}
    jobs = []
    for index, site_index in enumerate(np.repeat(np.arange(len(sizes)), sizes)):
        case_id = f"{site_names[site_index]}_{index:04d}"
        jobs.append(CaseJob(task, "Tr", case_id, (seed, stream_train, index), profiles[site_index], scale))
        sites[site_names[site_index]].append(case_id)
    test_sites = {}
    for index in range(num_test_cases):
        case_id, site_index = f"test_{index:04d}", index % len(sizes)
        jobs.append(CaseJob(task, "Ts", case_id, (seed, stream_test, index), profiles[site_index], scale))
        test_sites[case_id] = site_names[site_index]

    params = {"task": task, "name": name, "seed": seed, "scale": scale, "public": public, "site_cases": sizes,
              "num_test_cases": num_test_cases}
    resuming = prepare_folder(folder, params)
    written = write_cases(jobs, folder, workers, progress, description=f"{folder.name} cases")
    if resuming and progress:
        print(f"resumed {folder.name}: kept {len(jobs) - written} complete cases, wrote {written}", file=sys.stderr)
    write_json(folder / "dataset.json", _dataset_json(spec, name, task, sum(sizes), seed))
    write_json(folder / "sites.json", {
        "sites": sites, "test": list(test_sites), "test_sites": test_sites, "task": task, "seed": seed,
        "scale": scale, "profiles": dict(zip(site_names, profiles)), "cohort": "public" if public else "private",
    })
    finish_folder(folder)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _image_files_by_case(folder: Path, file_ending: str) -> dict[str, list[str]]:
    """{case id: its image files <case>_XXXX<ending>, sorted}, from one listing of the folder."""
    pattern = re.compile(rf"^(.+)_\d{{4}}{re.escape(file_ending)}$")
    files: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
        if match := pattern.match(name):
            files.setdefault(match.group(1), []).append(name)
    return files


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
    images = {split: _image_files_by_case(source / f"images{split}", file_ending) for split in ("Tr", "Ts")}

    folders = {}
    for site, cases in meta["sites"].items():
        target = Path(output_root) / site / source.name
        if target.resolve() == source.resolve():
            raise ValueError(f"output_root would overwrite the pooled dataset itself: {target}")
        reset_dataset_folder(target)
        for split, case_ids in (("Tr", cases), ("Ts", meta.get("test", []))):
            for case_id in case_ids:
                for image in images[split].get(case_id, []):
                    _link_or_copy(source / f"images{split}" / image, target / f"images{split}" / image)
                label = f"labels{split}/{case_id}{file_ending}"
                _link_or_copy(source / label, target / label)
        write_json(target / "dataset.json", {**dataset_json, "numTraining": len(cases)})
        profile = {"profiles": {site: meta["profiles"][site]}} if "profiles" in meta else {}
        write_json(target / "sites.json", {**meta, "sites": {site: cases}, **profile})
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
    spec = SPECS[meta["task"]]
    num_training = sum(len(cases) for cases in meta["sites"].values())
    lines = [f"wrote {folder} ({meta['task']}, seed {meta['seed']}): "
             f"{num_training} training cases, {len(meta['test'])} test cases"]
    for site, cases in meta["sites"].items():
        lines.append(f"  site {site}: {len(cases):3d} cases" + (f" -> {split[site]}" if site in split else ""))
    presence = _label_presence(folder, spec.file_ending)
    lines.append("  cases containing each label: " + ", ".join(
        f"{name} ({value}) {presence.get(value, 0)}/{num_training}" for value, name in spec.label_names.items()))
    return "\n".join(lines)


def _site_cases(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers of cases, e.g. 3231,4200,2584; got "
                                         f"{text!r}") from None


def dataset_options(args: argparse.Namespace) -> dict:
    """generate_dataset's keyword arguments from make-dataset's options: the cohort size's sizes, test cases and
    scale, each replaced by the option given explicitly."""
    options = {"num_cases": args.num_cases, "num_sites": args.num_sites, "site_cases": args.site_cases}
    if args.cohort_size == "published":
        if args.num_cases is not None or args.site_cases is not None:
            raise ValueError("--cohort-size published sets the training cases; leave out --num-cases and "
                             "--site-cases (or use them without --cohort-size)")
        options = {**published_cohort(args.task, 3 if args.num_sites is None else args.num_sites),
                   "num_cases": None, "num_sites": None}
    else:
        options.update(num_test_cases=6, scale=1.0)
    explicit = {"num_test_cases": args.num_test_cases, "scale": args.scale}
    options.update({key: value for key, value in explicit.items() if value is not None})
    return {**options, "workers": args.workers, "progress": not args.no_progress}


def _run_make_dataset(args: argparse.Namespace) -> int:
    if not args.output_root:
        print("make-dataset: error: give --output-root or set nnUNet_raw", file=sys.stderr)
        return 2
    try:
        folder = generate_dataset(args.task, args.output_root, args.dataset_id, seed=args.seed,
                                  dataset_name=args.dataset_name, public=args.public, **dataset_options(args))
        split = split_by_site(folder, args.split_sites) if args.split_sites else {}
    except ValueError as error:
        print(f"make-dataset: error: {error}", file=sys.stderr)
        return 2
    print(_summary(folder, split))
    return 0


def add_cli(subparsers) -> None:
    """Register a `make-dataset` sub-command on an argparse subparsers object (options mirroring
    generate_dataset, plus --cohort-size and --split-sites OUTPUT_ROOT); its handler is set with
    set_defaults(func=...), taking the parsed args and returning an int exit code; prints a short summary
    (folder, cases per site, label counts)."""
    parser = subparsers.add_parser(
        "make-dataset", help="write a synthetic multi-site nnU-Net raw dataset",
        description="Write a deterministic synthetic nnU-Net v2 raw dataset (skin, kidney, kidney_roi or brain task).")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--output-root", default=os.environ.get("nnUNet_raw"),
                        help="folder that receives DatasetXXX_<Name>/ (default: $nnUNet_raw)")
    parser.add_argument("--dataset-id", type=int, default=501)
    published = ", ".join(f"{task} {c.num_cases} like {c.like} (+{c.num_test_cases} test) at scale {c.scale}"
                          for task, c in PUBLISHED.items())
    parser.add_argument("--cohort-size", choices=COHORT_SIZES, default="small",
                        help="small: 24 training cases, 6 test cases, scale 1; published: the size of the public "
                        f"dataset the task imitates, at a scale that trains on 2 CPU cores ({published}); "
                        "options given explicitly win")
    parser.add_argument("--num-cases", type=int, default=None, help="training cases over all sites, split unevenly")
    parser.add_argument("--num-sites", type=int, default=None, help="default 3")
    parser.add_argument("--site-cases", type=_site_cases, default=None, metavar="N,N,...",
                        help="training cases of each site (instead of --num-cases and --num-sites)")
    parser.add_argument("--num-test-cases", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=None, help="multiplies the spatial size")
    parser.add_argument("--dataset-name", default=None, help="default: SynthSkin / SynthKidney / SynthBrain")
    parser.add_argument("--public", action="store_true", help="the task's public cohort (disjoint cases, another "
                        "scanner) for pretraining, instead of the private multi-site one")
    parser.add_argument("--split-sites", metavar="OUTPUT_ROOT", default=None,
                        help="also write one dataset per site to OUTPUT_ROOT/<site>/DatasetXXX_<Name>/")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that write cases (default: the CPUs, at most 8); the output does not "
                        "depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=_run_make_dataset)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_adpfl.data.synthetic", description=__doc__.splitlines()[0])
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_main())
