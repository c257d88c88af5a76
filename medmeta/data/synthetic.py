"""Procedural synthetic CT lesion data set, written as real DICOM files.

Why this module is longer than 300 lines: one generator whose shape, margin, density and background
pieces are drawn from one seeded stream, so they stay together; the 3D mode is ``synthetic3d.py``.

Each image is a lesion-centred chest-CT patch in Hounsfield units (HU). A lesion
class combines a shape, a margin and an internal density pattern; the background
(lung texture, vessels, chest wall / mediastinum / organ edges), the noise and the
lesion's size, position and contrast vary per synthetic patient, and slightly per
image, like neighbouring slices of one scan.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

logger = logging.getLogger(__name__)

SHAPES = ("round", "oval", "lobulated", "spiculated", "irregular")
MARGINS = ("sharp", "ill-defined")
DENSITIES = ("solid", "ground-glass", "part-solid", "cystic", "fat", "calcified", "cavitary", "rim-enhancing")

HU_MIN, HU_MAX = -1024.0, 3071.0
RESCALE_INTERCEPT = -1024
_PATIENT_TAG, _IMAGE_TAG = 1, 2  # first seed word: patient and image streams never collide


@dataclass(frozen=True)
class LesionClass:
    """One lesion class: shape x margin x density."""

    shape: str
    margin: str
    density: str

    def __post_init__(self) -> None:
        for value, allowed in ((self.shape, SHAPES), (self.margin, MARGINS), (self.density, DENSITIES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")

    @property
    def name(self) -> str:
        """Folder name, e.g. ``spiculated-sharp-calcified``."""
        return f"{self.shape}-{self.margin}-{self.density}"


ALL_LESION_CLASSES: tuple[LesionClass, ...] = tuple(
    LesionClass(s, m, d) for s in SHAPES for m in MARGINS for d in DENSITIES
)

# Spread order: i -> (shape i%5, density i%8) visits all 40 pairs in i < 40 (5 and 8 are
# coprime); the margin alternates every 5 classes and flips for the second 40.
_SPREAD_ORDER: tuple[LesionClass, ...] = tuple(
    LesionClass(SHAPES[i % 5], MARGINS[(i // 5 + i // 40) % 2], DENSITIES[i % 8]) for i in range(80)
)


def lesion_classes(n_classes: int = 30) -> tuple[LesionClass, ...]:
    """Return a fixed, seed-independent selection of ``n_classes`` distinct classes.

    Any prefix is well spread over shapes, margins and densities; selections of
    different sizes share their first classes, so class indices are stable.

    Raises:
        ValueError: if ``n_classes`` is not in ``1..80``.
    """
    if not 1 <= n_classes <= len(_SPREAD_ORDER):
        raise ValueError(f"n_classes must be in 1..{len(_SPREAD_ORDER)}, got {n_classes}")
    return _SPREAD_ORDER[:n_classes]


def image_rngs(
    seed: int, class_idx: int, patient_idx: int, image_idx: int
) -> tuple[np.random.Generator, np.random.Generator]:
    """Return fresh ``(patient_rng, image_rng)`` for one image, as used by the generator."""
    if min(seed, class_idx, patient_idx, image_idx) < 0:
        raise ValueError("seed and indices must be non-negative")
    patient_rng = np.random.default_rng([_PATIENT_TAG, seed, class_idx, patient_idx])
    image_rng = np.random.default_rng([_IMAGE_TAG, seed, class_idx, patient_idx, image_idx])
    return patient_rng, image_rng


# ----------------------------------------------------------------------------- numpy helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders."""
    if sigma < 0.2:
        return img.copy()
    radius = min(int(np.ceil(3.0 * sigma)), min(img.shape) - 1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for j, w in enumerate(kernel):
            acc += w * (padded[j : j + n] if axis == 0 else padded[:, j : j + n])
        out = acc
    return out


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smoothed Gaussian noise with unit standard deviation."""
    field = _blur(rng.standard_normal((size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to segment p0-p1 (points as (y, x)) and the position t in [0, 1]."""
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-8), 0.0, 1.0)
    return np.hypot(yy - p0[0] - t * d[0], xx - p0[1] - t * d[1]), t


