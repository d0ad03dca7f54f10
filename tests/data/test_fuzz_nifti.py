"""Fuzzing the NIfTI readers: whatever is on disk — odd shapes, dtypes, affines, header fields,
truncated or corrupted bytes — a reader either returns what it promises or raises DataError whose
message names the file. Never another exception type."""

from __future__ import annotations

import gzip
import itertools
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from e2pa.data import DataError, check_case, read_label_map, read_volume

pytestmark = pytest.mark.filterwarnings("ignore")  # nibabel warns about every odd header; that is the point

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64, np.complex64]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_counter = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh_path(folder: Path, suffix: str) -> Path:
    return folder / f"case{next(_counter)}_flair{suffix}"


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
any_float = st.one_of(finite, st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e-30, 1e30]))


@st.composite
def nifti_files(draw) -> bytes | None:
    """The bytes of a random single-file NIfTI: 1-5 dims of 1-6 voxels, any storable dtype, a
    random (possibly singular or non-finite) affine, pixdims and units, and random scaling fields
    (patched into the bytes: nibabel refuses to write NaN/inf/zero slopes itself). None when nibabel
    cannot serialise the draw."""
    dtype = draw(st.sampled_from(DTYPES))
    # Mostly plausible (3-D, sane affine) so the checks past the header get exercised too.
    plausible = draw(st.integers(0, 3)) > 0
    shape = draw(st.lists(st.integers(1, 6), min_size=3 if plausible else 1, max_size=3 if plausible else 5))
    if np.dtype(dtype).kind == "f":
        elements = st.floats(width=np.dtype(dtype).itemsize * 8, allow_subnormal=False)
    elif np.dtype(dtype).kind == "c":
        elements = st.complex_numbers(max_magnitude=1e3, width=64)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max))
    data = draw(arrays(dtype, shape, elements=elements))
    affine = np.eye(4)
    if plausible:
        affine[:3, :3] = np.diag(draw(st.lists(st.floats(0.2, 5) | st.floats(-5, -0.2), min_size=3, max_size=3)))
        affine[:3, :3] += np.array(draw(st.lists(st.floats(-0.1, 0.1), min_size=9, max_size=9))).reshape(3, 3)
        affine[:3, 3] = draw(st.lists(finite, min_size=3, max_size=3))
    else:
        affine[:3, :] = np.array(draw(st.lists(any_float, min_size=12, max_size=12))).reshape(3, 4)
    image = nib.Nifti1Image(data, None, dtype=dtype)
    # Store the affine as an sform only: nibabel refuses to save some matrices as a qform.
    image.header.set_sform(affine, code=draw(st.sampled_from(["unknown", "scanner", "aligned"])))
    image.header.set_xyzt_units(draw(st.sampled_from(["mm", "meter", "unknown"])), "sec")
    image.header["pixdim"][1:4] = draw(st.lists(any_float, min_size=3, max_size=3))
    try:
        payload = bytearray(image.to_bytes())
    except Exception:  # noqa: BLE001 — nibabel could not write this draw; nothing to read
        return None
    if draw(st.booleans()):
        for field in ("scl_slope", "scl_inter"):
            offset = nib.nifti1.header_dtype.fields[field][1]
            payload[offset : offset + 4] = np.float32(draw(any_float)).tobytes()
    return bytes(payload)


def _check_reader_contract(path: Path, convention: str = "brats2021") -> None:
    """Each reader returns its promised result or raises DataError naming ``path``."""
    for read in (read_volume, lambda p: read_volume(p, channels=4), lambda p: read_label_map(p, convention)):
        try:
            data, image = read(path)
        except DataError as error:
            assert path.name in str(error), f"message does not name the file: {error}"
            continue
        assert isinstance(image, nib.Nifti1Image)
        if read is read_volume:
            assert data.dtype == np.float32 and data.ndim == 3 and np.isfinite(data).all()
    try:
        check_case([path] * 4, path, label_convention=convention)
    except DataError as error:
        assert path.name in str(error)


@FUZZ
@given(payload=nifti_files(), compressed=st.booleans())
def test_random_images(fuzz_dir, payload, compressed):
    if payload is None:
        return
    path = _fresh_path(fuzz_dir, ".nii.gz" if compressed else ".nii")
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    _check_reader_contract(path)


@st.composite
def corruptions(draw) -> tuple[str, int, int, bytes]:
    kind = draw(st.sampled_from(["truncate", "overwrite", "append"]))
    return kind, draw(st.integers(0, 2000)), draw(st.integers(1, 8)), draw(st.binary(min_size=1, max_size=64))


def _corrupt(payload: bytes, corruption: tuple[str, int, int, bytes]) -> bytes:
    kind, offset, length, garbage = corruption
    offset %= max(len(payload), 1)
    if kind == "truncate":
        return payload[:offset]
    if kind == "overwrite":
        return payload[:offset] + garbage[:length] + payload[offset + length :]
    return payload + garbage


@FUZZ
@given(corruption=corruptions(), where=st.sampled_from(["raw", "inside-gzip", "gzip-stream"]), label=st.booleans())
def test_corrupted_bytes(fuzz_dir, corruption, where, label):
    """Damage a good file: its header or data (``raw`` / ``inside-gzip``: the NIfTI bytes, then
    compressed intact), or the compressed stream itself (``gzip-stream``)."""
    rng = np.random.default_rng(0)
    data = np.array([0, 1, 2, 4], np.uint8)[rng.integers(0, 4, (6, 5, 4))] if label else rng.random((6, 5, 4))
    payload = nib.Nifti1Image(data.astype(np.uint8 if label else np.float32), np.eye(4)).to_bytes()
    if where == "raw":
        path, content = _fresh_path(fuzz_dir, ".nii"), _corrupt(payload, corruption)
    elif where == "inside-gzip":
        path, content = _fresh_path(fuzz_dir, ".nii.gz"), gzip.compress(_corrupt(payload, corruption))
    else:
        path, content = _fresh_path(fuzz_dir, ".nii.gz"), _corrupt(gzip.compress(payload), corruption)
    path.write_bytes(content)
    _check_reader_contract(path)


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=600), suffix=st.sampled_from([".nii", ".nii.gz", ".img", ""]))
def test_arbitrary_bytes(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"junk_t1{suffix}"
        path.write_bytes(content)
        _check_reader_contract(path)
