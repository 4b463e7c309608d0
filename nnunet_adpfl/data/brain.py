"""Synthetic brain MRI: 3D BraTS-like 4-channel volumes with region-based tumour labels (NIfTI)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .shapes import (Case, Grid, SiteProfile, TaskSpec, jittered_size, radius, random_direction, smooth_noise,
                     unit_grid)

_BG, _CSF, _GM, _WM, _EDEMA, _ENHANCING, _NECROSIS = range(7)
_BRAIN_CONTRASTS = np.array(
    [  # bg   CSF   GM    WM    edema enh.  necrosis
        [0.0, 0.25, 0.62, 0.85, 0.55, 0.60, 0.35],  # T1
        [0.0, 0.25, 0.65, 0.85, 0.55, 1.25, 0.30],  # T1ce: enhancing rim bright, necrosis dark
        [0.0, 1.00, 0.62, 0.42, 0.85, 0.70, 0.95],  # T2: fluid and edema bright
        [0.0, 0.15, 0.65, 0.50, 0.95, 0.80, 0.60],  # FLAIR: CSF suppressed, edema bright
    ],
    dtype=np.float32,
)
_BRAIN_SEMI_AXES = (0.78, 0.9, 0.74)


def _low_order_field(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Random quadratic polynomial with roughly unit amplitude (bias fields, global shape changes)."""
    z, y, x = grid
    terms = (z, y, z * y, z * z, y * y, x, x * x, z * x, y * x)  # x terms last: cheap broadcasting
    return sum(rng.standard_normal() * t for t in terms) / np.sqrt(len(terms))


def _brain_anatomy(rng: np.random.Generator, grid: Grid, gyri: np.ndarray) -> np.ndarray:
    """Tissue classes of a skull-stripped brain: WM core, folded GM cortex, deep GM, ventricles, sulci."""
    z, y, x = grid
    semi = tuple(a * rng.uniform(0.92, 1.04) for a in _BRAIN_SEMI_AXES)
    brain_r = radius(grid, (0.0, 0.0, 0.0), semi) + 0.04 * _low_order_field(rng, grid) + 0.015 * gyri
    brain = brain_r < 1.0
    classes = np.where(brain, _WM, _BG).astype(np.uint8)
    classes[brain & (brain_r > 0.8 + 0.06 * gyri)] = _GM
    for side in (-1.0, 1.0):
        classes[radius(grid, (-0.05, 0.0, side * 0.2), (0.15, 0.18, 0.1)) < 1.0] = _GM  # basal ganglia
        curved = (z + 0.4 * y**2, y, x)  # banana-shaped lateral ventricles
        classes[radius(curved, (0.12, -0.02, side * 0.09), (0.1, 0.4, 0.07)) < 1.0] = _CSF
    classes[brain & (brain_r > 0.87) & (gyri > 1.0)] = _CSF  # sulci
    fissure = (np.abs(x) < 1.5 / x.size) & (brain_r > 0.5) & ((np.abs(y) > 0.35) | (z > 0.35))
    classes[brain & fissure] = _CSF  # interhemispheric fissure
    return classes


def _brain_tumour(rng: np.random.Generator, grid: Grid, classes: np.ndarray, shape_noise: np.ndarray,
                  edema_noise: np.ndarray, scale: float) -> np.ndarray:
    """Label map with NETC (2) inside an enhancing ring (3) inside edema (1)."""
    brain = classes != _BG
    center = random_direction(rng, 3) * rng.uniform(0.1, 0.45) * np.array(_BRAIN_SEMI_AXES)
    distance = np.sqrt(sum(((g - c) * n / 2) ** 2 for g, c, n in zip(grid, center, classes.shape)))  # voxels
    radius = rng.uniform(5.0, 11.0) * scale
    core_fraction = rng.choice([0.0, rng.uniform(0.15, 0.3), rng.uniform(0.35, 0.7)], p=[0.2, 0.15, 0.65])

    f = distance / radius * (1.0 + 0.18 * shape_noise)
    enhancing = ndimage.binary_erosion(brain) & (f < 1.0)
    core = ndimage.binary_erosion(enhancing) & (f < core_fraction)
    f_edema = distance / (radius * rng.uniform(1.3, 2.0)) * (1.0 + 0.3 * edema_noise)
    edema = (f_edema < 1.0) & ((classes == _WM) | (f_edema < 0.7)) & (classes != _CSF)  # spreads along WM
    edema = brain & (edema | ndimage.binary_dilation(enhancing))

    label = np.zeros(classes.shape, dtype=np.uint8)
    label[edema], label[enhancing], label[core] = 1, 3, 2
    return label


def brain_case(rng: np.random.Generator, site: SiteProfile, scale: float) -> Case:
    shape = tuple(jittered_size(64 * scale, rng, 0.06) for _ in range(3))
    grid = unit_grid(shape)

    def texture(sigma: float) -> np.ndarray:
        return smooth_noise(rng, shape, sigma * scale)

    classes = _brain_anatomy(rng, grid, texture(2.0))
    brain = classes != _BG
    label = _brain_tumour(rng, grid, classes, texture(2.5), texture(4.0), scale)
    for value, tissue in ((1, _EDEMA), (3, _ENHANCING), (2, _NECROSIS)):
        classes[label == value] = tissue

    contrasts = _BRAIN_CONTRASTS * rng.uniform(0.92, 1.08, _BRAIN_CONTRASTS.shape).astype(np.float32)
    modulation = 1.0 + 0.05 * texture(1.2) + 0.12 * texture(2.0) * (label > 0)  # anatomy + tumour heterogeneity
    channels = []
    for contrast in contrasts:
        image = ndimage.gaussian_filter(contrast[classes] * modulation, 0.6 * scale)  # partial volume
        image *= np.exp(site["bias"] * _low_order_field(rng, grid))
        image = np.abs(image + site["noise"] * rng.standard_normal(shape, dtype=np.float32))  # magnitude noise
        intensity = 1000.0 * site["scale"] * rng.uniform(0.95, 1.05)
        channels.append(np.where(brain, np.round(image * intensity), 0).astype(np.int16))
    return Case(channels, label, (1.0, 1.0, 1.0))


SPEC = TaskSpec(
    name="SynthBrain",
    channel_names={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
    labels={"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
    label_names={1: "edema", 2: "necrotic core", 3: "enhancing"},
    file_ending=".nii.gz",
    site_ranges={"scale": (0.7, 1.4), "bias": (0.05, 0.35), "noise": (0.02, 0.06)},
    make_case=brain_case,
    regions_class_order=(1, 2, 3),
)
