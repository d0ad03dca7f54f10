"""A BraTS-like four-contrast brain phantom built offline from real template anatomy.

Recipe:

1. *Anatomy* — the MNI ICBM152 2009a nonlinear template (Fonov et al., NeuroImage 54(1):313-327,
   2011; Fonov et al., NeuroImage 47:S102, 2009) as bundled with nilearn
   (``nilearn.datasets.load_mni152_template`` and its grey/white matter probability maps): brain =
   T1 > 0, grey and white matter from the probability maps, CSF = brain − GM − WM. Resampled (with
   anti-aliasing) to the requested voxel size, or fitted into a requested grid such as 64³. Cached:
   the same for every case.
2. *Tumour* — random per case: a centre in supratentorial white matter, noisy nested ellipsoids
   for the necrotic core, the enhancing rim and the edema (which reaches further into white
   matter). Tumour compartments replace the normal tissue where they lie; the sub-regions are those
   of the BraTS annotation protocol (Menze et al., IEEE TMI 34(10):1993-2024, 2015).
3. *Contrast* — each voxel's signal is the partial-volume sum over its compartments of the
   closed-form signal equations (Bernstein, King and Zhou, *Handbook of MRI Pulse Sequences*,
   Elsevier 2004): spin-echo T1 and T2, inversion-recovery FLAIR with the inversion time that nulls
   CSF, and T1ce with the enhancing rim's T1 shortened by gadolinium. CSF, grey and white matter
   take the 1.5 T relaxation times and proton densities of the BrainWeb phantom (Collins et al.,
   IEEE TMI 17(3):463-468, 1998; Kwan, Evans and Pike, IEEE TMI 18(11):1085-1097, 1999; the table
   the ``brainweb-dl`` package ships); the tumour values are chosen, not measured (see
   :data:`COMPARTMENTS`).
4. *Acquisition* — a smooth multiplicative bias field per contrast, Rician noise of magnitude
   images (Gudbjartsson and Patz, Magn. Reson. Med. 34(6):910-914, 1995; or Gaussian) inside the
   brain, an arbitrary scanner gain; the background stays 0 as in skull-stripped BraTS.

Everything random comes from one seed, so a case is reproducible. This is a physics-flavoured
phantom on real anatomy, not a clinical simulation.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..io import atomic_write_text
from .errors import DataError
from .faults import (
    ANATOMY_STREAM,
    FAULT_CODES,
    FAULT_KINDS,
    FAULT_STREAM,
    Fault,
    apply_fault,
    deform_fields,
    draw_faulted_modalities,
    stream,
)
from .labels import LabelConvention, get_convention
from .modalities import BRATS_NAMING, MODALITIES, MODALITY_DISPLAY_NAMES, brats_file_name
from .nifti import save_label_map, save_volume

# Geometry limits: below 24 voxels a tumour cannot hold three distinguishable layers; finer than the
# 1 mm template only interpolates; beyond 256 voxels per axis the phantom stops being cheap.
MIN_SHAPE, MAX_SHAPE = 24, 256
MIN_SPACING_MM, MAX_SPACING_MM = 1.0, 8.0
FIT_MARGIN_VOXELS = 1  # background voxels kept around the brain when it is fitted into a grid

# MNI z (mm) above which white matter counts as supratentorial: it keeps tumour centres out of the
# cerebellum and brainstem.
SUPRATENTORIAL_Z_MM = 0.0


@dataclass(frozen=True)
class Relaxation:
    """MR properties of one compartment: longitudinal and transverse relaxation times (ms) and
    relative proton density."""

    t1_ms: float
    t2_ms: float
    proton_density: float


# CSF/GM/WM: BrainWeb's 1.5 T values (Collins et al. 1998; the table brainweb-dl ships). Tumour values
# are invented, chosen so that edema is bright on T2 and FLAIR, necrosis is fluid-like, and the rim
# enhances with gadolinium.
COMPARTMENTS: dict[str, Relaxation] = {
    "csf": Relaxation(2569.0, 329.0, 1.00),
    "gm": Relaxation(833.0, 83.0, 0.86),
    "wm": Relaxation(500.0, 70.0, 0.77),
    "necrosis": Relaxation(2000.0, 300.0, 0.95),
    "edema": Relaxation(1150.0, 200.0, 0.92),
    "enhancing": Relaxation(750.0, 110.0, 0.88),
}
ENHANCING_T1_WITH_GADOLINIUM_MS = 250.0


@dataclass(frozen=True)
class SpinEcho:
    tr_ms: float
    te_ms: float

    def signal(self, tissue: Relaxation) -> float:
        return tissue.proton_density * (1 - math.exp(-self.tr_ms / tissue.t1_ms)) * math.exp(-self.te_ms / tissue.t2_ms)


@dataclass(frozen=True)
class InversionRecovery:
    """Magnitude inversion recovery; ``ti_ms`` nulls a tissue with T1 = T1_null when
    1 − 2·exp(−TI/T1_null) + exp(−TR/T1_null) = 0, i.e. TI ≈ ln2 · T1_null for TR ≫ T1_null."""

    tr_ms: float
    te_ms: float
    ti_ms: float

    @staticmethod
    def nulling(t1_null_ms: float, tr_ms: float, te_ms: float) -> InversionRecovery:
        return InversionRecovery(tr_ms, te_ms, t1_null_ms * math.log(2 / (1 + math.exp(-tr_ms / t1_null_ms))))

    def signal(self, tissue: Relaxation) -> float:
        recovery = 1 - 2 * math.exp(-self.ti_ms / tissue.t1_ms) + math.exp(-self.tr_ms / tissue.t1_ms)
        return tissue.proton_density * abs(recovery) * math.exp(-self.te_ms / tissue.t2_ms)


SEQUENCES = {
    "flair": InversionRecovery.nulling(COMPARTMENTS["csf"].t1_ms, tr_ms=9000.0, te_ms=100.0),
    "t1": SpinEcho(tr_ms=500.0, te_ms=15.0),
    "t1ce": SpinEcho(tr_ms=500.0, te_ms=15.0),
    "t2": SpinEcho(tr_ms=4000.0, te_ms=100.0),
}


@dataclass
class PhantomCase:
    """One phantom case on a ``[X, Y, Z]`` grid.

    ``images``: modality (``flair``, ``t1``, ``t1ce``, ``t2``) → ``float32 [X, Y, Z]``, 0 outside
    the brain. ``label``: ``uint8 [X, Y, Z]`` in ``label_convention``. ``affine``: voxel → RAS mm
    (4×4). ``fractions``: compartment (``csf``, ``gm``, ``wm``, ``necrosis``, ``edema``,
    ``enhancing``) → ``float32 [X, Y, Z]`` partial-volume fraction, the ground truth behind the
    contrasts. ``brain_mask``: ``bool [X, Y, Z]``.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    label_convention: LabelConvention
    fractions: dict[str, np.ndarray] = field(repr=False)
    brain_mask: np.ndarray = field(repr=False)
    faults: list[Fault] = field(default_factory=list, repr=False)
    anatomy: dict = field(default_factory=dict, repr=False)

    def fault_map(self) -> np.ndarray:
        """``uint8 [X, Y, Z, M]`` (modalities in ``MODALITIES`` order): the kind code (``FAULT_CODES``,
        0 = none) of the fault that changed each voxel of each modality."""
        out = np.zeros((*self.shape, len(MODALITIES)), dtype=np.uint8)
        for fault in self.faults:
            out[..., MODALITIES.index(fault.modality)][fault.region] = FAULT_CODES[fault.kind]
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.label.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def check_phantom_geometry(shape: int | Sequence[int] | None, spacing_mm: float) -> tuple[int, int, int] | None:
    """Normalise and check the phantom grid arguments: ``shape`` (one int for a cube, three ints, or
    ``None`` for the whole template field of view) and ``spacing_mm``. Raises :class:`ValueError`
    with the allowed ranges."""
    if not (
        isinstance(spacing_mm, (int, float))
        and math.isfinite(spacing_mm)
        and MIN_SPACING_MM <= spacing_mm <= MAX_SPACING_MM
    ):
        raise ValueError(
            f"spacing must be a voxel size in mm between {MIN_SPACING_MM:g} and {MAX_SPACING_MM:g}; got {spacing_mm!r}"
        )
    if shape is None:
        return None
    sizes = (shape,) * 3 if not isinstance(shape, (Sequence, np.ndarray)) else tuple(shape)
    if len(sizes) != 3 or not all(isinstance(n, (int, np.integer)) and MIN_SHAPE <= n <= MAX_SHAPE for n in sizes):
        raise ValueError(f"shape must be one or three integers between {MIN_SHAPE} and {MAX_SHAPE}; got {shape!r}")
    return tuple(int(n) for n in sizes)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ anatomy
