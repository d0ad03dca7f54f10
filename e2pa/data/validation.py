"""Validating a whole data set before anything trains on it, predicts it or scores it — once.

:func:`validate_cases` checks every case of a cohort up front, in two passes so that the common
mistakes surface in seconds even on a large cohort:

1. headers only (no voxels): every file exists and is NIfTI with a sane header, the modalities and
   the label map of a case share one grid (shape; affines equal within ``affine_atol``, so scanner
   rounding of ~1e-4 mm passes);
2. voxels, with a progress bar: intensities are finite, label values belong to the convention
   (:func:`e2pa.data.nifti.check_case`, which reads each label map once).

Every problem found is collected and reported together (:class:`DataError`, the first few named).
Cases that pass are remembered in a small JSON cache keyed by each file's absolute path, size and
modification time (plus the modality order, the label convention and the tolerance), so a second
run over unchanged data skips them: re-validating an unchanged cohort costs one ``stat`` per file.
The cache lives in ``$E2PA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/e2pa`` or ``~/.cache/e2pa``); it is
an optimisation only — when it cannot be read or written, everything is simply checked again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError
from .labels import LabelConvention, get_convention
from .modalities import MODALITIES
from .nifti import DEFAULT_AFFINE_ATOL, CaseGeometry, check_case, load_image

log = logging.getLogger(__name__)
CACHE_VERSION = 1
MAX_REPORTED = 5


def cache_dir() -> Path:
    """Where validation results are cached (see the module docstring)."""
    if os.environ.get("E2PA_CACHE_DIR"):
        return Path(os.environ["E2PA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "e2pa"


def case_files(case: Mapping) -> list[str]:
    """The files of a case dict (``image``: one path or a list; optional ``label``), as given."""
    image = case["image"]
    files = [os.fspath(image)] if isinstance(image, (str, os.PathLike)) else [os.fspath(p) for p in image]
    if case.get("label") is not None:
        files.append(os.fspath(case["label"]))
    return files


def case_key(
    files: Sequence[str], modalities: Sequence[str], convention: LabelConvention, affine_atol: float, labelled: bool
) -> str | None:
    """A digest naming one version of a case's files and the rules it was checked by; None when a
    file cannot be ``stat``-ed (then there is nothing to remember)."""
    parts = [f"v{CACHE_VERSION}", ",".join(modalities), convention.name if labelled else "-", repr(affine_atol)]
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        parts.append(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class ValidationCache:
    """The set of case keys known to be valid, kept in one JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "validated-cases.json"
        self.known: set[str] = set()
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION:
                self.known = set(data.get("cases", []))
        except (OSError, ValueError, AttributeError):
            pass
        self._dirty = False

    def __contains__(self, key: str | None) -> bool:
        return key is not None and key in self.known

    def add(self, key: str | None) -> None:
        if key is not None and key not in self.known:
            self.known.add(key)
            self._dirty = True

    def save(self, limit: int = 200_000) -> None:
        if not self._dirty:
            return
        from ..io import atomic_write_json

        keys = sorted(self.known)[-limit:]
        try:
            atomic_write_json(self.path, {"version": CACHE_VERSION, "cases": keys})
        except OSError as error:  # a cache we cannot write only costs time
            log.debug("could not write the validation cache %s: %s", self.path, error)
        self._dirty = False


def known_valid(
    files: Sequence[str],
    modalities: Sequence[str],
    convention: str | LabelConvention,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    labelled: bool = True,
) -> bool:
    """Whether this exact version of a case's files already passed :func:`validate_cases`."""
    return case_key(files, tuple(modalities), get_convention(convention), affine_atol, labelled) in _shared_cache()


_CACHE: list[ValidationCache] = []


def _shared_cache() -> ValidationCache:
    path = cache_dir() / "validated-cases.json"
    if not _CACHE or _CACHE[0].path != path:
        _CACHE[:] = [ValidationCache(path)]
    return _CACHE[0]


