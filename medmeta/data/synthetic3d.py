"""3D mode of the synthetic CT lesion data set, written as real NIfTI volumes.

Why this module is longer than 300 lines: one generator whose 3D shapes, densities and background are
drawn from one seeded stream, so they stay together.

The lesion classes are those of :mod:`medmeta.data.synthetic` (shape x margin x
density), rendered as one 3D lesion in a cube of lung: round -> sphere, oval ->
ellipsoid with a random orientation, lobulated -> radius modulated by smooth
low-order angular harmonics, spiculated -> core plus thin radial spikes, irregular ->
radius with higher-frequency angular noise. The density patterns use the same HU
values as the 2D generator. The background is lung parenchyma with smoothed texture,
branching vessel tubes and, for some patients, a chest-wall or soft-tissue slab from
one side. Size, position, orientation, contrast and noise vary per patient, and
slightly per volume (like repeated scans of one patient).

Volumes are indexed ``[x, y, z]`` (NIfTI voxel order, RAS affine), so ``vol[:, :, k]``
is an axial slice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from medmeta.data.synthetic import HU_MAX, HU_MIN, LesionClass, _density_map, _sigmoid, image_rngs, lesion_classes

logger = logging.getLogger(__name__)

NIFTI_DESCRIP = "medmeta synthetic lesion"

# ----------------------------------------------------------------------------- numpy helpers


def _blur3(vol: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur along every axis (reflected borders), any number of dimensions."""
    if sigma < 0.2:
        return vol.copy()
    radius = min(int(np.ceil(3.0 * sigma)), min(vol.shape) - 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = vol
    for axis in range(vol.ndim):
        front = np.moveaxis(out, axis, 0)
        length = front.shape[0]
        padded = np.pad(front, [(radius, radius)] + [(0, 0)] * (vol.ndim - 1), mode="reflect")
        acc = taps[radius] * front
        for j in range(radius):  # symmetric kernel: pair the taps
            acc += taps[j] * (padded[j : j + length] + padded[2 * radius - j : 2 * radius - j + length])
        out = np.ascontiguousarray(np.moveaxis(acc, 0, axis))
    return out


def _noise3(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smoothed Gaussian noise volume with unit standard deviation."""
    field = _blur3(rng.standard_normal((size, size, size)), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


@lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """Voxel coordinates, shape ``(3, size, size, size)`` (read-only, cached)."""
    grid = np.indices((size, size, size), dtype=np.float64)
    grid.flags.writeable = False
    return grid


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _small_rotation(rng: np.random.Generator, angle_sd: float) -> np.ndarray:
    """Rotation by a N(0, angle_sd) angle about a random axis (Rodrigues)."""
    k = _unit(rng.standard_normal(3))
    angle = rng.normal(0.0, angle_sd)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly evenly spread unit vectors, shape ``(n, 3)``."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    ring = np.sqrt(1 - z**2)
    azimuth = np.pi * (1 + np.sqrt(5)) * i
    return np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=1)


_SphereField = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]
_PROBE_DIRS = _fibonacci_sphere(400)


def _sphere_field(rng: np.random.Generator, n: int, freq: tuple[float, float], decay: float = 0.0) -> _SphereField:
    """Draw a random smooth function on the unit sphere, with zero mean and unit std.

    It is a sum of ``n`` plane waves ``a cos(k d.w + p)`` restricted to the sphere; a wave
    of frequency k is dominated by spherical harmonics of degree ~k. Amplitudes ~ k^-decay.
    """
    dirs = np.array([_unit(v) for v in rng.standard_normal((n, 3))])
    k = rng.uniform(*freq, n)
    amp = rng.normal(0.0, 1.0, n) / k**decay
    phase = rng.uniform(0, 2 * np.pi, n)
    probe = (amp[:, None] * np.cos(k[:, None] * (dirs @ _PROBE_DIRS.T) + phase[:, None])).sum(0)
    std = probe.std() + 1e-8
    return dirs, k, amp / std, phase, float(probe.mean() / std)


def _eval_sphere(field: _SphereField, d: np.ndarray) -> np.ndarray:
    """Evaluate a :func:`_sphere_field` at unit directions ``d`` of shape ``(3, ...)``."""
    dirs, k, amp, phase, mean = field
    out = np.full(d.shape[1:], -mean)
    for w, kk, a, p in zip(dirs, k, amp, phase):
        out += a * np.cos(kk * (w[0] * d[0] + w[1] * d[1] + w[2] * d[2]) + p)
    return out


def _segment_box(size: int, p0: np.ndarray, p1: np.ndarray, reach: float) -> tuple[slice, ...] | None:
    """Voxel box around segment p0-p1 widened by ``reach``; None if it misses the volume."""
    lo = np.maximum(np.floor(np.minimum(p0, p1) - reach), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(p0, p1) + reach) + 1, size).astype(int)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _segment_dist3(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points ``(3, ...)`` to the segment p0-p1 and the position t in [0, 1] along it."""
    seg = p1 - p0
    rel = [points[i] - p0[i] for i in range(3)]
    t = np.clip((rel[0] * seg[0] + rel[1] * seg[1] + rel[2] * seg[2]) / max(float(seg @ seg), 1e-8), 0.0, 1.0)
    dist = np.sqrt(sum((rel[i] - t * seg[i]) ** 2 for i in range(3)))
    return dist, t


# ----------------------------------------------------------------------------- background


_Tube = tuple[np.ndarray, np.ndarray, float, float]


def _vessel_tubes(rng: np.random.Generator, size: int, scale: float) -> list[_Tube]:
    """Curved, branching vessel trees crossing the volume as (p0, p1, radius0, radius1) tubes."""
    tubes: list[_Tube] = []
    for _ in range(int(rng.integers(6, 12))):
        heading = _unit(rng.standard_normal(3))
        start = rng.uniform(0.2, 0.8, 3) * size - heading * rng.uniform(0.3, 0.6) * size  # passes through
        stack = [(start, heading, rng.uniform(1.0, 2.4) * scale, 0)]
        while stack and len(tubes) < 96:
            pos, heading, width, depth = stack.pop()
            bend = rng.normal(0.0, 0.15, 3)
            for _ in range(int(rng.integers(4, 9))):
                heading = _unit(heading + bend + rng.normal(0.0, 0.15, 3))
                end = pos + rng.uniform(4, 8) * scale * heading
                new_width = max(0.6 * scale, width * rng.uniform(0.88, 0.98))
                tubes.append((pos, end, width, new_width))
                if depth < 2 and rng.random() < 0.2:
                    branch = _unit(heading + rng.normal(0.0, 0.8, 3))
                    stack.append((end, branch, new_width * 0.7, depth + 1))
                pos, width = end, new_width
    return tubes


def _background3(prng: np.random.Generator, irng: np.random.Generator, size: int, scale: float,
                 centre: np.ndarray, extent: float) -> tuple[np.ndarray, float]:
    """Lung volume with vessels and maybe a chest-wall / soft-tissue slab; returns (HU, lung level)."""
    # patient-level draws (fixed count and order)
    lung = prng.uniform(-880, -800)
    grad = prng.normal(0, 15, 3)
    tex_amp, tex_sigma = prng.uniform(8, 28), prng.uniform(1.2, 3.0) * scale
    tex_patient = _noise3(prng, size, tex_sigma)
    tubes = _vessel_tubes(prng, size, scale)
    vessel_hu = prng.uniform(-20, 60)
    kind = prng.choice(["none", "chest_wall", "soft_tissue"], p=[0.35, 0.45, 0.2])
    azimuth = prng.integers(0, 4) * np.pi / 2 + prng.normal(0, 0.35)
    normal = _unit(np.array([np.cos(azimuth), np.sin(azimuth), prng.normal(0, 0.2)]))
    tangent = _unit(np.cross(normal, [0.0, 0.0, 1.0]))  # along the wall, in the axial plane
    binormal = np.cross(normal, tangent)
    nearest = min(extent + 3 * scale, 0.42 * size)  # the wall stays clear of the lesion
    dist = prng.uniform(nearest, max(nearest, 0.5 * size - 4 * scale))
    curvature = prng.uniform(-0.012, 0.012) / scale
    wiggle = (prng.uniform(0.5, 2.5) * scale, prng.uniform(0.05, 0.2) / scale, prng.uniform(0, 2 * np.pi))
    fat_th = prng.uniform(1.0, 3.0) * scale
    fat_hu, tissue_hu = prng.uniform(-120, -80), prng.uniform(30, 65)
    fat_patches = _noise3(prng, size, 3.0 * scale)
    has_rib, rib_tilt, rib_off = prng.random() < 0.6, prng.normal(0, 0.4), prng.uniform(-6, 6) * scale
    rib_half, rib_depth = prng.uniform(4, 7) * scale, prng.uniform(2.5, 4) * scale
    # volume-level: a slight shift of the anatomy and partly new texture
    shift = irng.normal(0, 0.6 * scale, 3)
    tex = 0.8 * tex_patient + 0.6 * _noise3(irng, size, tex_sigma)

    pts = _grid(size)
    c = (size - 1) / 2.0
    bg = lung + tex_amp * tex + sum(grad[i] * (pts[i] - shift[i] - c) / size for i in range(3))
    vessel = np.zeros_like(bg)
    edge = 0.35 * scale
    for p0, p1, w0, w1 in tubes:
        box = _segment_box(size, p0 + shift, p1 + shift, max(w0, w1) + 8 * edge)
        if box is None:
            continue
        d, t = _segment_dist3(pts[(slice(None), *box)], p0 + shift, p1 + shift)
        vessel[box] = np.maximum(vessel[box], _sigmoid((w0 + (w1 - w0) * t - d) / edge))
    bg += vessel * (vessel_hu - bg)

    if kind != "none":
        rel = [pts[i] - shift[i] - centre[i] for i in range(3)]
        along = sum(rel[i] * tangent[i] for i in range(3))
        across = sum(rel[i] * binormal[i] for i in range(3))
        s = sum(rel[i] * normal[i] for i in range(3)) - dist - curvature * along**2
        s -= wiggle[0] * np.sin(wiggle[1] * (along + 0.5 * across) + wiggle[2])
        if kind == "chest_wall":  # fat layer, muscle, and maybe a rib running along the wall
            wall = np.where((s < fat_th) | (fat_patches > 1.0), fat_hu, tissue_hu + 8 * tex)
            if has_rib:
                rib_across = across * np.cos(rib_tilt) - along * np.sin(rib_tilt) - rib_off
                q = np.hypot(rib_across / rib_half, (s - fat_th - 1.5 * scale - rib_depth) / rib_depth)
                wall = np.where(q < 1.0, np.where(q > 0.75, 700.0, 250.0), wall)
        else:  # organ / mediastinal soft tissue
            wall = tissue_hu + 10 + 4 * tex
        inside_wall = _sigmoid(s / (0.4 * scale))
        bg += inside_wall * (wall - bg)
    return bg, lung


# ----------------------------------------------------------------------------- lesion

# geometry(points) -> (signed distance, normalised radius t, lesion-frame position scaled so the edge is ~1)
_Geometry3 = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _lesion3(lesion: LesionClass, prng: np.random.Generator, irng: np.random.Generator, size: int,
             scale: float) -> tuple[np.ndarray, float, _Geometry3]:
    """Patient/volume draws for the lesion geometry; returns (centre, extent, geometry)."""
    centre_p = (size - 1) / 2.0 + prng.uniform(-3, 3, 3) * scale
    r = prng.uniform(6, 14) * scale
    rot = _random_rotation(prng)
    ratio = prng.uniform(0.5, 0.7)
    axes = np.array([1 / np.sqrt(ratio), np.sqrt(ratio), prng.uniform(0.75, 1.15)])
    base = _sphere_field(prng, 4, (1.5, 2.5))
    lobe_field, lobe_amp = _sphere_field(prng, 6, (2.0, 3.2)), prng.uniform(0.35, 0.5)
    rough = _sphere_field(prng, 30, (2.0, 11.0), decay=1.0)  # ~1/f radius noise
    n_spikes = int(prng.integers(24, 40))  # radial in 3D: a slice through the centre cuts ~1/4 of them
    spike_dirs = _fibonacci_sphere(n_spikes) @ _random_rotation(prng).T + prng.normal(0, 0.15, (n_spikes, 3))
    spike_dirs /= np.linalg.norm(spike_dirs, axis=1, keepdims=True)
    spike_len = prng.uniform(0.5, 1.1, n_spikes)
    spike_w = prng.uniform(0.8, 1.3) * max(scale, 0.6) * (1.5 if lesion.margin == "ill-defined" else 1.0)
    # volume-level jitter
    centre = centre_p + irng.normal(0, 0.7 * scale, 3)
    r *= irng.uniform(0.9, 1.08)
    rot = rot @ _small_rotation(irng, 0.1)
    spike_len = spike_len * irng.uniform(0.8, 1.1, n_spikes)
    shape = lesion.shape
    extent = r * 1.9 + 2 * scale if shape == "spiculated" else r * (1.5 if shape == "oval" else 1.3)

    def geometry(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rel = [pts[i] - centre[i] for i in range(3)]
        u = np.stack([sum(rot[i, j] * rel[i] for i in range(3)) for j in range(3)])  # lesion frame: rot.T @ rel
        rho = np.sqrt((u**2).sum(0))
        d = u / np.maximum(rho, 1e-6)
        if shape == "oval":
            semi = r * axes
            q = np.sqrt(sum((u[j] / semi[j]) ** 2 for j in range(3)))
            grad = np.sqrt(sum((u[j] / semi[j] ** 2) ** 2 for j in range(3))) / np.maximum(q, 1e-6)
            return (q - 1) / np.maximum(grad, 1e-6), q, u / semi[:, None, None, None]
        if shape == "round":
            radius = r * (1 + 0.025 * _eval_sphere(base, d))
        elif shape == "lobulated":  # |low-order field|: lobes separated by notches along its zero set
            lobes = np.tanh(np.abs(_eval_sphere(lobe_field, d))) ** 0.8
            radius = r * (1 + lobe_amp * (lobes - 0.55))
        elif shape == "irregular":
            radius = r * (1 + 0.17 * _eval_sphere(rough, d))
        else:  # spiculated: a core plus thin radial spikes
            radius = 0.72 * r * (1 + 0.025 * _eval_sphere(base, d))
            sd = rho - radius
            for direction, length in zip(spike_dirs, spike_len):
                p0 = centre + rot @ (0.5 * r * direction)
                p1 = centre + rot @ (((0.72 + length) * r + 2 * scale) * direction)
                box = _segment_box(size, p0, p1, spike_w + 3 * scale + 1)
                if box is None:
                    continue
                dist, t = _segment_dist3(pts[(slice(None), *box)], p0, p1)
                sd[box] = np.minimum(sd[box], dist - (spike_w * (1 - t) + 0.25 * max(scale, 0.6) * t))
            return sd, rho / radius, u / radius
        return rho - radius, rho / radius, u / radius

    return centre, extent, geometry


def _density3(density: str, prng: np.random.Generator, pos: np.ndarray, t: np.ndarray, depth: np.ndarray,
              tex: np.ndarray, bg: np.ndarray, lung: float, scale: float) -> np.ndarray:
    """Internal HU pattern; the 2D patterns that depend on t and depth only are reused as they are,
    the ones with a spatial layout (part-solid core, popcorn calcification, cavity) are built in 3D."""
    if density not in ("part-solid", "calcified", "cavitary"):
        return _density_map(density, prng, t, depth, t, tex, bg, lung, scale)  # phi unused by these
    outer = _density_map("ground-glass" if density == "part-solid" else "solid", prng, t, depth, t, tex, bg, lung,
                         scale)
    soft = prng.uniform(25, 65) + 10 * tex
    if density == "part-solid":  # solid core, off-centre, in ground glass
        core_r, core_off = prng.uniform(0.3, 0.55), prng.uniform(-0.2, 0.2, 3)
        w = _sigmoid((core_r - np.sqrt(sum((pos[i] - core_off[i]) ** 2 for i in range(3)))) / 0.05)
        return outer * (1 - w) + soft * w
    if density == "calcified":
        calc_hu, central = prng.uniform(300, 800), prng.random() < 0.5
        if central:
            w = _sigmoid((prng.uniform(0.3, 0.5) - t) / 0.05)
        else:  # popcorn: several small blobs
            blobs = [(prng.uniform(0, 0.5) * _unit(prng.standard_normal(3)), prng.uniform(0.18, 0.3))
                     for _ in range(int(prng.integers(3, 7)))]
            w = np.max([_sigmoid((br - np.sqrt(sum((pos[i] - b[i]) ** 2 for i in range(3)))) / 0.03)
                        for b, br in blobs], axis=0)
        return outer + w * (calc_hu - outer)
    # cavitary: air-filled cavity with an uneven wall
    d = pos / np.maximum(np.sqrt((pos**2).sum(0)), 1e-6)
    inner = (1 - prng.uniform(0.3, 0.55)) * (1 + 0.06 * _eval_sphere(_sphere_field(prng, 8, (2.0, 6.0)), d))
    w = _sigmoid((inner - t) / 0.05)
    return soft * (1 - w) + (prng.uniform(-1000, -960) + 5 * tex) * w


def render_volume_with_mask(lesion: LesionClass, patient_rng: np.random.Generator, image_rng: np.random.Generator,
                            size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_volume`, also returning the boolean lesion mask (before blur)."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    scale = size / 64.0
    centre, extent, geometry = _lesion3(lesion, patient_rng, image_rng, size, scale)
    bg, lung = _background3(patient_rng, image_rng, size, scale, centre, extent)
    sd, t, pos = geometry(_grid(size))
    tex = 0.8 * _noise3(patient_rng, size, 1.2 * scale) + 0.6 * _noise3(image_rng, size, 1.2 * scale)
    inside = _density3(lesion.density, patient_rng, pos, t, -sd, tex, bg, lung, scale)

    feather, halo_w = patient_rng.uniform(1.0, 2.0) * scale, patient_rng.uniform(2.5, 4.5) * scale
    halo_amp, halo_hu = patient_rng.uniform(0.25, 0.45), patient_rng.uniform(-650, -450)
    edge = 0.8 * scale
    vol = bg
    if lesion.margin == "sharp":
        alpha = np.clip(0.5 - sd / edge, 0.0, 1.0)
    else:  # feathered, patchy edge with a ground-glass halo
        fuzz = _noise3(image_rng, size, 2.0 * scale)
        alpha = _blur3(np.clip(0.5 - (sd + 0.7 * scale * fuzz) / edge, 0.0, 1.0), feather)
        halo = np.clip(2 * _blur3(alpha, halo_w), 0, 1) * np.clip(0.6 + 0.4 * fuzz, 0, 1) * halo_amp
        vol = bg + halo * np.maximum(halo_hu - bg, 0)
    vol = vol * (1 - alpha) + inside * alpha

    # CT reconstruction: blur, correlated noise, per-patient calibration
    vol = _blur3(vol, patient_rng.uniform(0.5, 0.9) * scale)
    sigma, gain, offset = patient_rng.uniform(10, 40), patient_rng.uniform(0.97, 1.03), patient_rng.normal(0, 8)
    noise = _blur3(image_rng.standard_normal(vol.shape), 0.6 * scale)
    vol += sigma * noise / (noise.std() + 1e-8)
    vol = -1000 + (vol + 1000) * gain + offset
    return np.clip(vol, HU_MIN, HU_MAX).astype(np.float32), sd < 0


def render_volume(lesion: LesionClass, patient_rng: np.random.Generator, image_rng: np.random.Generator,
                  size: int = 32) -> np.ndarray:
    """Render one CT-like volume containing one 3D lesion of the given class.

    Args:
        lesion: the lesion class.
        patient_rng: fresh generator for the patient (same seed for every volume of a patient).
        image_rng: generator for the per-volume variation.
        size: side length in voxels (appearance scales with it; 64 is the reference scale).

    Returns:
        float32 array ``[size, size, size]`` indexed ``[x, y, z]``, in Hounsfield units clipped to [-1024, 3071].
    """
    return render_volume_with_mask(lesion, patient_rng, image_rng, size)[0]


# ----------------------------------------------------------------------------- NIfTI output


def volume_affine(size: int, spacing_mm: float) -> np.ndarray:
    """RAS affine of a generated volume: isotropic ``spacing_mm`` voxels, centred on the origin."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -(size - 1) * spacing_mm / 2.0
    return affine


def _save_nifti(path: Path, hu: np.ndarray, spacing_mm: float) -> None:
    """Write HU as int16 NIfTI-1 (.nii.gz) in mm units, with no identifiers in the header.

    The int16 values are the HU themselves: nibabel stores ``scl_slope = scl_inter = NaN``
    ("no scaling", read back as slope 1 / intercept 0 by nibabel and niftilib).
    """
    data = np.round(hu).astype(np.int16)  # hu is clipped to [-1024, 3071]
    affine = volume_affine(hu.shape[0], spacing_mm)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    header = img.header
    header.set_data_dtype(np.int16)
    header.set_xyzt_units(xyz="mm")
    header["descrip"] = NIFTI_DESCRIP.encode()
    header["cal_min"], header["cal_max"] = -1100.0, 400.0  # a lung display window
    nib.save(img, path)


@contextmanager
def _staged_output(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``target`` (absent or empty) on success.

    On any error the staging folder is removed and ``target`` is left as it was.
    """
    if target.exists() and (not target.is_dir() or next(target.iterdir(), None) is not None):
        raise FileExistsError(f"{target} already exists and is not an empty directory; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def generate_synthetic_volumes(out_dir: str | Path, *, n_classes: int = 30, patients_per_class: int = 6,
                               volumes_per_patient: int = 2, size: int = 32, spacing_mm: float = 1.0,
                               seed: int = 0) -> Path:
    """Write ``root/<class.name>/patient<PPP>/<KK>.nii.gz`` plus ``root/dataset.json``; return the root.

    Volumes are int16 HU (no scaling) with an RAS affine of ``spacing_mm``
    isotropic voxels. Everything is deterministic in the arguments; the data set is
    written to a temporary sibling folder and moved into place at the end, so an
    interrupted run never leaves a partial data set.

    Raises:
        FileExistsError: when ``out_dir`` is a file or a non-empty directory (nothing is touched).
        ValueError: on invalid arguments.
    """
    out_dir = Path(out_dir)
    classes = lesion_classes(n_classes)
    if patients_per_class < 1 or volumes_per_patient < 1 or size < 16 or not spacing_mm > 0 or seed < 0:
        raise ValueError("need patients_per_class, volumes_per_patient >= 1, size >= 16, spacing_mm > 0, seed >= 0")
    logger.info("generating %d classes x %d patients x %d volumes (%d^3) into %s",
                n_classes, patients_per_class, volumes_per_patient, size, out_dir)
    with _staged_output(out_dir) as staging:
        for ci, cls in enumerate(classes):
            (staging / cls.name).mkdir()
            for p in range(patients_per_class):
                # a folder per patient (NIfTI has no PatientID), named apart across classes: a folder name is a patient
                patient_dir = staging / cls.name / f"patient{ci * patients_per_class + p:04d}"
                patient_dir.mkdir()
                for k in range(volumes_per_patient):
                    hu = render_volume(cls, *image_rngs(seed, ci, p, k), size=size)
                    _save_nifti(patient_dir / f"{k:02d}.nii.gz", hu, spacing_mm)
        summary = {
            "generator": __name__, "version": 2, "format": "nifti", "seed": seed, "n_classes": n_classes,
            "patients_per_class": patients_per_class, "volumes_per_patient": volumes_per_patient,
            "size": size, "spacing_mm": spacing_mm, "units": "HU",
            "classes": [{"index": i, "name": c.name, "shape": c.shape, "margin": c.margin, "density": c.density}
                        for i, c in enumerate(classes)],
        }
        (staging / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("wrote %d NIfTI volumes to %s", n_classes * patients_per_class * volumes_per_patient, out_dir)
    return out_dir