def _harmonics(rng: np.random.Generator, ks: range, scale: float) -> list[tuple[int, float, float]]:
    return [(k, float(rng.normal(0.0, scale)), float(rng.uniform(0, 2 * np.pi))) for k in ks]


def _eval_harmonics(phi: np.ndarray, terms: list[tuple[int, float, float]]) -> np.ndarray:
    return sum((a * np.cos(k * phi + p) for k, a, p in terms), np.zeros_like(phi))


# ----------------------------------------------------------------------------- background


_Segment = tuple[np.ndarray, np.ndarray, float, float]


def _vessel_segments(rng: np.random.Generator, size: int, scale: float) -> list[_Segment]:
    """Random curved, branching vessel trees as (p0, p1, width0, width1) segments."""
    segments = []
    for _ in range(int(rng.integers(1, 5))):
        stack = [(rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.6) * scale, 0)]
        while stack and len(segments) < 36:
            pos, angle, width, depth = stack.pop()
            bend = rng.normal(0.0, 0.25)
            for _ in range(int(rng.integers(3, 7))):
                angle += bend + rng.normal(0.0, 0.2)
                end = pos + rng.uniform(3, 7) * scale * np.array([np.sin(angle), np.cos(angle)])
                new_width = max(0.35 * scale, width * rng.uniform(0.85, 0.97))
                segments.append((pos, end, width, new_width))
                if depth < 2 and rng.random() < 0.2:
                    stack.append((end, angle + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), new_width * 0.7, depth + 1))
                pos, width = end, new_width
    # vessels cut across: small round dots
    for _ in range(int(rng.integers(1, 8))):
        pos, width = rng.uniform(0, size, 2), rng.uniform(0.6, 1.8) * scale
        segments.append((pos, pos + 1e-3, width, width))
    return segments


def _background(prng: np.random.Generator, irng: np.random.Generator, size: int, scale: float,
                centre: np.ndarray, extent: float) -> tuple[np.ndarray, float]:
    """Lung background with vessels and maybe a chest wall / mediastinum / organ edge; returns (HU, lung level)."""
    # patient-level draws (fixed count and order)
    lung = prng.uniform(-880, -800)
    grad = prng.normal(0, 15, 2)
    tex_amp, tex_sigma = prng.uniform(8, 28), prng.uniform(1.2, 3.0) * scale
    tex_patient = _smooth_noise(prng, size, tex_sigma)
    vessels = _vessel_segments(prng, size, scale)
    vessel_hu = prng.uniform(-20, 60)
    kind = prng.choice(["none", "chest_wall", "mediastinum", "organ"], p=[0.3, 0.35, 0.2, 0.15])
    normal_angle = prng.integers(0, 4) * np.pi / 2 + prng.normal(0, 0.35)
    lo = min(extent + 3 * scale, 0.42 * size)
    dist = prng.uniform(lo, max(lo, 0.5 * size - 4 * scale))
    curvature, wiggle = prng.uniform(-0.012, 0.012) / scale, prng.uniform(0.5, 2.5) * scale
    wiggle_f, wiggle_p = prng.uniform(0.05, 0.2) / scale, prng.uniform(0, 2 * np.pi)
    fat_th, fat_hu, tissue_hu = prng.uniform(1.0, 3.0) * scale, prng.uniform(-120, -80), prng.uniform(30, 65)
    fat_patches = _smooth_noise(prng, size, 3.0 * scale)
    rib = (prng.random() < 0.6, prng.uniform(2, 7) * scale, prng.uniform(-15, 15) * scale,
           prng.uniform(5, 9) * scale, prng.uniform(2.5, 4) * scale)
    big_vessel = (prng.uniform(-10, 10, 2) * scale, prng.uniform(4, 9) * scale, prng.uniform(40, 200))
    # image-level: a slight shift of the anatomy and partly new texture
    shift = irng.normal(0, 0.6 * scale, 2)
    tex = 0.8 * tex_patient + 0.6 * _smooth_noise(irng, size, tex_sigma)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy, xx = yy - shift[0], xx - shift[1]

    c = (size - 1) / 2.0
    bg = lung + grad[0] * (yy - c) / size + grad[1] * (xx - c) / size + tex_amp * tex
    vessel = np.zeros_like(bg)
    for p0, p1, w0, w1 in vessels:
        d, t = _segment_distance(yy, xx, p0, p1)
        vessel = np.maximum(vessel, _sigmoid((w0 + (w1 - w0) * t - d) / (0.35 * scale)))
    bg += vessel * (vessel_hu - bg)

    if kind != "none":
        ny, nx = np.sin(normal_angle), np.cos(normal_angle)
        along = -(yy - centre[0]) * nx + (xx - centre[1]) * ny
        s = (yy - centre[0]) * ny + (xx - centre[1]) * nx - dist - curvature * along**2
        s -= wiggle * np.sin(wiggle_f * along + wiggle_p)
        if kind == "chest_wall":
            wall = np.where(s < fat_th, fat_hu, tissue_hu + 8 * tex)
            wall = np.where(fat_patches > 1.0, fat_hu, wall)
            has_rib, rs, ra, r_along, r_norm = rib
            if has_rib:
                q = np.hypot((along - ra) / r_along, (s - fat_th - rs - r_norm) / r_norm)
                wall = np.where(q < 1.0, np.where(q > 0.75, 700.0, 250.0), wall)
        elif kind == "mediastinum":
            wall = np.where(fat_patches > 0.3, fat_hu, tissue_hu + 6 * tex)
            off, rad, hu = big_vessel
            q = np.hypot(along - off[0], s - rad - 2 * scale - abs(off[1]))
            wall = np.where(q < rad, hu, wall)
        else:
            wall = tissue_hu + 10 + 4 * tex
        alpha = _sigmoid(s / (0.4 * scale))
        bg = bg * (1 - alpha) + wall * alpha
    return bg, lung


