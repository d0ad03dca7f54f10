"""Reading, validating and writing NIfTI volumes, with errors that name the file.

Everything that can go wrong with a file on disk (missing, not NIfTI, truncated gzip, corrupt
header, 4-D where 3-D was expected, NaN/inf voxels, labels outside the convention, modalities on
different grids) comes out as :class:`~e2pa.data.errors.DataError` with the path in the message,
never as a nibabel / gzip / numpy exception or a MONAI stack trace several transforms later.

Writers keep the reference image's geometry (affine, qform/sform codes, units, header) and write
atomically through :func:`e2pa.io.atomic_write` (a temporary file in the destination folder, then
a rename), so a crash never leaves a half-written volume under the final name.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import atomic_write
from .errors import DataError
from .labels import LabelConvention, check_label_values
from .modalities import MODALITIES

PathLike = str | os.PathLike

# A header that declares more than this is corrupt for our purposes (a BraTS case is ~36 MB as
# float32); refusing it up front keeps a fuzzed or damaged header from allocating gigabytes.
MAX_VOLUME_BYTES = 2**31

# File name endings of a NIfTI file, longest first (``.nii.gz`` also ends in ``.gz``, not ``.nii``).
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Affines of co-registered modalities written by different tools differ by float32 rounding.
DEFAULT_AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class CaseGeometry:
    """The common grid of a validated case: spatial ``shape`` (3 ints) and the voxel → world (RAS mm)
    ``affine`` (4×4)."""

    shape: tuple[int, int, int]
    affine: np.ndarray


def nifti_stem(name: str) -> str | None:
    """A file name without its NIfTI ending (``"a_t1.nii.gz"`` → ``"a_t1"``); None when it has none."""
    return next((name[: -len(suffix)] for suffix in NIFTI_SUFFIXES if name.endswith(suffix)), None)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while nibabel parses or decompresses ``path`` into a DataError naming it.

    Corruption surfaces through many unrelated types (EOFError and zlib.error from gzip,
    ImageFileError and HeaderDataError from nibabel, ValueError/TypeError when a buffer is shorter
    than the header says, struct.error, OSError, MemoryError), so this boundary catches them all.
    """
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as error:  # noqa: BLE001 — see the docstring: this is the one translation boundary
        raise DataError(f"{path}: unreadable or truncated NIfTI file ({type(error).__name__}: {error})") from error


def load_image(path: PathLike) -> nib.Nifti1Image:
    """Open ``path`` (``.nii`` or ``.nii.gz``) and check its header, without reading the voxels.

    Checks: NIfTI-1/2 format, a finite non-degenerate affine, a data type of real numbers and a
    declared data size that fits the file. Raises :class:`DataError` naming the path.
    """
    path = Path(path)
    with _reading(path):
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):  # Nifti2Image subclasses it
            raise DataError(f"{path}: not a NIfTI file (nibabel reads it as {type(image).__name__})")
        dtype = image.get_data_dtype()
        if dtype.kind not in "biuf":
            raise DataError(f"{path}: voxel data type {dtype} is not supported; expected real numbers")
        shape = tuple(int(n) for n in image.shape)
        if not shape or min(shape) < 1:
            raise DataError(f"{path}: header declares an empty volume of shape {_fmt(shape)}")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > MAX_VOLUME_BYTES:
            raise DataError(
                f"{path}: header declares {nbytes / 2**30:.1f} GiB of voxel data (shape {_fmt(shape)}); "
                "the header is corrupt or the volume is far larger than an MRI scan"
            )
        if not path.name.endswith(".gz"):
            needed = int(image.dataobj.offset) + nbytes
            if needed > path.stat().st_size:
                raise DataError(
                    f"{path}: truncated file: the header declares {needed} bytes, the file holds {path.stat().st_size}"
                )
        affine = image.affine
        if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise DataError(f"{path}: degenerate voxel-to-world affine (non-finite or singular):\n{affine}")
    return image


