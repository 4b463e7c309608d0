"""Writing synthetic cases in nnU-Net raw format: in parallel, resumable after a crash, with a progress bar.

Every case is drawn from its own random stream, so the output does not depend on the number of worker
processes. Each file is written under ``<dataset>/.partial/`` and then renamed into place, so a crash never
leaves a truncated case; a case whose files all exist is complete. ``.partial/params.json`` records what is
being generated: a rerun with the same parameters skips the complete cases, any other rerun starts afresh.
Workers are spawned, not forked: a forked pool deadlocks in a process that already runs threads (torch,
nnU-Net's data loaders).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from tqdm import tqdm

from .shapes import Case, SiteProfile, TaskSpec
from .tasks import SPECS

SPLITS = ("Tr", "Ts")
_PARTIAL = ".partial"


@dataclass(frozen=True)
class CaseJob:
    task: str
    split: str  # "Tr" or "Ts"
    case_id: str
    rng_key: tuple[int, ...]  # seeds numpy's generator for this case alone
    profile: SiteProfile
    scale: float


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def num_image_files(spec: TaskSpec) -> int:
    """Image files per case: one RGB PNG, or one NIfTI per channel."""
    return 1 if spec.file_ending == ".png" else len(spec.channel_names)


def case_files(spec: TaskSpec, case_id: str, split: str) -> list[str]:
    """The case's files relative to the dataset folder, label last."""
    images = [f"images{split}/{case_id}_{c:04d}{spec.file_ending}" for c in range(num_image_files(spec))]
    return images + [f"labels{split}/{case_id}{spec.file_ending}"]


def reset_dataset_folder(folder: Path) -> None:
    """Create the raw-dataset sub-folders, removing stale cases and metadata from an earlier run."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", _PARTIAL):
        if (folder / sub).exists():
            shutil.rmtree(folder / sub)
        if sub != _PARTIAL:
            (folder / sub).mkdir(parents=True)
    for name in ("dataset.json", "sites.json"):
        (folder / name).unlink(missing_ok=True)


def _write_nifti(array: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK order is (x, y, z)
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_case(case: Case, files: list[str], folder: Path) -> None:
    """Each file written under .partial/ (same name, so the writer sees the right format), then moved into place."""
    arrays = ([case.channels[0]] if files[0].endswith(".png") else list(case.channels)) + [case.label]
    for array, relative in zip(arrays, files):
        temporary = folder / _PARTIAL / relative.replace("/", "__")
        if relative.endswith(".png"):
            Image.fromarray(array).save(temporary)
        else:
            _write_nifti(array, case.spacing, temporary)
        os.replace(temporary, folder / relative)


def make_and_write_case(job: CaseJob, folder: str) -> str:
    """Draw one case and write its files (runs in a worker process); returns its id."""
    spec = SPECS[job.task]
    case = spec.make_case(np.random.default_rng(list(job.rng_key)), job.profile, job.scale)
    _write_case(case, case_files(spec, job.case_id, job.split), Path(folder))
    return job.case_id


def _call(arguments: tuple[CaseJob, str]) -> str:
    return make_and_write_case(*arguments)


def prepare_folder(folder: Path, params: dict) -> bool:
    """Reset the folder unless it holds an interrupted run with the same parameters; True when resuming."""
    record = folder / _PARTIAL / "params.json"
    resuming = record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(params))
    if not resuming:  # (a file left in .partial/ by the crash is overwritten when its case is written again)
        reset_dataset_folder(folder)
        record.parent.mkdir()
        write_json(record, params)
    return resuming


def finish_folder(folder: Path) -> None:
    shutil.rmtree(folder / _PARTIAL)


def write_cases(jobs: list[CaseJob], folder: Path, workers: int = 1, progress: bool = False,
                description: str = "cases") -> int:
    """Write every job's case that is not complete yet; returns how many were written.

    ``workers`` > 1 spreads them over that many spawned processes (output identical to workers=1);
    ``progress`` shows a tqdm bar on stderr."""
    pending = [job for job in jobs if not all((folder / f).is_file() for f in case_files(SPECS[job.task],
                                                                                             job.case_id, job.split))]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=description, unit="case",
               disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(pending) <= 1:
            for job in pending:
                make_and_write_case(job, str(folder))
                bar.update()
        else:
            processes = min(workers, len(pending))
            chunk = max(1, min(16, len(pending) // (8 * processes)))
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                for _ in pool.imap_unordered(_call, [(job, str(folder)) for job in pending], chunksize=chunk):
                    bar.update()
    return len(pending)
