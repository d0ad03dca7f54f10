"""What the GPU compile checks compile: one kernel variant a launcher can pick (see ``_compile``).

Separate from ``_compile`` so that the op modules can declare their variants without importing
the compile tooling (and ``python -m e2pa_kernels._compile`` runs a module not yet imported).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compiled variant: ``signature`` maps argument names to Triton types (``*fp32``, ``i32``,
    ``fp32``, ``constexpr``); ``aligned`` names the arguments assumed divisible by 16 (pointers and
    sizes/strides), as the JIT specialises them at run time for the usual aligned tensors. ``maxnreg``:
    the register cap the launcher passes (Triton's ``maxnreg`` launch option), None where it passes none."""

    label: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    aligned: tuple[str, ...] = ()
    maxnreg: int | None = None

    @property
    def options(self) -> dict[str, int]:
        """The compile options the launcher passes with this variant (``num_warps``, ``maxnreg``)."""
        return {"num_warps": self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg is not None else {})}
