"""Deterministic synthetic nnU-Net v2 raw datasets for multi-site (federated) experiments.

Three tasks imitate real segmentation problems: ``skin`` (2D RGB dermoscopy lesions, PNG),
``kidney`` (3D KiTS-like abdominal CT, NIfTI) and ``brain`` (3D BraTS-like 4-channel MRI, NIfTI,
region-based labels). Training cases are spread unevenly over sites "A", "B", ... and every site
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

TASKS = ("skin", "kidney", "brain")

_SITE_WEIGHTS = (1.0, 1.3, 0.8)  # relative site sizes, cycled when there are more than three sites
_MIN_CASES_PER_SITE = 2
_STREAM_TRAIN, _STREAM_TEST, _STREAM_SITES = 0, 1, 2  # independent random streams per seed
_STREAM_PUBLIC, _STREAM_PUBLIC_SITES, _STREAM_PUBLIC_TEST = 3, 4, 5  # the public cohort: other cases, other scanners
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

_Grid = tuple[np.ndarray, ...]  # broadcastable coordinate arrays, one per axis
_SiteProfile = dict[str, float]


@dataclass(frozen=True)
class _Case:
    channels: list[np.ndarray]  # one array per image file
    label: np.ndarray
    spacing: tuple[float, ...] | None  # (z, y, x) in mm for 3D volumes, None for PNGs


@dataclass(frozen=True)
class _TaskSpec:
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    label_names: dict[int, str]  # raw label values as stored in the label files
    file_ending: str
    site_ranges: dict[str, tuple[float, float]]
    make_case: Callable[[np.random.Generator, _SiteProfile, float], _Case]
    regions_class_order: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- shared helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (a texture field)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=3.0)
    return field / (field.std() + 1e-6)


def _unit_grid(shape: tuple[int, ...]) -> _Grid:
    """Broadcastable coordinates spanning [-1, 1] along every axis."""
    return tuple(
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == i else 1 for a in range(len(shape))])
        for i, n in enumerate(shape)
    )


def _radius(grid: _Grid, center: tuple[float, ...], semi_axes: tuple[float, ...], angle: float = 0.0) -> np.ndarray:
    """Normalised ellipsoidal radius (< 1 inside); ``angle`` rotates the last two axes (y, x)."""
    offsets = [g - c for g, c in zip(grid, center)]
    dy, dx = offsets[-2], offsets[-1]
    offsets[-2] = -dx * np.sin(angle) + dy * np.cos(angle)
    offsets[-1] = dx * np.cos(angle) + dy * np.sin(angle)
    return np.sqrt(sum((o / a) ** 2 for o, a in zip(offsets, semi_axes)))


def _local_to_world(center: tuple[float, ...], offset: np.ndarray, angle: float) -> tuple[float, ...]:
    """Inverse of the rotation in :func:`_radius`: a local (.., y, x) offset to world coordinates."""
    v, u = offset[-2], offset[-1]
    world = list(offset)
    world[-2] = u * np.sin(angle) + v * np.cos(angle)
    world[-1] = u * np.cos(angle) - v * np.sin(angle)
    return tuple(float(c + w) for c, w in zip(center, world))


def _random_direction(rng: np.random.Generator, ndim: int) -> np.ndarray:
    vec = rng.standard_normal(ndim)
    return vec / np.linalg.norm(vec)


def _jittered_size(nominal: float, rng: np.random.Generator, rel: float) -> int:
    return max(8, int(round(nominal * rng.uniform(1.0 - rel, 1.0 + rel))))


def _site_profiles(ranges: dict[str, tuple[float, float]], rng: np.random.Generator,
                   num_sites: int) -> list[_SiteProfile]:
    """Stratified per-site acquisition parameters, so that sites really differ from each other."""
    columns = {
        key: lo + (hi - lo) * (rng.permutation(num_sites) + rng.uniform(0.0, 1.0, num_sites)) / num_sites
        for key, (lo, hi) in ranges.items()
    }
    return [{key: float(values[i]) for key, values in columns.items()} for i in range(num_sites)]


# ----------------------------------------------------------------------------- skin (2D RGB)


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
        direction, normal = _random_direction(rng, 2), _random_direction(rng, 2)
        points = start + np.outer(t, direction) + np.outer(rng.uniform(-0.3, 0.3) * t**2, normal)
        rows = np.round(points[:, 0] * half + (shape[0] - 1) / 2).astype(int)
        cols = np.round(points[:, 1] * half + (shape[1] - 1) / 2).astype(int)
        inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        traced[rows[inside], cols[inside]] = True
    if not traced.any():
        return np.zeros(shape, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~traced)
    return np.clip(1.0 - distance / width, 0.0, 1.0).astype(np.float32)


def _lesion_dots(rng: np.random.Generator, grid: _Grid, center: np.ndarray, size: float, px: float) -> np.ndarray:
    """Sum of small dark Gaussian globules scattered inside the lesion."""
    dots = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for _ in range(rng.integers(0, 16)):
        pos = center + _random_direction(rng, 2) * rng.uniform(0, 0.7) * size
        width = rng.uniform(1.0, 2.5) * px
        dots += np.exp(-((grid[0] - pos[0]) ** 2 + (grid[1] - pos[1]) ** 2) / (2 * width**2))
    return np.clip(dots, 0.0, 1.0)


def _skin_case(rng: np.random.Generator, site: _SiteProfile, scale: float) -> _Case:
    shape = (_jittered_size(128 * scale, rng, 0.125), _jittered_size(128 * scale, rng, 0.125))
    px = 2.0 / min(shape)  # one pixel in normalised units
    grid = tuple(g * n / min(shape) for g, n in zip(_unit_grid(shape), shape))  # isotropic units

    # skin: tone and two-scale texture
    tone = np.array([228.0, 184.0, 160.0]) * rng.uniform(0.72, 1.05)
    texture = 5.0 * _smooth_noise(rng, shape, 1.5 * scale) + 7.0 * _smooth_noise(rng, shape, 10.0 * scale)
    image = tone + texture[..., None] * np.array([1.0, 0.85, 0.8])

    # lesion: rotated ellipse with a Fourier-perturbed boundary
    center = rng.uniform(-0.2, 0.2, 2)
    semi = rng.uniform(0.3, 0.65) * np.array([1.0, rng.uniform(0.6, 1.0)])
    angle = rng.uniform(0, np.pi)
    theta = np.arctan2(grid[0] - center[0], grid[1] - center[1])
    rho = _radius(grid, tuple(center), tuple(semi), angle) / _fourier_boundary(rng, theta, rng.uniform(0.1, 0.45))
    label = (rho < 1.0).astype(np.uint8)

    darkness = rng.uniform(0.45, 1.05) * (0.75 + 0.3 * np.clip(rho, 0, 1)) + 0.12 * _smooth_noise(rng, shape, 3 * scale)
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
    return _Case([np.clip(np.round(image), 0, 255).astype(np.uint8)], label, None)


# ----------------------------------------------------------------------------- kidney (3D CT)

_SOLID_ORGANS = (  # (center z, y, x), semi-axes, HU in normalised body coordinates
    ((0.5, -0.05, -0.38), (0.9, 0.5, 0.45), 60.0),  # liver
    ((0.6, 0.15, 0.52), (0.45, 0.22, 0.18), 50.0),  # spleen
)
_TUBULAR_ORGANS = (  # running through all slices: (center y, x), semi-axes, HU
    ((0.3, -0.18), (0.09, 0.08), 52.0),  # psoas muscles
    ((0.3, 0.18), (0.09, 0.08), 52.0),
    ((0.58, -0.2), (0.1, 0.13), 55.0),  # paraspinal muscles
    ((0.58, 0.2), (0.1, 0.13), 55.0),
    ((0.12, 0.08), (0.06, 0.06), 180.0),  # aorta with contrast
    ((0.12, -0.1), (0.07, 0.07), 130.0),  # vena cava
)


@dataclass(frozen=True)
class _CtTextures:
    fine: np.ndarray  # tissue graininess
    lumps: np.ndarray  # shape perturbations, patches
    blobs: np.ndarray  # larger patches (fat, gas)
    outline: np.ndarray  # in-plane field for the body contour


def _paint(volume: np.ndarray, mask: np.ndarray, value: float | np.ndarray) -> None:
    """volume[mask] = value, broadcasting both mask and value to the volume's shape."""
    mask = np.broadcast_to(mask, volume.shape)
    volume[mask] = np.broadcast_to(value, volume.shape)[mask]


