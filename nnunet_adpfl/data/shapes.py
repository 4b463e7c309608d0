"""What every synthetic task is built from: a case, a task's spec, coordinate grids, ellipsoids, texture
noise, per-site acquisition profiles."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

Grid = tuple[np.ndarray, ...]  # broadcastable coordinate arrays, one per axis
SiteProfile = dict[str, float]


@dataclass(frozen=True)
class Case:
    channels: list[np.ndarray]  # one array per image file
    label: np.ndarray
    spacing: tuple[float, ...] | None  # (z, y, x) in mm for 3D volumes, None for PNGs


@dataclass(frozen=True)
class TaskSpec:
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    label_names: dict[int, str]  # raw label values as stored in the label files
    file_ending: str
    site_ranges: dict[str, tuple[float, float]]
    make_case: Callable[[np.random.Generator, SiteProfile, float], Case]
    regions_class_order: tuple[int, ...] | None = None


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (a texture field)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return field / (field.std() + 1e-6)


def unit_grid(shape: tuple[int, ...]) -> Grid:
    """Broadcastable coordinates spanning [-1, 1] along every axis."""
    return tuple(
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == i else 1 for a in range(len(shape))])
        for i, n in enumerate(shape)
    )


def radius(grid: Grid, center: tuple[float, ...], semi_axes: tuple[float, ...], angle: float = 0.0) -> np.ndarray:
    """Normalised ellipsoidal radius (< 1 inside); ``angle`` rotates the last two axes (y, x)."""
    offsets = [g - c for g, c in zip(grid, center)]
    dy, dx = offsets[-2], offsets[-1]
    offsets[-2] = -dx * np.sin(angle) + dy * np.cos(angle)
    offsets[-1] = dx * np.cos(angle) + dy * np.sin(angle)
    return np.sqrt(sum((o / a) ** 2 for o, a in zip(offsets, semi_axes)))


def local_to_world(center: tuple[float, ...], offset: np.ndarray, angle: float) -> tuple[float, ...]:
    """Inverse of the rotation in :func:`radius`: a local (.., y, x) offset to world coordinates."""
    v, u = offset[-2], offset[-1]
    world = list(offset)
    world[-2] = u * np.sin(angle) + v * np.cos(angle)
    world[-1] = u * np.cos(angle) - v * np.sin(angle)
    return tuple(float(c + w) for c, w in zip(center, world))


def random_direction(rng: np.random.Generator, ndim: int) -> np.ndarray:
    vec = rng.standard_normal(ndim)
    return vec / np.linalg.norm(vec)


def jittered_size(nominal: float, rng: np.random.Generator, rel: float) -> int:
    return max(8, int(round(nominal * rng.uniform(1.0 - rel, 1.0 + rel))))


def site_profiles(ranges: dict[str, tuple[float, float]], rng: np.random.Generator,
                   num_sites: int) -> list[SiteProfile]:
    """Stratified per-site acquisition parameters, so that sites really differ from each other."""
    columns = {
        key: lo + (hi - lo) * (rng.permutation(num_sites) + rng.uniform(0.0, 1.0, num_sites)) / num_sites
        for key, (lo, hi) in ranges.items()
    }
    return [{key: float(values[i]) for key, values in columns.items()} for i in range(num_sites)]