@dataclass(frozen=True)
class _Template:
    """The 1 mm MNI152 2009a brain mask, GM and WM maps (``float32 [197, 233, 189]``), affine, and
    the brain's bounding box (inclusive voxel indices)."""

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray
    brain_low: np.ndarray
    brain_high: np.ndarray


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    """Loading takes about a second, hence the cache."""
    from nilearn import datasets  # imported here: nilearn costs ~2 s, and only the phantom needs it

    t1 = datasets.load_mni152_template(resolution=1)
    brain = (np.asanyarray(t1.dataobj) > 0).astype(np.float32)
    # The probability maps reach a little past the skull-stripped T1; keep them inside its brain.
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * brain
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * brain
    inside = np.argwhere(brain > 0)
    return _Template(brain, gm, wm, np.array(t1.affine), inside.min(axis=0), inside.max(axis=0))


@dataclass(frozen=True)
class _Anatomy:
    """Normal anatomy on the output grid; arrays are read-only because the instance is cached."""

    fractions: dict[str, np.ndarray]  # csf, gm, wm: float32 [X, Y, Z]
    brain_mask: np.ndarray  # bool [X, Y, Z]
    depth_mm: np.ndarray  # float32 [X, Y, Z], distance to the outside of the brain
    affine: np.ndarray  # 4×4


