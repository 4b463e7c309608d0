"""Synthetic skin lesions: 2D RGB dermoscopy images (PNG)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .shapes import (Case, Grid, SiteProfile, TaskSpec, jittered_size, radius, random_direction, smooth_noise,
                     unit_grid)


def _fourier_boundary(rng: np.random.Generator, theta: np.ndarray, irregularity: float) -> np.ndarray:
    """Random star-shaped radius r(theta) = 1 + sum_k a_k cos(k theta + phi_k), k = 2..7."""
    radius = np.ones_like(theta)
    for k in range(2, 8):
        radius += irregularity / k * rng.standard_normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.clip(radius, 0.4, None)


def _hair_mask(rng: np.random.Generator, shape: tuple[int, int], width: float) -> np.ndarray:
    """Soft mask of a few dark curved hairs crossing the image."""
    traced = np.zeros(shape, dtype=bool)
    t = np.linspace(-1.6, 1.6, 6 * max(shape))
    half = (min(shape) - 1) / 2  # pixels per normalised unit
    for _ in range(rng.choice(6, p=[0.25, 0.2, 0.2, 0.15, 0.1, 0.1])):
        start = rng.uniform(-0.8, 0.8, 2)
        direction, normal = random_direction(rng, 2), random_direction(rng, 2)
        points = start + np.outer(t, direction) + np.outer(rng.uniform(-0.3, 0.3) * t**2, normal)
        rows = np.round(points[:, 0] * half + (shape[0] - 1) / 2).astype(int)
        cols = np.round(points[:, 1] * half + (shape[1] - 1) / 2).astype(int)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        traced[rows[inside], cols[inside]] = True
    if not traced.any():
        return np.zeros(shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~traced)
    return np.clip(1.0 - distance / width, 0.0, 1.0).astype(np.float32)


def _lesion_dots(rng: np.random.Generator, grid: Grid, center: np.ndarray, size: float, px: float) -> np.ndarray:
    """Sum of small dark Gaussian globules scattered inside the lesion."""
    dots = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for _ in range(rng.integers(0, 16)):
        pos = center + random_direction(rng, 2) * rng.uniform(0, 0.7) * size
        width = rng.uniform(1.0, 2.5) * px
        dots += np.exp(-((grid[0] - pos[0]) ** 2 + (grid[1] - pos[1]) ** 2) / (2 * width**2))
    return np.clip(dots, 0.0, 1.0)


def skin_case(rng: np.random.Generator, site: SiteProfile, scale: float) -> Case:
    shape = (jittered_size(128 * scale, rng, 0.125), jittered_size(128 * scale, rng, 0.125))
    px = 2.0 / min(shape)  # one pixel in normalised units
    grid = tuple(g * n / min(shape) for g, n in zip(unit_grid(shape), shape))  # isotropic units

    # skin: tone and two-scale texture
    tone = np.array([228.0, 184.0, 160.0]) * rng.uniform(0.72, 1.05)
    texture = 5.0 * smooth_noise(rng, shape, 1.5 * scale) + 7.0 * smooth_noise(rng, shape, 10.0 * scale)
    image = tone + texture[..., None] * np.array([1.0, 0.85, 0.8])

    # lesion: rotated ellipse with a Fourier-perturbed boundary
    center = rng.uniform(-0.2, 0.2, 2)
    semi = rng.uniform(0.3, 0.65) * np.array([1.0, rng.uniform(0.6, 1.0)])
    angle = rng.uniform(0, np.pi)
    theta = np.arctan2(grid[0] - center[0], grid[1] - center[1])
    rho = radius(grid, tuple(center), tuple(semi), angle) / _fourier_boundary(rng, theta, rng.uniform(0.1, 0.45))
    label = (rho < 1.0).astype(np.uint8)

    darkness = rng.uniform(0.45, 1.05) * (0.75 + 0.3 * np.clip(rho, 0, 1)) + 0.12 * smooth_noise(rng, shape, 3 * scale)
    darkness -= 0.35 * _lesion_dots(rng, grid, center, float(semi.min()), px)
    lesion = np.array([135.0, 85.0, 60.0]) * np.clip(darkness, 0.15, 1.3)[..., None]
    contrast = rng.uniform(0.25, 0.45) if rng.random() < 0.2 else rng.uniform(0.7, 1.0)
    fuzziness = rng.uniform(0.03, 0.15)
    alpha = contrast / (1.0 + np.exp(-np.clip((1.0 - rho) / fuzziness, -30, 30)))
    image = image * (1 - alpha[..., None]) + lesion * alpha[..., None]

    hair = 0.85 * _hair_mask(rng, shape, rng.uniform(0.8, 1.6) * scale)[..., None]
    image = image * (1 - hair) + np.array([45.0, 35.0, 30.0]) * rng.uniform(0.6, 1.2) * hair
    image *= 1.0 - rng.uniform(0.0, 0.35) * (grid[0] ** 2 + grid[1] ** 2)[..., None] / 2  # vignetting

    # site shift: colour cast, brightness, blur, sensor noise
    image = image * np.array([site["gain_r"], site["gain_g"], site["gain_b"]]) + site["brightness"]
    image = ndimage.gaussian_filter(image, (site["blur"] * scale, site["blur"] * scale, 0))
    image += site["noise"] * rng.standard_normal(image.shape)
    return Case([np.clip(np.round(image), 0, 255).astype(np.uint8)], label, None)


SPEC = TaskSpec(
    name="SynthSkin",
    channel_names={"0": "R", "1": "G", "2": "B"},
    labels={"background": 0, "lesion": 1},
    label_names={1: "lesion"},
    file_ending=".png",
    site_ranges={"gain_r": (0.85, 1.15), "gain_g": (0.85, 1.15), "gain_b": (0.85, 1.15),
                 "brightness": (-20.0, 20.0), "noise": (2.0, 9.0), "blur": (0.0, 1.2)},
    make_case=skin_case,
)
