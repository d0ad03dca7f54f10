"""Backend selection, the override knobs, layout helpers, and import without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import e2pa_kernels
from e2pa_kernels._validate import needs_int64, voxels_last


def test_auto_picks_torch_for_cpu_tensors_even_under_the_interpreter():
    assert e2pa_kernels.interpreter_enabled()
    assert e2pa_kernels.select_backend(torch.randn(3)) == "torch"


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("E2PA_BACKEND", raising=False)
    x = torch.randn(3)
    with e2pa_kernels.use_backend("reference"):
        assert e2pa_kernels.select_backend(x) == "reference"
        with e2pa_kernels.use_backend("triton"):
            assert e2pa_kernels.select_backend(x) == "triton"  # CPU tensor, interpreter on
        assert e2pa_kernels.select_backend(x) == "reference"
    assert e2pa_kernels.requested_backend() == "auto"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("E2PA_BACKEND", "Reference")
    assert e2pa_kernels.select_backend(torch.randn(2)) == "reference"
    monkeypatch.setenv("E2PA_BACKEND", "fast")
    with pytest.raises(ValueError, match="E2PA_BACKEND must be one of auto, triton, torch, reference; got 'fast'"):
        e2pa_kernels.select_backend(torch.randn(2))
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with e2pa_kernels.use_backend("cuda"):
            pass


def test_explicit_triton_without_interpreter_on_cpu_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with (
        e2pa_kernels.use_backend("triton"),
        pytest.raises(e2pa_kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"),
    ):
        e2pa_kernels.select_backend(torch.randn(2))
    with e2pa_kernels.use_backend("auto"):
        assert e2pa_kernels.select_backend(torch.randn(2)) == "torch"


def test_import_never_touches_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA queried at import')\n"
        "for name in ('is_available', 'device_count', 'get_device_properties', 'current_device', 'init'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import e2pa_kernels, e2pa\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_voxels_last_views_slices_and_copies_other_layouts():
    x = torch.randn(2, 3, 16, 4, 5, 6)
    sliced = x[:, 1:, ::2]
    flat = voxels_last(sliced, 3)
    assert flat.shape == (2, 2, 8, 120) and flat.stride(-1) == 1
    assert flat.data_ptr() == sliced.data_ptr()  # no copy
    channels_last = torch.randn(2, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    flat = voxels_last(channels_last, 2)
    assert flat.stride(-1) == 1 and torch.equal(flat.view_as(channels_last), channels_last)


def test_int64_switch_threshold():
    small = torch.empty_strided((2, 2**29), (2**29, 1), device="meta")
    large = torch.empty_strided((5, 2**29), (2**29, 1), device="meta")
    assert not needs_int64(small)
    assert needs_int64(large)


def test_an_op_size_limit_is_one_more_reason_of_the_predicate():
    x = torch.randn(3)
    with e2pa_kernels.use_backend("triton"):
        assert e2pa_kernels.select_backend(x) == "triton"  # CPU tensors under the interpreter
        with pytest.raises(e2pa_kernels.BackendUnavailableError, match="take K <= 64 classes"):
            e2pa_kernels.select_backend(x, triton_limit="op: the Triton kernels take K <= 64 classes; got K = 80")
    with e2pa_kernels.use_backend("torch"):
        assert e2pa_kernels.select_backend(x, triton_limit="too big") == "torch"


def test_an_op_names_the_dtypes_its_kernels_take():
    """The eigensolver's kernel takes float64 only; the other ops' kernels take float16/bfloat16/float32."""
    x64 = torch.randn(3, dtype=torch.float64)
    with e2pa_kernels.use_backend("triton"):
        with pytest.raises(e2pa_kernels.BackendUnavailableError, match="float16/bfloat16/float32; got torch.float64"):
            e2pa_kernels.select_backend(x64)
        assert e2pa_kernels.select_backend(x64, dtypes=(torch.float64,)) == "triton"
        with pytest.raises(e2pa_kernels.BackendUnavailableError, match="take float64; got torch.float32"):
            e2pa_kernels.select_backend(x64.float(), dtypes=(torch.float64,))
