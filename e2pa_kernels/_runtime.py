"""Backend selection: the one predicate that decides Triton vs PyTorch for every op.

Backends
--------
``triton``     the Triton forward/backward kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
``torch``      the memory-lean PyTorch path: same hand-written backward, saves only its inputs.
``reference``  the plain-autograd oracle in :mod:`e2pa_kernels.reference`.
``auto``       ``triton`` for CUDA tensors whose dtype the kernels take, ``torch`` otherwise.

The request comes from, in order: :func:`use_backend` (innermost wins), the ``E2PA_BACKEND``
environment variable (read at call time), ``auto``. Nothing here touches CUDA at import time.

Under ``torch.compile`` the request is read once, when a graph is traced, and becomes a constant of
that graph (``torch.compiler.assume_constant_result``: Dynamo cannot trace a ``ContextVar``): a
compiled model keeps the backend it was compiled with (``torch.compiler.reset()`` to re-pick).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "reference")

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("e2pa_backend", default=None)

# dtypes the Triton kernels load and store; math inside is float32.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """The Triton backend was asked for explicitly but cannot run these inputs."""


def _validated(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@torch.compiler.assume_constant_result
def requested_backend() -> str:
    """The backend asked for right now (``auto`` when nothing asks)."""
    ctx = _requested.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("E2PA_BACKEND")
    return _validated(env, "E2PA_BACKEND") if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on ``name`` (``auto|triton|torch|reference``); nests, thread/task-local."""
    token = _requested.set(_validated(name, "use_backend(name)"))
    try:
        yield
    finally:
        _requested.reset(token)


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# SM count of the GPU whose launch configs the interpreter should use (None: its own small blocks).
_emulated_sms: contextvars.ContextVar[int | None] = contextvars.ContextVar("e2pa_emulated_sms", default=None)


def emulated_sm_count() -> int | None:
    """The SM count set by :func:`launch_as_gpu`, or None."""
    return _emulated_sms.get()


def small_interpreter_blocks() -> bool:
    """Whether launchers pick the interpreter's small test blocks: in the interpreter, unless
    :func:`launch_as_gpu` asks for the GPU configs."""
    return interpreter_enabled() and _emulated_sms.get() is None


@contextlib.contextmanager
def launch_as_gpu(sm_count: int = 132) -> Iterator[None]:
    """Inside, launchers pick the block sizes and persistent grids they would pick on a GPU with
    ``sm_count`` SMs (default: an H100 SXM), also in the interpreter. For the traffic meter: the bytes a
    kernel moves depend on its tiles (what is re-read per tile) and on its number of programs (partial
    buffers). The interpreter runs these large tiles correctly, only more slowly per program."""
    token = _emulated_sms.set(int(sm_count))
    try:
        yield
    finally:
        _emulated_sms.reset(token)


_triton_importable: list[bool] = []  # the answer, once asked


@torch.compiler.assume_constant_result
def triton_importable() -> bool:
    if not _triton_importable:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_importable.append(True)
        except Exception:  # ImportError, or a broken install on a platform without Triton
            _triton_importable.append(False)
    return _triton_importable[0]


def triton_unavailable_reason(
    tensors: tuple[torch.Tensor, ...], dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES
) -> str | None:
    """Why the Triton kernels cannot run on ``tensors`` (None when they can); ``dtypes``: the floating
    dtypes the op's kernels take (default: float16/bfloat16/float32)."""
    if not triton_importable():
        return "Triton is not installed (it is Linux-only)"
    devices = {t.device.type for t in tensors}
    interp = interpreter_enabled()
    if devices - {"cuda", "cpu"}:
        return f"Triton kernels run on CUDA tensors only; got device(s) {sorted(devices)}"
    if "cpu" in devices and not interp:
        return "CPU tensors need TRITON_INTERPRET=1 (set before e2pa_kernels is imported) to run Triton kernels"
    if "cuda" in devices and interp:
        return "TRITON_INTERPRET=1 is set, so Triton kernels take CPU tensors only"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in dtypes)
            return f"Triton kernels take {names}; got {t.dtype} (use the torch backend)"
        if interp and t.dtype == torch.bfloat16:
            return "the Triton interpreter has no bfloat16 arithmetic; bfloat16 kernels run on GPUs only"
    return None


def select_backend(
    *tensors: torch.Tensor | None, triton_limit: str | None = None, dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES
) -> str:
    """The implementation an op will run on ``tensors``: ``triton``, ``torch`` or ``reference``.

    ``auto`` picks ``triton`` only for CUDA tensors the kernels take (the interpreter is for tests,
    so CPU tensors go to ``torch`` unless ``triton`` is asked for explicitly). An explicit ``triton``
    request that cannot run raises :class:`BackendUnavailableError` with the reason.
    ``triton_limit``: why the op's kernels cannot take these sizes (None when they can), e.g.
    "free_energy: the Triton kernels take K <= 64 classes; got K = 80" — treated like any other reason.
    ``dtypes``: the floating dtypes the op's kernels take (the eigensolver's: float64 only).
    """
    present = tuple(t for t in tensors if t is not None)
    requested = requested_backend()
    if requested in ("torch", "reference"):
        return requested
    reason = triton_unavailable_reason(present, dtypes) or triton_limit
    if requested == "triton":
        if reason is not None:
            raise BackendUnavailableError(f"E2PA backend 'triton' was requested but {reason}")
        return "triton"
    on_cuda = bool(present) and all(t.device.type == "cuda" for t in present)
    return "triton" if reason is None and on_cuda else "torch"
