"""Federated nnU-Net planning, the plans: nnU-Net's planner run on the merged fingerprint (:func:`plan_federated`),
the feature cap, the plans' digest every site checks, and installing the plans at a site (:func:`install_plans`).

The site summaries and their merge (what leaves a site, field by field): :mod:`.summary`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .summary import DATASET_FILE, FINGERPRINT_FILE, merge_summaries
from ..common.atomic import write_bytes_in

# plans fields that legitimately differ between sites; dp_morph is added by the DP-Morph trainers from the settings
DIGEST_IGNORED_KEYS = ("dataset_name", "dp_morph")
PLANS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a file name, nothing more


def _full_dataset_name(dataset_id: int, dataset_name: str) -> str:
    prefix = f"Dataset{int(dataset_id):03d}_"
    return dataset_name if dataset_name.startswith(prefix) else prefix + dataset_name


def _plain(obj: Any) -> Any:
    """JSON-compatible copy: tuples to lists, numpy scalars/arrays to Python numbers/lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_json(path: Path, content: Any) -> None:
    """Write JSON to a temporary name in the same folder, fsync, and rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(_plain(content), handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _scratch_dataset(work_dir: Path, name: str, fingerprint: dict, dataset_json: dict) -> dict:
    """Write the merged dataset.json / fingerprint into work_dir/nnUNet_{raw,preprocessed}; return the env."""
    roots = {key: work_dir / key for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    dataset_id = name[len("Dataset"):len("Dataset") + 3]
    for root in roots.values():
        for stale in root.glob(f"Dataset{dataset_id}_*"):  # scratch: earlier runs would confuse nnU-Net
            shutil.rmtree(stale)
        root.mkdir(parents=True, exist_ok=True)
    raw = roots["nnUNet_raw"] / name
    fe = dataset_json["file_ending"]
    # the planner needs one training-case entry to name an example image; with the reader fixed by
    # overwrite_image_reader_writer nnU-Net never opens it, and numTraining (not this list) counts the cases
    placeholder = {"images": [str(raw / "imagesTr" / f"federated_{c:04d}{fe}") for c in range(len(
        dataset_json["channel_names"]))], "label": str(raw / "labelsTr" / f"federated{fe}")}
    _write_json(raw / DATASET_FILE, {**dataset_json, "name": name, "dataset": {"federated": placeholder}})
    _write_json(roots["nnUNet_preprocessed"] / name / FINGERPRINT_FILE, fingerprint)
    return {**os.environ, **{key: str(path) for key, path in roots.items()}}


def _select_configurations(plans: dict, configurations: Iterable[str] | None) -> dict:
    """Keep the requested configurations and those they inherit from / depend on."""
    if configurations is None:
        return plans
    available, keep, todo = plans["configurations"], set(), list(configurations)
    while todo:
        name = todo.pop()
        if name not in available:
            raise ValueError(f"nnU-Net planned no {name!r} configuration (planned: {sorted(available)})")
        keep.add(name)
        todo += [available[name][k] for k in ("inherits_from", "previous_stage") if k in available[name]]
    return {**plans, "configurations": {k: v for k, v in available.items() if k in keep}}


def plan_federated(summaries: list[dict], dataset_id: int, dataset_name: str, work_dir: str | Path,
                   configurations: Iterable[str] | None = ("3d_fullres",), planner: str = "ExperimentPlanner",
                   gpu_memory_target_gb: float | None = 8) -> dict:
    """Merge the summaries, write them as nnU-Net raw/preprocessed folders under ``work_dir`` (a scratch
    folder: earlier DatasetXXX folders of this id there are removed), run ``nnUNetv2_plan_experiment`` on
    them with ``planner`` and return the plans, limited to ``configurations`` (None: all).
    ``gpu_memory_target_gb`` None keeps the planner's own default. Log: work_dir/plan.log."""
    from ..nnunet.pipeline import run

    fingerprint, dataset_json = merge_summaries(summaries)
    work_dir, name = Path(work_dir), _full_dataset_name(dataset_id, dataset_name)
    env = _scratch_dataset(work_dir, name, fingerprint, dataset_json)
    memory = [] if gpu_memory_target_gb is None else ["-gpu_memory_target", str(float(gpu_memory_target_gb))]
    run(["nnUNetv2_plan_experiment", "-d", str(int(dataset_id)), "-pl", planner, *memory], env,
        work_dir / "plan.log")
    folder = work_dir / "nnUNet_preprocessed" / name
    plans_files = [p for p in folder.glob("*.json") if p.name not in (DATASET_FILE, FINGERPRINT_FILE)]
    if len(plans_files) != 1:
        raise RuntimeError(f"expected one plans file in {folder}, found {[p.name for p in plans_files]}")
    plans = _select_configurations(json.loads(plans_files[0].read_text()), configurations)
    _write_json(plans_files[0], plans)
    return plans


