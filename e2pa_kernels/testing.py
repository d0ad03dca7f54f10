"""The comparison rule every implementation is judged by, in tests and in benchmark gates.

With ``truth`` the reference on float64 copies of the inputs and ``same`` the reference at the
implementation's dtype (PyTorch's own error at that precision), an output passes when, on finite
entries, ``max|out − truth| ≤ 2·max|same − truth| + atol[dtype]·max(1, max|truth|)``, and its
non-finite entries (±inf energies of absent voxels) sit exactly where the truth has them
(flash-attention's convention: low precision is judged against PyTorch at that precision, never with
a tolerance picked to pass).
"""

from __future__ import annotations

import dataclasses

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    error: float
    bound: float
    ok: bool
    detail: str = ""

    @property
    def message(self) -> str:
        return (
            f"{self.name}: {self.detail}"
            if self.detail
            else f"{self.name}: max error {self.error:.3e} {'<=' if self.ok else '>'} bound {self.bound:.3e}"
        )


def compare_to_reference(
    name: str, out: torch.Tensor, truth: torch.Tensor, same: torch.Tensor | None, dtype: torch.dtype | None = None
) -> Comparison:
    """Judge ``out`` against ``truth`` with ``same`` as the yardstick (see the module docstring)."""
    dtype = dtype or out.dtype
    if out.shape != truth.shape:
        return Comparison(name, float("inf"), 0.0, False, f"shape {tuple(out.shape)} != reference {tuple(truth.shape)}")
    out64, truth64 = out.detach().double().cpu(), truth.detach().double().cpu()
    finite = torch.isfinite(truth64)
    mismatch = (torch.isfinite(out64) != finite) | (~finite & (out64 != truth64) & ~(out64.isnan() & truth64.isnan()))
    if bool(mismatch.any()):
        return Comparison(
            name,
            float("inf"),
            0.0,
            False,
            f"non-finite pattern differs at {int(mismatch.sum())} entries, e.g. "
            f"{mismatch.nonzero()[:3].tolist()} (got {out64[mismatch][:3].tolist()}, "
            f"reference {truth64[mismatch][:3].tolist()})",
        )
    if not bool(finite.any()):
        return Comparison(name, 0.0, 0.0, True)
    err = (out64 - truth64)[finite].abs()
    own = 0.0 if same is None else (same.detach().double().cpu() - truth64)[finite].abs().max().item()
    scale = max(1.0, truth64[finite].abs().max().item())
    bound = 2 * own + ATOL[dtype] * scale
    error = err.max().item()
    if error <= bound:
        return Comparison(name, error, bound, True)
    worst = int(err.argmax())
    return Comparison(
        name,
        error,
        bound,
        False,
        f"max error {error:.3e} > bound {bound:.3e} (PyTorch's own {dtype} error {own:.3e}, scale "
        f"{scale:.3g}); worst at flat finite index {worst}: got {out64[finite][worst].item():.6g}, "
        f"reference {truth64[finite][worst].item():.6g}",
    )


# --------------------------------------------------------------------------------------------------
# host reads of tensor values (syncs), counted on any device
# --------------------------------------------------------------------------------------------------
# ATen ops that read device values back to the host (on CUDA: a stream synchronisation), seen by a
# dispatch mode on CPU as on GPU. Some check their result on the host inside the op itself (eigh's
# info check, nonzero's output size), so the op is counted, not the read inside it.
SYNCING_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), float(t), int(t), bool(t), t.tolist() element by element
        "aten::is_nonzero",  # if tensor:
        "aten::equal",  # torch.equal
        "aten::allclose",
        "aten::nonzero",  # also boolean indexing t[mask], torch.where(cond) with one argument
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::_linalg_check_errors",
        "aten::_linalg_eigh",
        "aten::linalg_eigh",  # LAPACK/cuSOLVER info check
        "aten::bincount",
        "aten::histc",
        "aten::_assert_scalar",
    }
)


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` counts the ops in :data:`SYNCING_OPS` run inside the block
    (``c.count``; ``c.events`` names each with the Python line that asked for it).

    Ops reading tensors in ``ignore`` are not counted: e.g. an optimiser's step counters, which torch
    keeps on the host on purpose. Also ``aten::repeat_interleave`` without ``output_size`` and
    boolean-mask indexing are caught. ``Tensor.tolist()`` and
    ``.numpy()`` read CPU memory without dispatching an op: on CPU they are invisible (on CUDA they
    copy to the host, ``aten::_to_copy``, which this counter does not see on CPU either)."""

    def __init__(self, ignore: tuple[torch.Tensor, ...] = ()):
        self.ignore = ignore
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def __enter__(self) -> HostSyncCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                if name in SYNCING_OPS or _data_dependent(name, args, kwargs or {}):
                    if not any(isinstance(a, torch.Tensor) and any(a is t for t in counter.ignore) for a in args):
                        counter.events.append(f"{func} at {_caller()}")
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _data_dependent(name: str, args: tuple, kwargs: dict) -> bool:
    """Ops whose output size depends on values: boolean-mask indexing (``t[mask]``, ``t[mask] = v``, a
    ``nonzero`` inside the op) and ``repeat_interleave`` without ``output_size``."""
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None and not any(isinstance(a, int) for a in args[2:])
    return False


def _caller() -> str:
    """The innermost frame of this project's code (else the innermost non-torch frame)."""
    import traceback

    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if "/e2pa" in frame.filename and "testing.py" not in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"