def read_volume(path: PathLike, *, channels: int | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read an intensity volume as ``float32``: ``[X, Y, Z]``, or ``[X, Y, Z, channels]`` when
    ``channels`` is given (the MSD 4-D layout). Returns the array and the image (for its geometry).

    Raises :class:`DataError` naming ``path`` for the wrong number of dimensions, unreadable or
    truncated data, and NaN/inf voxels (including values beyond the float32 range).
    """
    path = Path(path)
    image = load_image(path)
    _check_dimensions(path, image.shape, channels)
    with _reading(path), np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        data = np.asarray(image.get_fdata(dtype=np.float32))
    bad = ~np.isfinite(data)
    if bad.any():
        nan = int(np.isnan(data).sum())
        raise DataError(
            f"{path}: {int(bad.sum())} of {data.size} voxels are not finite "
            f"({nan} NaN, {int(bad.sum()) - nan} ±inf or beyond the float32 range)"
        )
    return data, image


def read_label_map(
    path: PathLike, convention: str | LabelConvention = "brats2021"
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D label map as ``uint8`` ``[X, Y, Z]`` and check its values against ``convention``.

    The voxels come from ``np.asanyarray(image.dataobj)``, not ``get_fdata``: no float round trip,
    and a scaled (``scl_slope``) header that would turn labels into fractions is caught as
    non-integer values. Raises :class:`DataError` naming ``path``.
    """
    path = Path(path)
    image = load_image(path)
    _check_dimensions(path, image.shape, None)
    with _reading(path):
        label = np.asanyarray(image.dataobj)
    check_label_values(label, convention, source=str(path))
    return label.astype(np.uint8), image


def check_case(
    image: PathLike | Sequence[PathLike],
    label: PathLike | None = None,
    *,
    modalities: Sequence[str] = MODALITIES,
    label_convention: str | LabelConvention = "brats2021",
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    case: str | None = None,
) -> CaseGeometry:
    """Validate one case before anything else reads it.

    ``image`` is either one path per modality (3-D volumes, in the order of ``modalities``) or a
    single 4-D path with the modalities on the last axis (MSD). Every file must exist and be
    readable with finite intensities; all volumes (and the label map, checked against
    ``label_convention``) must share one grid: same spatial shape, affines
    equal within ``affine_atol`` mm. Returns that grid; raises :class:`DataError` naming the case,
    the file(s) and the discrepancy.
    """
    where = f"case {case}: " if case else ""
    four_d = isinstance(image, (str, os.PathLike))
    if not four_d and len(image) != len(modalities):
        raise DataError(
            f"{where}expected {len(modalities)} modality files ({', '.join(modalities)}); "
            f"got {len(image)}: {[str(p) for p in image]}"
        )
    paths = {"image": Path(image)} if four_d else {m: Path(p) for m, p in zip(modalities, image, strict=True)}
    if label is not None:
        paths["label"] = Path(label)
    missing = [f"{name} ({path})" for name, path in paths.items() if not path.is_file()]
    if missing:
        raise DataError(f"{where}missing {'files' if len(missing) > 1 else 'file'}: {', '.join(missing)}")

    grids: dict[str, tuple[Path, nib.Nifti1Image]] = {}
    for name, path in paths.items():
        try:
            if name == "label":
                _, loaded = read_label_map(path, label_convention)
            else:
                _, loaded = read_volume(path, channels=len(modalities) if four_d else None)
        except DataError as error:
            raise DataError(f"{where}{name}: {error}") from error
        grids[name] = (path, loaded)
    return _common_grid(grids, affine_atol, where)


def _common_grid(grids: Mapping[str, tuple[Path, nib.Nifti1Image]], affine_atol: float, where: str) -> CaseGeometry:
    """Check that all images share the spatial shape and affine of the first one."""
    (first_name, (first_path, first)), *others = grids.items()
    shape = tuple(int(n) for n in first.shape[:3])
    for name, (path, image) in others:
        other_shape = tuple(int(n) for n in image.shape[:3])
        if other_shape != shape:
            raise DataError(
                f"{where}{name} ({path}) has shape {_fmt(other_shape)} but {first_name} ({first_path}) "
                f"has {_fmt(shape)}; the modalities must be co-registered on one grid"
            )
        difference = float(np.abs(image.affine - first.affine).max())
        if difference > affine_atol:
            raise DataError(
                f"{where}{name} ({path}) has a different affine from {first_name} ({first_path}): "
                f"they differ by up to {difference:.4g} (tolerance {affine_atol:g}); "
                f"{name} origin {_fmt_mm(image.affine[:3, 3])} vs {_fmt_mm(first.affine[:3, 3])}, "
                f"voxel size {_fmt_mm(image.header.get_zooms()[:3])} "
                f"vs {_fmt_mm(first.header.get_zooms()[:3])}"
            )
    return CaseGeometry(shape=shape, affine=np.array(first.affine))  # type: ignore[arg-type]


def _check_dimensions(path: Path, shape: tuple[int, ...], channels: int | None) -> None:
    if channels is None and len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got a {len(shape)}-D one of shape {_fmt(shape)}")
    if channels is not None and (len(shape) != 4 or shape[3] != channels):
        raise DataError(
            f"{path}: expected a 4-D volume with {channels} modalities on the last axis, got shape {_fmt(shape)}"
        )


# --------------------------------------------------------------------------------------- writing
def save_volume(
    array: np.ndarray,
    reference: nib.Nifti1Image | PathLike | np.ndarray,
    path: PathLike,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write ``array`` (``[X, Y, Z]`` or ``[X, Y, Z, C]``) to ``path`` on the grid of ``reference``.

    ``reference`` is a NIfTI image or the path of one (its affine, header, qform/sform codes and
    units are kept; its spatial shape must match) or a bare 4×4 affine. Written as ``dtype``; an
    integer ``dtype`` for float data stores it scaled (NIfTI ``scl_slope``/``scl_inter``, chosen by
    nibabel to span the type's range: int16 keeps ~1/65535 of the value range and halves the size);
    atomic; refuses to replace an existing file unless ``overwrite``. Returns the path.
    """
    array = np.asarray(array)
    scaled = np.dtype(dtype).kind in "iu" and array.dtype.kind == "f"
    image = _like_reference(array if scaled else array.astype(dtype, copy=False), reference, Path(path))
    image.set_data_dtype(dtype)
    if scaled:
        image.header.set_slope_inter(np.nan, np.nan)  # nibabel computes the scaling when it writes
    return _write_atomically(image, Path(path), overwrite)


def save_label_map(
    label: np.ndarray,
    reference: nib.Nifti1Image | PathLike | np.ndarray,
    path: PathLike,
    *,
    overwrite: bool = False,
    label_convention: str | LabelConvention | None = None,
) -> Path:
    """Write a label map ``[X, Y, Z]`` as ``uint8`` on the grid of ``reference`` (see
    :func:`save_volume`), checking its values against ``label_convention`` when given.

    The header's intensity scaling is reset, so a reference image with ``scl_slope`` (common for
    uint8/int16 MRI) cannot rescale the labels on the next read.
    """
    label = np.asarray(label)
    if label_convention is not None:
        check_label_values(label, label_convention, source=str(path))
    else:
        _check_uint8(label, path)
    image = _like_reference(label.astype(np.uint8), reference, Path(path))
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    return _write_atomically(image, Path(path), overwrite)


def _check_uint8(label: np.ndarray, path: PathLike) -> None:
    if label.size and (
        label.dtype.kind not in "biuf"
        or not np.array_equal(label, np.round(label))
        or label.min() < 0
        or label.max() > 255
    ):
        raise DataError(
            f"{path}: a label map must hold integers in 0..255; got {label.dtype} values "
            f"in [{label.min()}, {label.max()}]"
        )


def _like_reference(
    array: np.ndarray, reference: nib.Nifti1Image | PathLike | np.ndarray, path: Path
) -> nib.Nifti1Image:
    """A new image holding ``array`` with the geometry (and header) of ``reference``."""
    if isinstance(reference, np.ndarray):
        if reference.shape != (4, 4) or not np.all(np.isfinite(reference)):
            raise ValueError(f"a reference affine must be a finite 4×4 matrix; got shape {reference.shape}")
        image = nib.Nifti1Image(array, reference)
        image.set_qform(reference, code="scanner")
        image.set_sform(reference, code="scanner")
        return image
    if not isinstance(reference, nib.Nifti1Image):
        reference = load_image(reference)
    if tuple(array.shape[:3]) != tuple(reference.shape[:3]):
        raise DataError(
            f"{path}: array of shape {_fmt(array.shape)} does not fit the reference grid "
            f"{_fmt(reference.shape[:3])}; resample it to the reference space first"
        )
    header = reference.header.copy()
    image = nib.Nifti1Image(array, reference.affine, header=header)
    # Keep the reference's qform and sform as they were (codes included), not nibabel's defaults.
    for get_form, set_form in ((reference.get_qform, image.set_qform), (reference.get_sform, image.set_sform)):
        matrix, code = get_form(coded=True)
        set_form(matrix, code=int(code))
    return image


def _write_atomically(image: nib.Nifti1Image, path: Path, overwrite: bool) -> Path:
    if nifti_stem(path.name) is None:
        raise DataError(f"{path}: a NIfTI file name must end in {' or '.join(reversed(NIFTI_SUFFIXES))}")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass overwrite=True to replace it")
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)  # mtime=0: same volume, same bytes
    return atomic_write(path, lambda file: file.write(payload), overwrite=True)


def _fmt(shape: Sequence[int]) -> str:
    return "×".join(str(int(n)) for n in shape) or "()"


def _fmt_mm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"