def _abdomen(rng: np.random.Generator, grid: _Grid, tex: _CtTextures) -> tuple[np.ndarray, np.ndarray]:
    """HU volume of body, fat, bowel, organs, muscles, vessels and spine; returns (hu, inner body mask)."""
    z, y, x = grid
    hu = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), -1000.0, dtype=np.float32)
    body_r = _radius((y, x), (0.05, 0.0), (0.7 * rng.uniform(0.9, 1.05), 0.92 * rng.uniform(0.9, 1.05)))
    body_r = body_r + 0.03 * tex.outline
    inner = body_r < 1.0 - rng.uniform(0.06, 0.16)  # inside the subcutaneous fat layer
    _paint(hu, body_r < 1.0, -100.0 + 10.0 * tex.fine)
    _paint(hu, inner, 45.0 + 8.0 * tex.fine)
    bowel = inner & (y < 0.1)
    _paint(hu, bowel & (tex.blobs > 0.9), -95.0 + 10.0 * tex.fine)  # mesenteric fat
    _paint(hu, bowel & (tex.lumps > 1.9), -950.0)  # gas pockets

    for center, semi, value in _SOLID_ORGANS:
        center = tuple(c + rng.uniform(-0.04, 0.04) for c in center)
        _paint(hu, inner & (_radius(grid, center, semi) < 1.0), value + 6.0 * tex.fine)
    for center, semi, value in _TUBULAR_ORGANS:
        _paint(hu, inner & (_radius((y, x), center, semi) < 1.0), value + 6.0 * tex.fine)

    vertebra = _radius((y, x), (0.32, 0.0), (0.13, 0.14))
    disc = np.cos(2 * np.pi * (z * rng.uniform(2.0, 3.0) + rng.uniform(0, 1))) > 0.75  # intervertebral discs
    bone = np.where(vertebra > 0.8, 650.0, np.where(disc, 90.0, 250.0))  # cortical rim, disc, cancellous core
    _paint(hu, vertebra < 1.0, bone + 40.0 * tex.fine)
    _paint(hu, _radius((y, x), (0.52, 0.0), (0.06, 0.12)) < 1.0, 500.0 + 60.0 * tex.fine)  # posterior arch
    _paint(hu, _radius((y, x), (0.44, 0.0), (0.045, 0.045)) < 1.0, 20.0)  # spinal canal
    return hu, inner


