"""Synthetic kidney CT: 3D KiTS-like abdominal volumes with kidneys, tumours and cysts (NIfTI)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from .shapes import (Case, Grid, SiteProfile, TaskSpec, jittered_size, local_to_world, radius, random_direction,
                     smooth_noise, unit_grid)

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


def _abdomen(rng: np.random.Generator, grid: Grid, tex: _CtTextures) -> tuple[np.ndarray, np.ndarray]:
    """HU volume of body, fat, bowel, organs, muscles, vessels and spine; returns (hu, inner body mask)."""
    z, y, x = grid
    hu = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), -1000.0, dtype=np.float32)
    body_r = radius((y, x), (0.05, 0.0), (0.7 * rng.uniform(0.9, 1.05), 0.92 * rng.uniform(0.9, 1.05)))
    body_r = body_r + 0.03 * tex.outline
    inner = body_r < 1.0 - rng.uniform(0.06, 0.16)  # inside the subcutaneous fat layer
    _paint(hu, body_r < 1.0, -100.0 + 10.0 * tex.fine)
    _paint(hu, inner, 45.0 + 8.0 * tex.fine)
    bowel = inner & (y < 0.1)
    _paint(hu, bowel & (tex.blobs > 0.9), -95.0 + 10.0 * tex.fine)  # mesenteric fat
    _paint(hu, bowel & (tex.lumps > 1.9), -950.0)  # gas pockets

    for center, semi, value in _SOLID_ORGANS:
        center = tuple(c + rng.uniform(-0.04, 0.04) for c in center)
        _paint(hu, inner & (radius(grid, center, semi) < 1.0), value + 6.0 * tex.fine)
    for center, semi, value in _TUBULAR_ORGANS:
        _paint(hu, inner & (radius((y, x), center, semi) < 1.0), value + 6.0 * tex.fine)

    vertebra = radius((y, x), (0.32, 0.0), (0.13, 0.14))
    disc = np.cos(2 * np.pi * (z * rng.uniform(2.0, 3.0) + rng.uniform(0, 1))) > 0.75  # intervertebral discs
    bone = np.where(vertebra > 0.8, 650.0, np.where(disc, 90.0, 250.0))  # cortical rim, disc, cancellous core
    _paint(hu, vertebra < 1.0, bone + 40.0 * tex.fine)
    _paint(hu, radius((y, x), (0.52, 0.0), (0.06, 0.12)) < 1.0, 500.0 + 60.0 * tex.fine)  # posterior arch
    _paint(hu, radius((y, x), (0.44, 0.0), (0.045, 0.045)) < 1.0, 20.0)  # spinal canal
    return hu, inner


_Kidney = tuple[tuple[float, ...], tuple[float, ...], float]  # center, semi-axes, in-plane angle


def _kidneys(rng: np.random.Generator, grid: Grid, inner: np.ndarray, hu: np.ndarray, label: np.ndarray,
             tex: _CtTextures, contrast: float) -> list[_Kidney]:
    """Paint two bean-shaped kidneys (cortex, medulla, hilum with sinus fat and pelvis)."""
    kidneys = []
    for side in (-1.0, 1.0):
        center = (rng.uniform(-0.2, 0.2), 0.32 + rng.uniform(-0.04, 0.04), side * rng.uniform(0.4, 0.5))
        semi = (rng.uniform(0.45, 0.6), rng.uniform(0.11, 0.14), rng.uniform(0.15, 0.19))
        angle = side * rng.uniform(0.3, 0.7)
        rho = radius(grid, center, semi, angle)
        hilum_center = local_to_world(center, np.array([0.0, 0.1 * semi[1], -side * 0.85 * semi[2]]), angle)
        hilum = radius(grid, hilum_center, (0.4 * semi[0], 0.5 * semi[1], 0.5 * semi[2]), angle)
        kidney = inner & (rho < 1.0) & (hilum >= 1.0)
        cortex = rho > 0.68 + 0.08 * tex.lumps
        _paint(hu, kidney, np.where(cortex, 175.0 * contrast, 112.0) + 10.0 * tex.fine)
        _paint(hu, inner & (rho < 1.1) & (hilum < 1.0), np.where(hilum < 0.55, 15.0, -70.0))
        label[kidney] = 1
        kidneys.append((center, semi, angle))
    return kidneys


def _attached_lesion(rng: np.random.Generator, grid: Grid, kidney: _Kidney, size: tuple[float, float],
                     depth: tuple[float, float]) -> np.ndarray:
    """Radius field of an ellipsoid centred inside or on the surface of a kidney."""
    center, semi, angle = kidney
    offset = random_direction(rng, 3) * rng.uniform(*depth) * np.array(semi)
    lesion_semi = tuple(rng.uniform(*size) * s for s in semi)
    return radius(grid, local_to_world(center, offset, angle), lesion_semi, angle)


def _kidney_volume(rng: np.random.Generator, site: SiteProfile, scale: float, roi_side: float | None) -> Case:
    """The abdomen (``roi_side`` None), or the box around the kidney on that side (-1 or +1 along the x axis)
    cut from the same abdomen drawn on a finer grid: as many voxels as the abdomen, the kidney and its lesions
    spanning ~3x more of them in-plane, and cysts more frequent, larger and further inside the kidney."""
    n = jittered_size(80 * scale, rng, 0.1)
    inplane = site["inplane"] * rng.uniform(0.97, 1.03)
    nz = max(8, int(round(112 * scale * rng.uniform(0.9, 1.1) / site["thickness"])))
    spacing = (site["thickness"], inplane, inplane)
    shape = (nz, n, n)
    zoom = (1.0, 1.0, 1.0) if roi_side is None else tuple(1.0 / h for h in _ROI_HALF)
    full = tuple(int(round(size * z)) for size, z in zip(shape, zoom))
    grid = unit_grid(full)

    def texture(sigma_mm: float, field_shape: tuple[int, ...] = full) -> np.ndarray:  # sigma in mm at scale 1
        return smooth_noise(rng, field_shape, tuple(sigma_mm * scale * z / s for s, z in zip(spacing, zoom)))

    tex = _CtTextures(texture(1.0), texture(3.0), texture(4.0), texture(12.0, (1, full[1], full[2])))
    hu, inner = _abdomen(rng, grid, tex)
    label = np.zeros(full, dtype=np.uint8)
    kidneys = _kidneys(rng, grid, inner, hu, label, tex, site["contrast"])
    if roi_side is None:
        cysts, cyst_size, cyst_depth = (0.35, 0.45, 0.2), (0.3, 0.6), (0.5, 1.0)
    else:
        cysts, cyst_size, cyst_depth = (0.2, 0.5, 0.3), (0.4, 0.7), (0.2, 0.7)

    def lesion_kidney() -> _Kidney:
        return kidneys[rng.integers(2)] if roi_side is None else kidneys[int(roi_side > 0)]

    for _ in range(rng.choice(3, p=cysts)):  # simple cysts: round, homogeneous, water-like
        cyst = inner & (_attached_lesion(rng, grid, lesion_kidney(), cyst_size, cyst_depth) < 1.0)
        _paint(hu, cyst, rng.uniform(3.0, 17.0))
        label[cyst] = 3
    if rng.random() < 0.85:  # tumour: lobulated, heterogeneous, sometimes with a necrotic centre
        rho = _attached_lesion(rng, grid, lesion_kidney(), (0.45, 1.0), (0.3, 0.9)) + 0.2 * tex.blobs
        tumour = inner & (rho < 1.0)
        has_necrosis = rng.random() < 0.4
        necrotic = has_necrosis & (rho < 0.55) & (tex.lumps > 0.0)
        _paint(hu, tumour, np.where(necrotic, 35.0, rng.uniform(85.0, 115.0)) + 15.0 * tex.lumps)
        label[tumour] = 2

    if roi_side is not None:
        box = _box(full, shape, (0.0, _ROI_Y, roi_side * _ROI_X))
        hu, label = hu[box], label[box]
    hu = ndimage.gaussian_filter(hu, (0.35, 0.6, 0.6))  # partial volume / reconstruction kernel
    hu += site["noise"] * smooth_noise(rng, shape, (0.3, 0.7, 0.7)) + site["hu_offset"]
    return Case([np.clip(np.round(hu), -1024, 3071).astype(np.int16)], label, spacing)


# The kidney-region box (body coordinates): holds either kidney with its lesions whatever its random position.
_ROI_Y, _ROI_X, _ROI_HALF = 0.32, 0.45, (0.9, 0.3, 0.3)


def _box(full: tuple[int, ...], size: tuple[int, ...], center: tuple[float, ...]) -> tuple[slice, ...]:
    """Slices of ``size`` voxels centred on ``center`` (coordinates in [-1, 1]) of a grid of shape ``full``."""
    starts = (min(max(int(round((c + 1.0) / 2.0 * (f - 1) - (s - 1) / 2.0)), 0), f - s)
              for f, s, c in zip(full, size, center))
    return tuple(slice(b, b + s) for b, s in zip(starts, size))


def kidney_case(rng: np.random.Generator, site: SiteProfile, scale: float) -> Case:
    return _kidney_volume(rng, site, scale, roi_side=None)


def kidney_roi_case(rng: np.random.Generator, site: SiteProfile, scale: float) -> Case:
    """One kidney's region, as KiTS pipelines crop it: tumours and cysts large enough to learn at scale 0.5."""
    return _kidney_volume(rng, site, scale, roi_side=float(rng.choice((-1.0, 1.0))))


SPEC = TaskSpec(
    name="SynthKidney",
    channel_names={"0": "CT"},
    labels={"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
    label_names={1: "kidney", 2: "tumor", 3: "cyst"},
    file_ending=".nii.gz",
    site_ranges={"hu_offset": (-40.0, 40.0), "noise": (8.0, 22.0), "thickness": (2.5, 5.0),
                 "inplane": (0.8, 1.0), "contrast": (0.85, 1.15)},
    make_case=kidney_case,
)

ROI_SPEC = replace(SPEC, name="SynthKidneyRoi", make_case=kidney_roi_case)