# ----------------------------------------------------------------------------- lesion


_Geometry = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _lesion(
    lesion: LesionClass, prng: np.random.Generator, irng: np.random.Generator, size: int, scale: float
) -> tuple[np.ndarray, float, _Geometry]:
    """Patient/image draws for the lesion geometry; returns (centre, extent, fn) with fn(yy, xx) -> (sd, t, phi)."""
    c = (size - 1) / 2.0
    centre_p = c + prng.uniform(-3, 3, 2) * scale
    r = prng.uniform(6, 14) * scale
    theta = prng.uniform(0, 2 * np.pi)
    ratio = prng.uniform(0.5, 0.7)
    base = _harmonics(prng, range(2, 4), 0.025)
    n_lobes, lobe_amp = int(prng.integers(3, 6)), prng.uniform(0.3, 0.45)
    lobe_phase, lobe_var = prng.uniform(0, 2 * np.pi), _harmonics(prng, range(1, 3), 0.15)
    rough = [(k, a / k, p) for k, a, p in _harmonics(prng, range(2, 17), 0.3)]  # 1/f radius noise
    n_spikes = int(prng.integers(6, 15))
    spike_angles = np.linspace(0, 2 * np.pi, n_spikes, endpoint=False) + prng.uniform(0, 2 * np.pi)
    spike_angles += prng.normal(0, 0.15, n_spikes)
    spike_len = prng.uniform(0.5, 1.1, n_spikes)
    spike_w = prng.uniform(0.7, 1.2) * scale * (1.5 if lesion.margin == "ill-defined" else 1.0)
    # image-level
    centre = centre_p + irng.normal(0, 0.7 * scale, 2)
    r *= irng.uniform(0.9, 1.08)
    theta += irng.normal(0, 0.1)
    spike_len = spike_len * irng.uniform(0.8, 1.1, n_spikes)
    shape = lesion.shape
    extent = r * 1.9 + 2 * scale if shape == "spiculated" else r * (1.5 if shape == "oval" else 1.3)

    def geometry(yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dy, dx = yy - centre[0], xx - centre[1]
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        if shape == "oval":
            a, b = r / np.sqrt(ratio), r * np.sqrt(ratio)
            q = np.hypot(u / a, v / b)
            grad = np.hypot(u / a**2, v / b**2) / np.maximum(q, 1e-6)
            return (q - 1) / np.maximum(grad, 1e-6), q, phi
        if shape == "round":
            radius = r * (1 + _eval_harmonics(phi, base))
        elif shape == "lobulated":
            lobes = np.abs(np.cos(n_lobes * phi / 2 + lobe_phase)) ** 0.8
            radius = r * (1 + lobe_amp * (1 + _eval_harmonics(phi, lobe_var)) * (lobes - 0.65))
        elif shape == "irregular":
            radius = r * (1 + _eval_harmonics(phi, rough))
        else:  # spiculated: a core plus thin radial spikes
            radius = 0.72 * r * (1 + _eval_harmonics(phi, base))
            sd = rho - radius
            for ang, length in zip(spike_angles, spike_len):
                direction = np.array([np.sin(ang), np.cos(ang)])
                d, t = _segment_distance(v, u, 0.5 * r * direction, ((0.72 + length) * r + 2 * scale) * direction)
                sd = np.minimum(sd, d - (spike_w * (1 - t) + 0.2 * scale * t))
            return sd, rho / radius, phi
        return rho - radius, rho / radius, phi

    return centre, extent, geometry


def _density_map(density: str, prng: np.random.Generator, t: np.ndarray, depth: np.ndarray, phi: np.ndarray,
                 tex: np.ndarray, bg: np.ndarray, lung: float, scale: float) -> np.ndarray:
    """Internal HU pattern; t is 0 at the centre and 1 at the edge, depth is px inside the edge."""
    soft = prng.uniform(25, 65)
    if density == "solid":
        return soft + prng.uniform(8, 20) * tex
    if density in ("ground-glass", "part-solid"):
        gg = prng.uniform(-620, -380) + prng.uniform(30, 60) * tex + 0.5 * (bg - lung)
        if density == "ground-glass":
            return gg
        core_r, core_off = prng.uniform(0.3, 0.55), prng.uniform(-0.2, 0.2, 2)
        tc = np.hypot(t * np.cos(phi) - core_off[0], t * np.sin(phi) - core_off[1])
        w = _sigmoid((core_r - tc) / 0.05)
        return gg * (1 - w) + (soft + 10 * tex) * w
    if density == "cystic":
        wall = _sigmoid((prng.uniform(0.8, 1.6) * scale - depth) / (0.3 * scale))
        return prng.uniform(-5, 15) + 2 * tex + (soft - 5) * wall
    if density == "fat":
        capsule = 0.5 * _sigmoid((0.8 * scale - depth) / (0.3 * scale))
        fat = prng.uniform(-120, -80) + 5 * tex
        return fat + capsule * (soft - fat)
    if density == "calcified":
        out = soft + 10 * tex
        calc_hu = prng.uniform(300, 800)
        if prng.random() < 0.5:  # central calcification
            w = _sigmoid((prng.uniform(0.3, 0.5) - t) / 0.05)
        else:  # popcorn: several small blobs
            w = np.zeros_like(t)
            x, y = t * np.cos(phi), t * np.sin(phi)
            for _ in range(int(prng.integers(3, 7))):
                cr, ca, br = prng.uniform(0, 0.5), prng.uniform(0, 2 * np.pi), prng.uniform(0.14, 0.26)
                w = np.maximum(w, _sigmoid((br - np.hypot(x - cr * np.cos(ca), y - cr * np.sin(ca))) / 0.03))
        return out + w * (calc_hu - out)
    if density == "cavitary":
        inner = (1 - prng.uniform(0.3, 0.55)) * (1 + _eval_harmonics(phi, _harmonics(prng, range(2, 7), 0.06)))
        w = _sigmoid((inner - t) / 0.05)
        return (soft + 10 * tex) * (1 - w) + (prng.uniform(-1000, -960) + 5 * tex) * w
    # rim-enhancing: bright rim, darker (necrotic) centre
    w = _sigmoid((t - 1 + prng.uniform(0.2, 0.35)) / 0.07)
    return prng.uniform(5, 30) + 10 * tex + w * prng.uniform(100, 150)


def render_slice_with_mask(lesion: LesionClass, patient_rng: np.random.Generator, image_rng: np.random.Generator,
                           size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_slice`, also returning the boolean lesion mask (before blur)."""
    scale = size / 64.0
    centre, extent, geometry = _lesion(lesion, patient_rng, image_rng, size, scale)
    bg, lung = _background(patient_rng, image_rng, size, scale, centre, extent)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sd, t, phi = geometry(yy, xx)
    tex = 0.8 * _smooth_noise(patient_rng, size, 1.2 * scale) + 0.6 * _smooth_noise(image_rng, size, 1.2 * scale)
    inside = _density_map(lesion.density, patient_rng, t, -sd, phi, tex, bg, lung, scale)

    feather, halo_w = patient_rng.uniform(1.0, 2.0) * scale, patient_rng.uniform(2.5, 4.5) * scale
    halo_amp, halo_hu = patient_rng.uniform(0.25, 0.45), patient_rng.uniform(-650, -450)
    alpha = np.clip(0.5 - sd / (0.8 * scale), 0.0, 1.0)
    img = bg
    if lesion.margin == "ill-defined":  # feathered, patchy edge with a ground-glass halo
        fuzz = _smooth_noise(image_rng, size, 2.0 * scale)
        alpha = _blur(np.clip(0.5 - (sd + 0.7 * scale * fuzz) / (0.8 * scale), 0.0, 1.0), feather)
        halo = halo_amp * np.clip(2 * _blur(alpha, halo_w), 0, 1) * np.clip(0.6 + 0.4 * fuzz, 0, 1)
        img = bg + halo * np.maximum(halo_hu - bg, 0)
    img = img * (1 - alpha) + inside * alpha

    # CT reconstruction: blur, correlated noise, per-patient calibration
    img = _blur(img, patient_rng.uniform(0.5, 0.9) * scale)
    sigma, gain, offset = patient_rng.uniform(10, 40), patient_rng.uniform(0.97, 1.03), patient_rng.normal(0, 8)
    noise = _blur(image_rng.standard_normal((size, size)), 0.6 * scale)
    img = img + sigma * noise / (noise.std() + 1e-8)
    img = -1000 + (img + 1000) * gain + offset
    return np.clip(img, HU_MIN, HU_MAX).astype(np.float32), sd < 0


def render_slice(lesion: LesionClass, patient_rng: np.random.Generator, image_rng: np.random.Generator,
                 size: int = 64) -> np.ndarray:
    """Render one 2D CT-like slice containing one lesion of the given class.

    Args:
        lesion: the lesion class.
        patient_rng: fresh generator for the patient (same seed for every image of a patient).
        image_rng: generator for the per-image variation.
        size: side length in pixels (appearance scales with it; 64 is the reference).

    Returns:
        float32 array ``[size, size]`` in Hounsfield units, clipped to [-1024, 3071].
    """
    return render_slice_with_mask(lesion, patient_rng, image_rng, size)[0]


# ----------------------------------------------------------------------------- DICOM output

_UID_ROOT = "medmeta-synthetic-v1"
_FIXED_DATE, _FIXED_TIME = "20000101", "120000"


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)  # DS strings are limited to 16 characters


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_UID_ROOT, *map(str, parts)]))


def _write_dicom(path: Path, hu: np.ndarray, *, uid_key: tuple, patient_idx: int, class_idx: int,
                 image_idx: int, spacing: float, slice_thickness: float = 1.0) -> None:
    """Write one HU image as a CT Image Storage DICOM file (explicit VR little endian)."""
    rows, cols = hu.shape
    patient_key = (*uid_key, class_idx, patient_idx)
    sop_uid = _uid("image", *patient_key, image_idx)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    z = image_idx * slice_thickness
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in {
        "SpecificCharacterSet": "ISO_IR 100", "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "SOPClassUID": CTImageStorage, "SOPInstanceUID": sop_uid,
        "StudyDate": _FIXED_DATE, "SeriesDate": _FIXED_DATE, "ContentDate": _FIXED_DATE,
        "StudyTime": _FIXED_TIME, "SeriesTime": _FIXED_TIME, "ContentTime": _FIXED_TIME,
        "AccessionNumber": "", "Modality": "CT", "Manufacturer": "medmeta synthetic", "ReferringPhysicianName": "",
        "PatientName": f"Synthetic^Patient{class_idx:03d}{patient_idx:03d}",
        "PatientID": f"SYNTH-{class_idx:03d}-{patient_idx:03d}", "PatientBirthDate": "", "PatientSex": "O",
        "StudyInstanceUID": _uid("study", *patient_key), "SeriesInstanceUID": _uid("series", *patient_key),
        "FrameOfReferenceUID": _uid("frame", *patient_key), "StudyID": f"{class_idx:03d}{patient_idx:03d}",
        "SeriesNumber": 1, "InstanceNumber": image_idx + 1, "PositionReferenceIndicator": "",
        "SliceThickness": _ds(slice_thickness), "SliceLocation": _ds(z),
        "ImagePositionPatient": [_ds(-(cols - 1) * spacing / 2), _ds(-(rows - 1) * spacing / 2), _ds(z)],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "PixelSpacing": [_ds(spacing), _ds(spacing)],
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "Rows": rows, "Columns": cols,
        "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
        "RescaleIntercept": RESCALE_INTERCEPT, "RescaleSlope": 1, "RescaleType": "HU",
        "WindowCenter": -600, "WindowWidth": 1500, "BurnedInAnnotation": "NO",
    }.items():
        setattr(ds, keyword, value)
    stored = np.clip(np.round(hu.astype(np.float64)) - RESCALE_INTERCEPT, -32768, 32767).astype("<i2")
    ds.add_new(0x7FE00010, "OW", stored.tobytes())
    ds.save_as(path, enforce_file_format=True)


def generate_synthetic_dataset(out_dir: str | Path, *, n_classes: int = 30, patients_per_class: int = 8,
                               images_per_patient: int = 3, image_size: int = 64, pixel_spacing_mm: float = 0.7,
                               seed: int = 0) -> Path:
    """Write ``root/<class.name>/patient<PPP>_<KK>.dcm`` plus ``root/dataset.json``; return the root.

    The data set is written to a temporary sibling folder and moved into place at
    the end, so an interrupted run never leaves a partial data set. Everything
    (pixels, UIDs, dates) is deterministic in the arguments.

    Raises:
        FileExistsError: if ``out_dir`` exists and is not an empty directory.
        ValueError: on invalid arguments.
    """
    out_dir = Path(out_dir)
    classes = lesion_classes(n_classes)
    if patients_per_class < 1 or images_per_patient < 1 or image_size < 16 or pixel_spacing_mm <= 0 or seed < 0:
        raise ValueError("need patients_per_class, images_per_patient >= 1, image_size >= 16, spacing > 0, seed >= 0")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    uid_key = (seed, image_size, pixel_spacing_mm, images_per_patient)
    logger.info("generating %d classes x %d patients x %d images (%dpx) into %s",
                n_classes, patients_per_class, images_per_patient, image_size, out_dir)
    try:
        tmp.mkdir()
        for ci, cls in enumerate(classes):
            (tmp / cls.name).mkdir()
            for p in range(patients_per_class):
                for k in range(images_per_patient):
                    hu = render_slice(cls, *image_rngs(seed, ci, p, k), size=image_size)
                    _write_dicom(tmp / cls.name / f"patient{p:03d}_{k:02d}.dcm", hu, uid_key=uid_key,
                                 patient_idx=p, class_idx=ci, image_idx=k, spacing=pixel_spacing_mm)
        meta = {
            "generator": __name__, "version": 1, "seed": seed, "n_classes": n_classes,
            "patients_per_class": patients_per_class, "images_per_patient": images_per_patient,
            "image_size": image_size, "pixel_spacing_mm": pixel_spacing_mm,
            "classes": [{"index": i, "name": c.name, "shape": c.shape, "margin": c.margin, "density": c.density}
                        for i, c in enumerate(classes)],
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d DICOM files to %s", n_classes * patients_per_class * images_per_patient, out_dir)
    return out_dir