_Kidney = tuple[tuple[float, ...], tuple[float, ...], float]  # center, semi-axes, in-plane angle


def _kidneys(rng: np.random.Generator, grid: _Grid, inner: np.ndarray, hu: np.ndarray, label: np.ndarray,
             tex: _CtTextures, contrast: float) -> list[_Kidney]:
    """Paint two bean-shaped kidneys (cortex, medulla, hilum with sinus fat and pelvis)."""
    kidneys = []
    for side in (-1.0, 1.0):
        center = (rng.uniform(-0.2, 0.2), 0.32 + rng.uniform(-0.04, 0.04), side * rng.uniform(0.4, 0.5))
        semi = (rng.uniform(0.45, 0.6), rng.uniform(0.11, 0.14), rng.uniform(0.15, 0.19))
        angle = side * rng.uniform(0.3, 0.7)
        rho = _radius(grid, center, semi, angle)
        hilum_center = _local_to_world(center, np.array([0.0, 0.1 * semi[1], -side * 0.85 * semi[2]]), angle)
        hilum = _radius(grid, hilum_center, (0.4 * semi[0], 0.5 * semi[1], 0.5 * semi[2]), angle)
        kidney = inner & (rho < 1.0) & (hilum >= 1.0)
        cortex = rho > 0.68 + 0.08 * tex.lumps
        _paint(hu, kidney, np.where(cortex, 175.0 * contrast, 112.0) + 10.0 * tex.fine)
        _paint(hu, inner & (rho < 1.1) & (hilum < 1.0), np.where(hilum < 0.55, 15.0, -70.0))
        label[kidney] = 1
        kidneys.append((center, semi, angle))
    return kidneys