def _anatomy(shape: tuple[int, int, int] | None, spacing_mm: float) -> _Anatomy:
    voxel_mm, offset, out_shape = _output_grid(_template(), shape, spacing_mm)
    return _anatomy_on_grid(voxel_mm, offset, out_shape)


@functools.lru_cache(maxsize=8)
def _anatomy_on_grid(voxel_mm: float, offset: tuple[float, float, float], shape: tuple[int, int, int]) -> _Anatomy:
    """Cached by the resolved grid, so arguments that fit the brain the same way share one entry."""
    template = _template()
    resampled = [
        _resample(volume, voxel_mm, np.array(offset), shape) for volume in (template.brain, template.gm, template.wm)
    ]
    brain, gm, wm = (np.clip(v, 0, 1) for v in resampled)
    # Interpolation can leave GM + WM a hair above the brain fraction at the edge; rescale there.
    excess = np.maximum(gm + wm, 1e-6) > brain
    scale = np.where(excess, brain / np.maximum(gm + wm, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(brain - gm - wm, 0, 1)
    mask = brain >= 0.5  # skull-stripped: a voxel is brain when it is mostly brain
    depth = ndimage.distance_transform_edt(mask, sampling=voxel_mm).astype(np.float32)
    grid = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    grid[:3, 3] = offset
    fractions = {"csf": csf.astype(np.float32), "gm": gm.astype(np.float32), "wm": wm.astype(np.float32)}
    for array in (*fractions.values(), mask, depth):
        array.flags.writeable = False
    return _Anatomy(fractions=fractions, brain_mask=mask, depth_mm=depth, affine=template.affine @ grid)


def _output_grid(
    template: _Template, shape: tuple[int, int, int] | None, spacing_mm: float
) -> tuple[float, tuple[float, float, float], tuple[int, int, int]]:
    """Voxel size (mm), template-index offset of output voxel 0, and output shape.

    Output voxel ``j`` samples template index ``offset + voxel_mm · j``. Without ``shape`` the grid
    covers the template at ``spacing_mm``; with it, the brain's bounding box is centred in the grid
    and the voxel grows (isotropically) when the box would not fit at ``spacing_mm``.
    """
    if shape is None:
        return spacing_mm, (0.0, 0.0, 0.0), tuple(math.ceil(n / spacing_mm) for n in template.brain.shape)
    extent = template.brain_high - template.brain_low + 1
    usable = np.array(shape) - 2 * FIT_MARGIN_VOXELS
    voxel_mm = max(spacing_mm, float(np.max(extent / usable)))
    offset = (template.brain_low + template.brain_high) / 2 - voxel_mm * (np.array(shape) - 1) / 2
    return voxel_mm, tuple(float(o) for o in offset), shape


def _resample(volume: np.ndarray, voxel_mm: float, offset: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a 1 mm volume to ``voxel_mm`` voxels (output ``j`` ↔ input index ``offset + voxel_mm·j``).

    Anti-aliasing in two steps: average whole ``k × k × k`` blocks first (``k = ⌊voxel_mm⌋``: exact
    partial-volume fractions, and cheap), then Gaussian smoothing with σ = (factor − 1)/2 for the
    remaining fractional factor (scikit-image's rule), then trilinear interpolation.
    """
    block = max(int(voxel_mm), 1)
    if block > 1:
        volume = _block_mean(np.pad(volume, [(0, -n % block) for n in volume.shape]), block)
        offset = (offset - (block - 1) / 2) / block  # block i is centred on input index block·i + (block−1)/2
        voxel_mm /= block
    if voxel_mm > 1:
        volume = ndimage.gaussian_filter(volume, sigma=(voxel_mm - 1) / 2)
    return ndimage.affine_transform(
        volume, np.full(3, voxel_mm), offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0
    ).astype(np.float32)


def _block_mean(volume: np.ndarray, block: int) -> np.ndarray:
    """Mean over non-overlapping ``block³`` cubes: ``[X, Y, Z]`` (multiples of ``block``) → ``[X/b, Y/b, Z/b]``."""
    x, y, z = (n // block for n in volume.shape)
    return volume.reshape(x, block, y, block, z, block).mean(axis=(1, 3, 5))


# ------------------------------------------------------------------------------------- tumour
def _tumour(anatomy: _Anatomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Boolean masks ``[X, Y, Z]`` of necrosis, enhancing rim and edema (disjoint, inside the brain)."""
    voxel_mm = float(np.linalg.norm(anatomy.affine[:3, 0]))
    # Radii in mm, but never thinner than ~1.5 voxels: every layer must exist on coarse test grids.
    core_mm = max(rng.uniform(5, 12), 1.5 * voxel_mm)
    rim_mm = core_mm + max(rng.uniform(3, 7), 1.3 * voxel_mm)
    edema_mm = rim_mm + max(rng.uniform(8, 22), 1.5 * voxel_mm)

    centre = _tumour_centre(anatomy, rim_mm, rng)
    coordinates = np.stack(np.meshgrid(*(np.arange(n) for n in anatomy.brain_mask.shape), indexing="ij"), axis=-1)
    offset_mm = (coordinates - centre) * voxel_mm
    # A randomly oriented ellipsoid: rotate into its frame, then stretch the axes (volume preserved).
    stretch = np.exp(rng.uniform(-0.25, 0.25, size=3))
    stretch /= np.prod(stretch) ** (1 / 3)
    radius = np.linalg.norm(offset_mm @ _random_rotation(rng) / stretch, axis=-1)

    mask = anatomy.brain_mask
    core_radius = radius * (1 + 0.12 * _smooth_noise(mask.shape, 6.0 / voxel_mm, rng))
    # Edema infiltrates along white matter: its boundary reaches further where WM dominates.
    edema_radius = radius * (1 + 0.25 * _smooth_noise(mask.shape, 8.0 / voxel_mm, rng))
    edema_reach = edema_mm * (0.75 + 0.4 * anatomy.fractions["wm"])
    # The noise can pinch off islands; a tumour is one lesion, so keep the piece holding the centre.
    components, _ = ndimage.label((edema_radius < edema_reach) | (core_radius < rim_mm))
    lesion = (components == components[tuple(np.round(centre).astype(int))]) & mask
    necrosis = (core_radius < core_mm) & lesion
    enhancing = (core_radius < rim_mm) & lesion & ~necrosis
    edema = lesion & ~necrosis & ~enhancing
    return {"necrosis": necrosis, "enhancing": enhancing, "edema": edema}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed 3×3 rotation: QR of a Gaussian matrix with the signs fixed (Haar
    measure), its handedness flipped if needed."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else q * np.array([-1.0, 1.0, 1.0])


def _tumour_centre(anatomy: _Anatomy, rim_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A voxel (with sub-voxel jitter) in supratentorial white matter, deep enough for the core
    and rim to lie inside the brain; the deepest brain voxel when no such voxel exists."""
    indices = np.argwhere(anatomy.brain_mask)
    world_z = (anatomy.affine[:3, :3] @ indices.T + anatomy.affine[:3, 3:4])[2]
    depth = anatomy.depth_mm[tuple(indices.T)]
    candidates = indices[
        (anatomy.fractions["wm"][tuple(indices.T)] > 0.5) & (world_z > SUPRATENTORIAL_Z_MM) & (depth >= 0.8 * rim_mm)
    ]
    if len(candidates) == 0:
        candidates = indices[depth == depth.max()]
    return candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=3)


def _smooth_noise(shape: tuple[int, ...], sigma_voxels: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ~``sigma_voxels``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=max(sigma_voxels, 0.5))
    return noise / max(float(noise.std()), 1e-6)


# ------------------------------------------------------------------------------------- signal
def _contrast_table(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Modality → compartment → signal, with each relaxation time jittered by ±5 % per case
    (scanner and patient variability)."""
    jittered = {
        name: Relaxation(t.t1_ms * rng.uniform(0.95, 1.05), t.t2_ms * rng.uniform(0.95, 1.05), t.proton_density)
        for name, t in COMPARTMENTS.items()
    }
    table = {modality: {name: SEQUENCES[modality].signal(t) for name, t in jittered.items()} for modality in MODALITIES}
    enhancing = jittered["enhancing"]
    table["t1ce"]["enhancing"] = SEQUENCES["t1ce"].signal(
        Relaxation(ENHANCING_T1_WITH_GADOLINIUM_MS, enhancing.t2_ms, enhancing.proton_density)
    )
    return table


def _bias_field(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field ``exp(Σ c_ijk P_i(x) P_j(y) P_k(z))`` over Legendre polynomials of
    total degree ≤ 3 on [-1, 1]³ (the model of MONAI's RandBiasField), normalised to mean 1."""
    degree = 3
    coefficients = np.zeros((degree + 1,) * 3)
    for i, j, k in np.ndindex(*coefficients.shape):
        if 0 < i + j + k <= degree:
            coefficients[i, j, k] = rng.normal(0.0, strength / (i + j + k))
    axes = [np.linspace(-1, 1, n) for n in shape]
    field = np.exp(np.polynomial.legendre.leggrid3d(*axes, coefficients)).astype(np.float32)
    return field / field.mean()


def make_phantom_case(
    seed: int | Sequence[int],
    shape: int | Sequence[int] | None = 64,
    spacing_mm: float = 2.0,
    *,
    label_convention: str | LabelConvention = "brats2021",
    noise: str = "rician",
    noise_level: float | None = None,
    bias_strength: float | None = None,
    vary_anatomy: bool = False,
    faults: Sequence[str] = (),
    fault_rate: float = 0.0,
    max_faulted: int = 2,
) -> PhantomCase:
    """Generate one phantom case; the same arguments give the same case bit for bit.

    Args:
        seed: anything :func:`numpy.random.default_rng` accepts (an int, or a sequence such as
            ``[cohort_seed, case_index]``).
        shape: output grid ``[X, Y, Z]`` (one int for a cube); the brain is centred and, when it
            would not fit at ``spacing_mm``, the voxel size grows. ``None``: the whole template
            field of view at ``spacing_mm`` (99×117×95 at 2 mm).
        spacing_mm: the finest voxel size (the template is 1 mm).
        label_convention: ``"brats2021"`` (1 NCR, 2 ED, 4 ET), ``"brats2023"`` (ET = 3), or ``"msd"``.
        noise: ``"rician"`` (magnitude images), ``"gaussian"`` or ``"none"``.
        noise_level: noise σ as a fraction of the mean brain signal; random in [0.02, 0.05] if None.
        bias_strength: scale of the bias-field coefficients; random in [0.05, 0.2] if None, 0 for none.
        vary_anatomy: deform and scale the template per case (:func:`e2pa.data.faults.deform_fields`),
            so that cases differ in anatomy and not only in tumour.
        faults: fault kinds (``e2pa.data.faults.FAULT_KINDS``) to draw from; each modality is faulted with
            probability ``fault_rate``, at most ``max_faulted`` per case. The fault draws have their own
            random stream: the same case without faults is the clean version of it, voxel for voxel
            outside each fault's region (``PhantomCase.faults``, ``PhantomCase.fault_map``).
    """
    sizes = check_phantom_geometry(shape, spacing_mm)
    convention = get_convention(label_convention)
    if noise not in ("rician", "gaussian", "none"):
        raise ValueError(f"noise must be 'rician', 'gaussian' or 'none'; got {noise!r}")
    unknown = [k for k in faults if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"faults: unknown kind(s) {unknown}; choose from {', '.join(FAULT_KINDS)}")
    if not 0 <= fault_rate <= 1 or (fault_rate > 0 and not faults):
        raise ValueError(f"fault_rate must be in [0, 1] (and > 0 needs fault kinds); got {fault_rate!r}")
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(sizes, float(spacing_mm))
    anatomy_params = {}
    if vary_anatomy:
        anatomy, anatomy_params = _varied_anatomy(anatomy, stream(seed, ANATOMY_STREAM))
    tumour = _tumour(anatomy, rng)

    in_tumour = tumour["necrosis"] | tumour["enhancing"] | tumour["edema"]
    brain_fraction = sum(anatomy.fractions.values())
    fractions = {name: np.where(in_tumour, 0, f).astype(np.float32) for name, f in anatomy.fractions.items()}
    fractions.update({name: np.where(m, brain_fraction, 0).astype(np.float32) for name, m in tumour.items()})

    contrasts = _contrast_table(rng)
    noise_level = rng.uniform(0.02, 0.05) if noise_level is None else noise_level
    bias_strength = rng.uniform(0.05, 0.2) if bias_strength is None else bias_strength
    mask = anatomy.brain_mask
    images, signals, sigmas = {}, {}, {}
    for modality in MODALITIES:
        signal = sum(contrasts[modality][name] * f for name, f in fractions.items())
        signal = signal * _bias_field(mask.shape, bias_strength, rng) * rng.uniform(700, 1300)  # scanner gain
        sigmas[modality] = noise_level * signal[mask].mean()
        images[modality] = np.where(mask, _add_noise(signal, noise, sigmas[modality], rng), 0)
        images[modality] = images[modality].astype(np.float32)
        signals[modality] = signal

    drawn_faults = []
    if fault_rate > 0:
        fault_rng = stream(seed, FAULT_STREAM)
        voxel_mm = float(np.linalg.norm(anatomy.affine[:3, 0]))
        for modality, kind in draw_faulted_modalities(fault_rng, MODALITIES, tuple(faults), fault_rate, max_faulted):
            clean = images[modality]
            faulted, params = apply_fault(kind, clean, signals[modality], sigmas[modality], mask, voxel_mm, fault_rng)
            region = faulted != clean
            images[modality] = faulted
            drawn_faults.append(Fault(modality=modality, kind=kind, params=params, region=region))

    label = np.zeros(mask.shape, dtype=np.uint8)
    label[tumour["edema"]] = convention.edema
    label[tumour["necrosis"]] = convention.necrotic
    label[tumour["enhancing"]] = convention.enhancing
    return PhantomCase(
        images=images,
        label=label,
        affine=anatomy.affine.copy(),
        label_convention=convention,
        fractions=fractions,
        brain_mask=mask.copy(),
        faults=drawn_faults,
        anatomy=anatomy_params,
    )


def _varied_anatomy(anatomy: _Anatomy, rng: np.random.Generator) -> tuple[_Anatomy, dict]:
    """This case's anatomy: the template's fractions deformed and scaled (``deform_fields``)."""
    voxel_mm = float(np.linalg.norm(anatomy.affine[:3, 0]))
    fields, params = deform_fields(dict(anatomy.fractions), voxel_mm, rng)
    brain = np.clip(sum(fields.values()), 0, 1)
    mask = brain >= 0.5
    depth = ndimage.distance_transform_edt(mask, sampling=voxel_mm).astype(np.float32)
    return _Anatomy(fractions=fields, brain_mask=mask, depth_mm=depth, affine=anatomy.affine), params


def _add_noise(signal: np.ndarray, kind: str, sigma: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "none":
        return signal
    real = signal + rng.normal(0.0, sigma, signal.shape)
    if kind == "gaussian":
        return real
    return np.hypot(real, rng.normal(0.0, sigma, signal.shape))  # magnitude of a complex signal: Rician


# ------------------------------------------------------------------------------------- cohort
def write_phantom_cohort(
    out_dir: str | os.PathLike,
    cases: int,
    seed: int = 0,
    *,
    shape: int | Sequence[int] | None = 64,
    spacing_mm: float = 2.0,
    label_convention: str | LabelConvention = "brats2021",
    validation_fraction: float = 0.2,
    overwrite: bool = False,
    name_prefix: str = "Phantom",
    vary_anatomy: bool = False,
    faults: Sequence[str] = (),
    fault_rate: float = 0.0,
    max_faulted: int = 2,
) -> Path:
    """Write ``cases`` phantom cases in BraTS layout plus a Decathlon-style ``dataset.json``.

    Layout: ``out_dir/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2023 naming
    ``<case>-{t2f,t1n,t1c,t2w,seg}`` when ``label_convention="brats2023"``, so that discovery by
    file name infers the right convention). Case ``i`` is generated from ``[seed, i]``, so it does
    not depend on how many cases are written. The last ``round(cases · validation_fraction)`` cases
    form the validation split. ``vary_anatomy``, ``faults``, ``fault_rate``, ``max_faulted``: as in
    :func:`make_phantom_case`; with faults each case folder also holds ``<case>_faultmap.nii.gz``
    (``uint8 [X, Y, Z, 4]``: per modality in FLAIR, T1, T1ce, T2 order the kind code of the fault that
    changed the voxel, 0 = none) and ``<case>_faults.json`` (modality, kind, parameters, voxel count,
    and the codes). Each case folder is written to a temporary folder and renamed into
    place, ``dataset.json`` atomically too. Existing case folders or ``dataset.json`` are an error
    (:class:`DataError`) unless ``overwrite``. Returns the path of ``dataset.json``.
    """
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise ValueError(f"cases must be a positive integer; got {cases!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}")
    sizes = check_phantom_geometry(shape, spacing_mm)
    convention = get_convention(label_convention)
    naming = "brats2023" if convention.name == "brats2023" else "brats2021"
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    names = [f"{name_prefix}{BRATS_NAMING[naming]['separator']}{i:03d}" for i in range(cases)]
    json_path = out_dir / "dataset.json"
    existing = [str(p) for p in (*(out_dir / n for n in names), json_path) if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise DataError(f"{out_dir}: would overwrite {shown}; pass overwrite=True (--overwrite) to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)

    entries = []
    for index, case in enumerate(names):
        phantom = make_phantom_case(
            [seed, index],
            sizes,
            spacing_mm,
            label_convention=convention,
            vary_anatomy=vary_anatomy,
            faults=tuple(faults),
            fault_rate=fault_rate,
            max_faulted=max_faulted,
        )
        files = _write_case_folder(out_dir, case, phantom, naming, with_faults=fault_rate > 0)
        entry = {"image": [files[m] for m in MODALITIES], "label": files["label"], "case": case}
        if "faultmap" in files:
            entry.update(faultmap=files["faultmap"], faults=files["faults"])
        entries.append(entry)

    n_validation = round(cases * validation_fraction)
    dataset = {
        "name": "e2pa-phantom",
        "description": "BraTS-like phantom on MNI ICBM152 2009a anatomy (nilearn) with BrainWeb-1 relaxation "
        "times and a synthetic tumour; not clinical data",
        "reference": "e2pa.data.phantom",
        "tensorImageSize": "3D",
        "modality": {str(i): MODALITY_DISPLAY_NAMES[m] for i, m in enumerate(MODALITIES)},
        "labels": {str(k): v for k, v in convention.label_names.items()},
        "label_convention": convention.name,
        "numTraining": cases - n_validation,
        "numValidation": n_validation,
        "training": entries[: cases - n_validation],
        "validation": entries[cases - n_validation :],
        "phantom": {
            "seed": seed,
            "shape": list(sizes) if sizes else None,
            "spacing_mm": spacing_mm,
            "vary_anatomy": vary_anatomy,
            "faults": list(faults),
            "fault_rate": fault_rate,
            "max_faulted": max_faulted,
            "fault_codes": FAULT_CODES if fault_rate > 0 else {},
        },
    }
    return atomic_write_text(json_path, json.dumps(dataset, indent=2) + "\n")


def _write_case_folder(
    out_dir: Path, case: str, phantom: PhantomCase, naming: str, with_faults: bool = False
) -> dict[str, str]:
    """Write one case into a temporary sibling folder, then move it into place (replacing an old
    one). Returns modality/"label" (/"faultmap"/"faults") → path relative to ``out_dir``."""
    staging = out_dir / f".{case}.{uuid.uuid4().hex[:8]}.tmp"
    files = {part: f"{case}/{brats_file_name(case, part, naming)}" for part in (*MODALITIES, "label")}
    try:
        if with_faults:
            files["faultmap"] = f"{case}/{case}_faultmap.nii.gz"
            files["faults"] = f"{case}/{case}_faults.json"
            save_volume(phantom.fault_map(), phantom.affine, staging / Path(files["faultmap"]).name, dtype=np.uint8)
            described = [
                {
                    "modality": f.modality,
                    "kind": f.kind,
                    "code": FAULT_CODES[f.kind],
                    "voxels": int(f.region.sum()),
                    "params": f.params,
                }
                for f in phantom.faults
            ]
            atomic_write_text(
                staging / Path(files["faults"]).name,
                json.dumps(
                    {
                        "case": case,
                        "modalities": list(MODALITIES),
                        "codes": FAULT_CODES,
                        "faults": described,
                        "anatomy": phantom.anatomy,
                    },
                    indent=2,
                )
                + "\n",
            )
        for modality in MODALITIES:
            save_volume(phantom.images[modality], phantom.affine, staging / Path(files[modality]).name)
        save_label_map(
            phantom.label,
            phantom.affine,
            staging / Path(files["label"]).name,
            label_convention=phantom.label_convention,
        )
        final = out_dir / case
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files