def validate_cases(
    cases: Sequence[Mapping],
    *,
    modalities: Sequence[str] = MODALITIES,
    label_convention: str | LabelConvention = "brats2021",
    affine_atol: float = DEFAULT_AFFINE_ATOL,
    progress: bool = True,
    use_cache: bool = True,
    what: str = "data",
) -> dict[str, int]:
    """Check every case dict (``image``, optional ``label``, ``case``) before use; see the module
    docstring. Raises :class:`DataError` listing the failing cases. Returns counts:
    ``{"cases", "cached", "checked"}``."""
    convention = get_convention(label_convention)
    modalities = tuple(modalities)
    cache = _shared_cache() if use_cache else ValidationCache(Path(os.devnull))
    keys = [case_key(case_files(c), modalities, convention, affine_atol, c.get("label") is not None) for c in cases]
    todo = [(c, k) for c, k in zip(cases, keys, strict=True) if k not in cache]
    failures: list[str] = []
    # pass 1: headers and grids only — seconds for a whole cohort
    for case, _ in todo:
        error = _header_problem(case, modalities, affine_atol)
        if error:
            failures.append(error)
    if failures:
        raise _collected(failures, len(cases), what, "header check")
    # pass 2: voxels (finite intensities, label values), one read per file
    from tqdm.auto import tqdm

    bar = tqdm(
        todo, desc=f"checking {what}", unit="case", disable=not progress or not todo, leave=False, dynamic_ncols=True
    )
    for case, key in bar:
        try:
            check_case(
                case["image"],
                case.get("label"),
                modalities=modalities,
                label_convention=convention,
                affine_atol=affine_atol,
                case=str(case.get("case", "")) or None,
            )
        except DataError as error:
            failures.append(str(error))
            continue
        cache.add(key)
    bar.close()
    cache.save()
    if failures:
        raise _collected(failures, len(cases), what, "check")
    if todo:
        log.info("%s: %d case(s) checked (%d known valid from an earlier run)", what, len(todo), len(cases) - len(todo))
    return {"cases": len(cases), "cached": len(cases) - len(todo), "checked": len(todo)}


def _collected(failures: list[str], total: int, what: str, stage: str) -> DataError:
    shown = "; ".join(" ".join(f.split()) for f in failures[:MAX_REPORTED])
    more = f"; and {len(failures) - MAX_REPORTED} more" if len(failures) > MAX_REPORTED else ""
    return DataError(f"{what}: {len(failures)} of {total} case(s) failed the {stage}: {shown}{more}")


def _header_problem(case: Mapping, modalities: tuple[str, ...], affine_atol: float) -> str | None:
    """The first problem visible from the headers of a case's files, or None."""
    name = case.get("case", "?")
    image = case["image"]
    four_d = isinstance(image, (str, os.PathLike))
    if not four_d and len(image) != len(modalities):
        return f"case {name}: expected {len(modalities)} modality files, got {len(image)}"
    named = [("image", image)] if four_d else list(zip(modalities, image, strict=True))
    if case.get("label") is not None:
        named.append(("label", case["label"]))
    first = None
    for part, path in named:
        try:
            header = load_image(path)
        except DataError as error:
            return f"case {name}: {part}: {error}"
        if first is None:
            first = (part, path, header)
            continue
        ref_part, ref_path, ref = first
        if tuple(header.shape[:3]) != tuple(ref.shape[:3]):
            return (
                f"case {name}: {part} ({path}) has shape {tuple(header.shape[:3])} but {ref_part} ({ref_path}) "
                f"has {tuple(ref.shape[:3])}; the modalities must be co-registered on one grid"
            )
        difference = float(np.abs(header.affine - ref.affine).max())
        if difference > affine_atol:
            return (
                f"case {name}: {part} ({path}) has a different affine from {ref_part} ({ref_path}): "
                f"they differ by up to {difference:.4g} mm (tolerance {affine_atol:g})"
            )
    return None


def cached_geometry_or_check(
    image,
    label,
    *,
    modalities: Sequence[str],
    label_convention: str | LabelConvention,
    case: str | None = None,
    affine_atol: float = DEFAULT_AFFINE_ATOL,
) -> CaseGeometry | None:
    """:func:`check_case` unless this version of the files already passed :func:`validate_cases`
    (then None: nothing to read again)."""
    files = case_files({"image": image, "label": label})
    if known_valid(files, modalities, label_convention, affine_atol, labelled=label is not None):
        return None
    return check_case(
        image, label, modalities=modalities, label_convention=label_convention, affine_atol=affine_atol, case=case
    )
