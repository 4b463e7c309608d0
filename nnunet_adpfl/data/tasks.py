"""The synthetic tasks and the cohort sizes of the public datasets they imitate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import brain, kidney, skin
from .shapes import TaskSpec

SPECS: dict[str, TaskSpec] = {"skin": skin.SPEC, "kidney": kidney.SPEC, "brain": brain.SPEC,
                              "kidney_roi": kidney.ROI_SPEC}
TASKS = ("skin", "kidney", "brain", "kidney_roi")
COHORT_SIZES = ("small", "published")
MIN_CASES_PER_SITE = 2
MAX_SITES = 26  # sites are named A to Z
_SITE_WEIGHTS = (1.0, 1.3, 0.8)  # relative site sizes, cycled when there are more than three sites


@dataclass(frozen=True)
class PublishedCohort:
    like: str  # the public dataset whose size the cohort has
    num_cases: int  # training cases over all sites, as published
    num_test_cases: int  # a held-out set of about a tenth of that
    scale: float  # spatial scale chosen so that the cohort trains on 2 CPU cores


PUBLISHED = {
    # 34 to 43 pixels a side, RGB (scale 1: 112 to 144)
    "skin": PublishedCohort("HAM10000", 10015, 1000, 0.3),
    # abdomen 36 to 44 voxels in-plane, 10 to 25 slices (scale 1: 72 to 88, 20 to 49): lesions of a few voxels
    "kidney": PublishedCohort("KiTS23", 489, 49, 0.5),
    # one kidney's region, same voxel count as `kidney`: tumours and cysts hundreds of voxels
    "kidney_roi": PublishedCohort("KiTS23", 489, 49, 0.5),
    # 38 to 42 voxels a side, 4 channels (scale 1: 60 to 68): necrotic core median ~45 voxels (scale 0.5: ~22)
    "brain": PublishedCohort("BraTS 2024", 1350, 135, 0.625),
}


def site_sizes(num_cases: int, num_sites: int) -> list[int]:
    """Unequal site sizes ~ 1 : 1.3 : 0.8 (largest remainder), at least two cases per site."""
    weights = np.array([_SITE_WEIGHTS[i % 3] * (1 + 0.15 * (i // 3)) for i in range(num_sites)])
    ideal = num_cases * weights / weights.sum()
    sizes = np.floor(ideal).astype(int)
    sizes[np.argsort(sizes - ideal, kind="stable")[: num_cases - sizes.sum()]] += 1
    while sizes.min() < MIN_CASES_PER_SITE:
        sizes[sizes.argmax()] -= 1
        sizes[sizes.argmin()] += 1
    return sizes.tolist()


def published_cohort(task: str, num_sites: int = 3) -> dict:
    """Keyword arguments of ``generate_dataset`` for ``task`` at its public dataset's size: the published number
    of training cases split unevenly over ``num_sites`` sites (``site_cases``), ``num_test_cases`` and ``scale``."""
    if task not in PUBLISHED:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if not isinstance(num_sites, int) or not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"num_sites must be an integer in 1..{MAX_SITES}, got {num_sites!r}")
    cohort = PUBLISHED[task]
    return {"site_cases": site_sizes(cohort.num_cases, num_sites), "num_test_cases": cohort.num_test_cases,
            "scale": cohort.scale}