def _attached_lesion(rng: np.random.Generator, grid: _Grid, kidney: _Kidney, size: tuple[float, float],
                     depth: tuple[float, float]) -> np.ndarray:
    """Radius field of an ellipsoid centred inside or on the surface of a kidney."""
    center, semi, angle = kidney
    offset = _random_direction(rng, 3) * rng.uniform(*depth) * np.array(semi)
    lesion_semi = tuple(rng.uniform(*size) * s for s in semi)
    return _radius(grid, _local_to_world(center, offset, angle), lesion_semi, angle)


def _kidney_case(rng: np.random.Generator, site: _SiteProfile, scale: float) -> _Case:
    n = _jittered_size(80 * scale, rng, 0.1)
    inplane = site["inplane"] * rng.uniform(0.97, 1.03)
    nz = max(8, int(round(112 * scale * rng.uniform(0.9, 1.1) / site["thickness"])))
    spacing = (site["thickness"], inplane, inplane)
    shape = (nz, n, n)
    grid = _unit_grid(shape)

    def texture(sigma_mm: float, field_shape: tuple[int, ...] = shape) -> np.ndarray:  # sigma in mm at scale 1
        return _smooth_noise(rng, field_shape, tuple(sigma_mm * scale / s for s in spacing))

    tex = _CtTextures(texture(1.0), texture(3.0), texture(4.0), texture(12.0, (1, n, n)))
    hu, inner = _abdomen(rng, grid, tex)
    label = np.zeros(shape, dtype=np.uint8)
    kidneys = _kidneys(rng, grid, inner, hu, label, tex, site["contrast"])

    for _ in range(rng.choice(3, p=[0.35, 0.45, 0.2])):  # simple cysts: round, homogeneous, water-like
        cyst = inner & (_attached_lesion(rng, grid, kidneys[rng.integers(2)], (0.3, 0.6), (0.5, 1.0)) < 1.0)
        _paint(hu, cyst, rng.uniform(3.0, 17.0))
        label[cyst] = 3
    if rng.random() < 0.85:  # tumour: lobulated, heterogeneous, sometimes with a necrotic centre
        rho = _attached_lesion(rng, grid, kidneys[rng.integers(2)], (0.45, 1.0), (0.3, 0.9)) + 0.2 * tex.blobs
        tumour = inner & (rho < 1.0)
        has_necrosis = rng.random() < 0.4
        necrotic = has_necrosis & (rho < 0.55) & (tex.lumps > 0.0)
        _paint(hu, tumour, np.where(necrotic, 35.0, rng.uniform(85.0, 115.0)) + 15.0 * tex.lumps)
        label[tumour] = 2

    hu = ndimage.gaussian_filter(hu, (0.35, 0.6, 0.6))  # partial volume / reconstruction kernel
    hu += site["noise"] * _smooth_noise(rng, shape, (0.3, 0.7, 0.7)) + site["hu_offset"]
    return _Case([np.clip(np.round(hu), -1024, 3071).astype(np.int16)], label, spacing)


# ----------------------------------------------------------------------------- brain (3D multi-channel MRI)

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


