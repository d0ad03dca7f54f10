"""Per-modality acquisition faults for the phantom, and per-case anatomical variation.

A fault changes one modality of one case in one region and leaves the other modalities, which still
carry the same tissue information, untouched: a fusion that knows which modality to trust where can
win. Kinds (strengths chosen to be clearly visible, as in a scan a radiologist would flag but still
report on):

``ghosting``         motion ghosts: in a slab of slices (motion while they were acquired, 2D multi-slice),
                     copies of the image shifted by a large part of the field of view along the phase
                     axis at 25–50 % intensity are added
``void``             susceptibility-like signal loss: an ellipsoid (radii 12–25 mm) near the brain surface
                     where the signal drops by 80–100 % with a soft edge
``low_snr``          coil-sensitivity fall-off: in an ellipsoidal region (radii 20–40 mm) noise grows to
                     30–60 % of the mean brain signal
``misregistration``  the whole modality moved by 1.5–3 voxels (a random direction): a fault wherever the
                     noise-free content moved by more than 8 % of the mean brain signal
``coverage``         partial coverage: a slab (15–30 % of the brain's extent along a random axis) is missing
                     (zeros, as after registration to an atlas grid)
``drift``            intensity drift: a multiplicative ramp along a random axis from a plane 30–60 % into the
                     brain to a gain of 0.35–0.6 or 1.6–2.0 at its far edge

The fault map of a case is exact: a voxel is in the map of modality m exactly when the faulted image
differs from the clean image of the same case (same seed, no faults) — the fault draws use their own
random stream, so the clean draws are the same with and without faults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FAULT_KINDS: tuple[str, ...] = ("ghosting", "void", "low_snr", "misregistration", "coverage", "drift")
FAULT_CODES: dict[str, int] = {kind: code for code, kind in enumerate(FAULT_KINDS, start=1)}  # 0 = no fault
MISREGISTRATION_THRESHOLD = 0.08  # of the mean brain signal: where a shift counts as a fault
# random streams of a case beside the clean one: [*seed, tag]
FAULT_STREAM, ANATOMY_STREAM = 0xFA17, 0xA7A7


@dataclass
class Fault:
    """One fault of one modality: ``kind``, its drawn ``params`` (JSON-serialisable) and ``region``
    ``bool [X, Y, Z]`` — the voxels whose image it changed."""

    modality: str
    kind: str
    params: dict
    region: np.ndarray


def parse_fault_kinds(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"all"`` / None → every kind; ``"void,drift"`` or a list → those kinds (checked)."""
    if text is None or text == "all" or text == ["all"]:
        return FAULT_KINDS
    items = [k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    unknown = [k for k in items if k not in FAULT_KINDS]
    if unknown or not items:
        raise ValueError(
            f"fault kinds must be 'all' or a comma-separated subset of {', '.join(FAULT_KINDS)}; got {text!r}"
        )
    return tuple(dict.fromkeys(items))


def stream(seed: int | Sequence[int], tag: int) -> np.random.Generator:
    """A random generator of its own for ``seed`` (an int or a sequence of ints) and ``tag``."""
    entropy = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    return np.random.default_rng([*entropy, tag])


def draw_faulted_modalities(
    rng: np.random.Generator, modalities: Sequence[str], kinds: Sequence[str], rate: float, max_faulted: int
) -> list[tuple[str, str]]:
    """Each modality is faulted with probability ``rate`` (a uniformly drawn kind), at most
    ``max_faulted`` per case (so the others still carry the tissue information)."""
    chosen = [(m, kinds[int(rng.integers(len(kinds)))]) for m in modalities if rng.random() < rate]
    if len(chosen) > max_faulted:
        keep = sorted(rng.choice(len(chosen), size=max_faulted, replace=False).tolist())
        chosen = [chosen[i] for i in keep]
    return chosen


# ------------------------------------------------------------------------------------ geometry helpers
def _grid_mm(shape: tuple[int, ...], voxel_mm: float) -> np.ndarray:
    return np.stack(np.meshgrid(*(np.arange(n) * voxel_mm for n in shape), indexing="ij"), axis=-1)


def _ellipsoid_radius(shape, voxel_mm, centre_vox, radii_mm) -> np.ndarray:
    """Normalised ellipsoid radius ``[X, Y, Z]`` (1 on the surface), axis-aligned."""
    offset = _grid_mm(shape, voxel_mm) - np.asarray(centre_vox) * voxel_mm
    return np.linalg.norm(offset / np.asarray(radii_mm), axis=-1)


def _brain_extent(brain: np.ndarray, axis: int) -> tuple[int, int]:
    occupied = np.flatnonzero(brain.any(axis=tuple(a for a in range(brain.ndim) if a != axis)))
    return int(occupied[0]), int(occupied[-1])


def _random_brain_voxel(
    brain: np.ndarray, rng: np.random.Generator, depth_mm: np.ndarray | None = None, max_depth_mm: float | None = None
) -> np.ndarray:
    candidates = np.argwhere(brain if max_depth_mm is None else brain & (depth_mm <= max_depth_mm))
    if len(candidates) == 0:
        candidates = np.argwhere(brain)
    return candidates[int(rng.integers(len(candidates)))].astype(float)


def rician(signal: np.ndarray, sigma: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    return np.hypot(signal + rng.normal(0.0, 1.0, signal.shape) * sigma, rng.normal(0.0, 1.0, signal.shape) * sigma)


# ------------------------------------------------------------------------------------------ faults
def apply_fault(
    kind: str,
    clean: np.ndarray,
    signal: np.ndarray,
    sigma: float,
    brain: np.ndarray,
    voxel_mm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict]:
    """The faulted image ``float32 [X, Y, Z]`` of one modality (still 0 outside ``brain``) and the drawn
    parameters. ``clean``: the clean image; ``signal``: its noise-free signal; ``sigma``: its noise σ."""
    shape = clean.shape
    mean = float(signal[brain].mean())
    depth = ndimage.distance_transform_edt(brain, sampling=voxel_mm)
    if kind == "ghosting":
        phase_axis, slice_axis = (int(a) for a in rng.choice(3, size=2, replace=False))
        low, high = _brain_extent(brain, slice_axis)
        thickness = max(2, int(round((high - low + 1) * rng.uniform(0.25, 0.5))))
        start = int(rng.integers(low, max(low + 1, high - thickness + 2)))
        shift = int(round(shape[phase_axis] * rng.uniform(0.2, 0.35)))
        strength = float(rng.uniform(0.25, 0.5))
        ghost = strength * 0.5 * (np.roll(signal, shift, axis=phase_axis) + np.roll(signal, -shift, axis=phase_axis))
        slab = np.zeros(shape, bool)
        index = [slice(None)] * 3
        index[slice_axis] = slice(start, start + thickness)
        slab[tuple(index)] = True
        faulted = np.where(slab & (ghost > 0.03 * mean), clean + ghost, clean)
        params = dict(
            phase_axis=phase_axis,
            slice_axis=slice_axis,
            slab=[start, start + thickness],
            shift=shift,
            strength=strength,
        )
    elif kind == "void":
        centre = _random_brain_voxel(brain, rng, depth, max_depth_mm=20.0)
        radii = rng.uniform(12.0, 25.0, size=3)
        loss = float(rng.uniform(0.8, 1.0))
        r = _ellipsoid_radius(shape, voxel_mm, centre, radii)
        multiplier = 1.0 - loss * np.clip(3.0 * (1.0 - r), 0.0, 1.0)  # flat bottom, soft edge, exactly 1 for r >= 1
        inside = r < 1.0
        faulted = np.where(inside, rician(signal * multiplier, sigma, rng), clean)
        params = dict(centre_voxel=centre.tolist(), radii_mm=radii.tolist(), loss=loss)
    elif kind == "low_snr":
        centre = _random_brain_voxel(brain, rng)
        radii = rng.uniform(20.0, 40.0, size=3)
        level = float(rng.uniform(0.3, 0.6))
        r = _ellipsoid_radius(shape, voxel_mm, centre, radii)
        extra = level * mean * np.clip(1.0 - r**2, 0.0, 1.0)
        inside = r < 1.0
        faulted = np.where(inside, rician(signal, np.sqrt(sigma**2 + extra**2), rng), clean)
        params = dict(centre_voxel=centre.tolist(), radii_mm=radii.tolist(), noise_fraction=level)
    elif kind == "misregistration":
        direction = rng.standard_normal(3)
        offset = direction / np.linalg.norm(direction) * rng.uniform(1.5, 3.0)
        moved = ndimage.shift(signal, offset, order=1, mode="constant", cval=0.0)
        moved_clean = ndimage.shift(clean, offset, order=1, mode="constant", cval=0.0)
        changed = np.abs(moved - signal) > MISREGISTRATION_THRESHOLD * mean
        faulted = np.where(changed, moved_clean, clean)
        params = dict(shift_voxels=offset.tolist())
    elif kind == "coverage":
        axis = int(rng.integers(3))
        low, high = _brain_extent(brain, axis)
        thickness = max(2, int(round((high - low + 1) * rng.uniform(0.15, 0.3))))
        # at an end of the field of view (a slab the acquisition did not reach) or inside it (a gap)
        start = int(rng.integers(low, max(low + 1, high - thickness + 2)))
        slab = np.zeros(shape, bool)
        index = [slice(None)] * 3
        index[axis] = slice(start, start + thickness)
        slab[tuple(index)] = True
        faulted = np.where(slab, 0.0, clean)
        params = dict(axis=axis, slab=[start, start + thickness])
    elif kind == "drift":
        axis = int(rng.integers(3))
        low, high = _brain_extent(brain, axis)
        plane = float(rng.uniform(low + 0.3 * (high - low), low + 0.6 * (high - low)))
        gain = float(rng.uniform(0.35, 0.6) if rng.random() < 0.5 else rng.uniform(1.6, 2.0))
        reverse = bool(rng.random() < 0.5)  # the ramp runs towards the low end instead
        position = np.arange(shape[axis], dtype=float)
        if reverse:
            position = (low + high) - position
        ramp = np.clip((position - plane) / max(high - plane, 1.0), 0.0, 1.0)
        multiplier = 1.0 + (gain - 1.0) * ramp
        multiplier = np.expand_dims(multiplier, tuple(a for a in range(3) if a != axis))
        faulted = np.where(np.abs(multiplier - 1.0) > 0.05, clean * multiplier, clean)
        params = dict(axis=axis, plane=plane, gain=gain, reverse=reverse)
    else:
        raise ValueError(f"unknown fault kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
    return np.where(brain, faulted, 0.0).astype(np.float32), params


# ---------------------------------------------------------------------------------- anatomy variation
def deform_fields(
    fields: dict[str, np.ndarray],
    voxel_mm: float,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.86, 0.98),
    displacement_mm: float = 3.0,
    correlation_mm: float = 20.0,
) -> tuple[dict[str, np.ndarray], dict]:
    """A per-case anatomy: every ``[X, Y, Z]`` field resampled (trilinear) through the same random
    scaling (per axis, about the brain's centre) and smooth displacement (std ``displacement_mm``,
    correlation length ``correlation_mm``). Scales below 1 keep the brain inside the grid."""
    shape = next(iter(fields.values())).shape
    scale = rng.uniform(*scale_range, size=3)
    brain = sum(fields.values()) > 0.5
    centre = np.argwhere(brain).mean(axis=0)
    displacement = []
    for _ in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=correlation_mm / voxel_mm)
        displacement.append(noise / max(float(noise.std()), 1e-9) * displacement_mm / voxel_mm)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    source = [centre[a] + (grid[a] - centre[a]) / scale[a] + displacement[a] for a in range(3)]
    warped = {
        name: np.clip(ndimage.map_coordinates(f, source, order=1, mode="constant", cval=0.0), 0, 1).astype(np.float32)
        for name, f in fields.items()
    }
    return warped, dict(scale=scale.tolist(), displacement_mm=displacement_mm, correlation_mm=correlation_mm)