def cap_features(plans: dict, max_features: int) -> dict:
    """The plans with every configuration's network width capped at ``max_features`` per stage. A DP preset:
    the Gaussian noise norm grows with the square root of the parameter count, so a narrower network keeps more
    of the clipped signal at the same epsilon."""
    if int(max_features) < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}")
    configurations = {}
    for name, c in plans["configurations"].items():
        arch = c.get("architecture", {})
        kwargs = arch.get("arch_kwargs", {})
        if "features_per_stage" in kwargs:
            kwargs = {**kwargs, "features_per_stage": [min(int(f), int(max_features))
                                                       for f in kwargs["features_per_stage"]]}
            c = {**c, "architecture": {**arch, "arch_kwargs": kwargs}}
        configurations[name] = c
    return {**plans, "configurations": configurations}


# ----------------------------------------------------------------------------- installing at a site


def plans_digest(plans: dict) -> str:
    """sha256 (hex) of the plans as canonical JSON (sorted keys, no whitespace), ignoring dataset_name."""
    content = {k: v for k, v in _plain(plans).items() if k not in DIGEST_IGNORED_KEYS}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _site_dataset_json(folder: Path, dataset_name: str) -> dict | None:
    """The site's own dataset.json: $nnUNet_raw/<dataset_name>/dataset.json, else the one already installed."""
    candidates = [folder / DATASET_FILE]
    if os.environ.get("nnUNet_raw"):
        candidates.insert(0, Path(os.environ["nnUNet_raw"]) / dataset_name / DATASET_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def install_plans(plans: dict, preprocessed_dataset_dir: str | Path, dataset_name: str,
                  dataset_json: dict | None = None, fingerprint: dict | None = None) -> Path:
    """Write the federation's plans (dataset_name set to the site's) as <plans_name>.json (nnUNetPlans.json)
    into the site's nnUNet_preprocessed/DatasetXXX_Name folder, ready for ``nnUNetv2_preprocess``.

    nnU-Net also needs there dataset.json (read by nnUNetv2_preprocess and the trainer) and
    dataset_fingerprint.json (copied by the trainer into nnUNet_results). ``dataset_json``: the site's own
    (default: $nnUNet_raw/<dataset_name>/dataset.json, else the one already there). ``fingerprint``: pass
    the federation's merged fingerprint (``merge_summaries(summaries)[0]``) so that model folders carry no
    per-case values; default: keep the one already there (the site's own, which then stays local)."""
    folder = Path(preprocessed_dataset_dir)
    if folder.name != dataset_name:
        raise ValueError(f"dataset_name {dataset_name!r} must be the folder name {folder.name!r}: nnU-Net finds "
                         f"the preprocessed and results folders through plans['dataset_name']")
    dataset_json = dataset_json if dataset_json is not None else _site_dataset_json(folder, dataset_name)
    if dataset_json is None:
        raise FileNotFoundError(f"no dataset.json for {dataset_name}: pass dataset_json or set nnUNet_raw")
    num_channels = len(plans["foreground_intensity_properties_per_channel"])
    if len(dataset_json["channel_names"]) != num_channels:
        raise ValueError(f"the site's dataset.json has {len(dataset_json['channel_names'])} channels, "
                         f"the plans {num_channels}")
    if fingerprint is None and not (folder / FINGERPRINT_FILE).is_file():
        raise FileNotFoundError(f"{folder / FINGERPRINT_FILE} is missing: pass the federation's fingerprint")
    plans_name = plans.get("plans_name", "nnUNetPlans")
    if not isinstance(plans_name, str) or not PLANS_NAME.fullmatch(plans_name):
        raise ValueError(f"plans_name {str(plans_name)[:80]!r} is not a plain file name (letters, digits, '_', '-', "
                         "'.'): refused")
    folder.mkdir(parents=True, exist_ok=True)
    written = {DATASET_FILE: dataset_json, **({FINGERPRINT_FILE: fingerprint} if fingerprint is not None else {}),
               f"{plans_name}.json": {**plans, "dataset_name": dataset_name}}
    for name, content in written.items():  # only inside the dataset's folder, never through a symlink
        write_bytes_in(folder, folder / name, (json.dumps(_plain(content), indent=2) + "\n").encode())
    return folder / f"{plans_name}.json"