def _low_order_field(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Random quadratic polynomial with roughly unit amplitude (bias fields, global shape changes)."""
    z, y, x = grid
    terms = (z, y, z * y, z * z, y * y, x, x * x, z * x, y * x)  # x terms last: cheap broadcasting
    return sum(rng.standard_normal() * t for t in terms) / np.sqrt(len(terms))


def _brain_anatomy(rng: np.random.Generator, grid: _Grid, gyri: np.ndarray) -> np.ndarray:
    """Tissue classes of a skull-stripped brain: WM core, folded GM cortex, deep GM, ventricles, sulci."""
    z, y, x = grid
    semi = tuple(a * rng.uniform(0.92, 1.04) for a in _BRAIN_SEMI_AXES)
    brain_r = _radius(grid, (0.0, 0.0, 0.0), semi) + 0.04 * _low_order_field(rng, grid) + 0.015 * gyri
    brain = brain_r < 1.0
    classes = np.where(brain, _WM, _BG).astype(np.uint8)
    classes[brain & (brain_r > 0.8 + 0.06 * gyri)] = _GM
    for side in (-1.0, 1.0):
        classes[_radius(grid, (-0.05, 0.0, side * 0.2), (0.15, 0.18, 0.1)) < 1.0] = _GM  # basal ganglia
        curved = (z + 0.4 * y**2, y, x)  # banana-shaped lateral ventricles
        classes[_radius(curved, (0.12, -0.02, side * 0.09), (0.1, 0.4, 0.07)) < 1.0] = _CSF
    classes[brain & (brain_r > 0.87) & (gyri > 1.0)] = _CSF  # sulci
    fissure = (np.abs(x) < 1.5 / x.size) & (brain_r > 0.5) & ((np.abs(y) > 0.35) | (z > 0.35))
    classes[brain & fissure] = _CSF  # interhemispheric fissure
    return classes


def _brain_tumour(rng: np.random.Generator, grid: _Grid, classes: np.ndarray, shape_noise: np.ndarray,
                  edema_noise: np.ndarray, scale: float) -> np.ndarray:
    """Label map with NETC (2) inside an enhancing ring (3) inside edema (1)."""
    brain = classes != _BG
    center = _random_direction(rng, 3) * rng.uniform(0.1, 0.45) * np.array(_BRAIN_SEMI_AXES)
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


def _brain_case(rng: np.random.Generator, site: _SiteProfile, scale: float) -> _Case:
    shape = tuple(_jittered_size(64 * scale, rng, 0.06) for _ in range(3))
    grid = _unit_grid(shape)

    def texture(sigma: float) -> np.ndarray:
        return _smooth_noise(rng, shape, sigma * scale)

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
    return _Case(channels, label, (1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------- task table

_SPECS = {
    "skin": _TaskSpec(
        name="SynthSkin",
        channel_names={"0": "R", "1": "G", "2": "B"},
        labels={"background": 0, "lesion": 1},
        label_names={1: "lesion"},
        file_ending=".png",
        site_ranges={"gain_r": (0.85, 1.15), "gain_g": (0.85, 1.15), "gain_b": (0.85, 1.15),
                     "brightness": (-20.0, 20.0), "noise": (2.0, 9.0), "blur": (0.0, 1.2)},
        make_case=_skin_case,
    ),
    "kidney": _TaskSpec(
        name="SynthKidney",
        channel_names={"0": "CT"},
        labels={"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
        label_names={1: "kidney", 2: "tumor", 3: "cyst"},
        file_ending=".nii.gz",
        site_ranges={"hu_offset": (-40.0, 40.0), "noise": (8.0, 22.0), "thickness": (2.5, 5.0),
                     "inplane": (0.8, 1.0), "contrast": (0.85, 1.15)},
        make_case=_kidney_case,
    ),
    "brain": _TaskSpec(
        name="SynthBrain",
        channel_names={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
        labels={"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        label_names={1: "edema", 2: "necrotic core", 3: "enhancing"},
        file_ending=".nii.gz",
        site_ranges={"scale": (0.7, 1.4), "bias": (0.05, 0.35), "noise": (0.02, 0.06)},
        make_case=_brain_case,
        regions_class_order=(1, 2, 3),
    ),
}

# ----------------------------------------------------------------------------- dataset writing


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not valid or value < minimum or (maximum is not None and value > maximum):
        bounds = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _validate(task: str, dataset_id: int, num_cases: int, num_sites: int, num_test_cases: int, seed: int,
              scale: float, dataset_name: str | None) -> _TaskSpec:
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


def _write_case(case: _Case, case_id: str, folder: Path, split: str, file_ending: str) -> None:
    images, labels = folder / f"images{split}", folder / f"labels{split}"
    if file_ending == ".png":
        Image.fromarray(case.channels[0]).save(images / f"{case_id}_0000.png")
        Image.fromarray(case.label).save(labels / f"{case_id}.png")
        return
    for channel, array in enumerate(case.channels):
        _write_nifti(array, case.spacing, images / f"{case_id}_{channel:04d}{file_ending}")
    _write_nifti(case.label, case.spacing, labels / f"{case_id}{file_ending}")


def _dataset_json(spec: _TaskSpec, name: str, task: str, num_training: int, seed: int) -> dict:
    content = {
        "name": name,
        "description": f"Synthetic {task} dataset from nnunet_adpfl.synthetic (seed {seed})",
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
    profiles = _site_profiles(spec.site_ranges, np.random.default_rng([seed, stream_sites]), num_sites)

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
        description="Write a deterministic synthetic nnU-Net v2 raw dataset (skin, kidney or brain task).")
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
    parser = argparse.ArgumentParser(prog="python -m nnunet_adpfl.synthetic", description=__doc__.splitlines()[0])
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_main())
