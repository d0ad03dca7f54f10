"""What the GPU compile checks compile: one kernel variant a launcher can pick (see ``_compile``).

Separate from ``_compile`` so that the op modules can declare their variants without importing
the compile tooling (and ``python -m e2pa_kernels._compile`` runs a module not yet imported).

How an op module lists its variants (``gpu_compile_specs()``): it runs the very function its launcher
builds the kernel's keyword arguments with (constexprs, ``num_warps``, ``maxnreg``) over every input the
launcher accepts -- dtypes, sizes up to the Triton limits, which optional inputs are given, 32- or 64-bit
offsets -- and keeps each distinct variant once. Flags that only add code when True (an optional input's
loads and math: ``HAS_BIAS``, ``HAS_MASK``, ...) are not compiled at every value: of variants that differ
only in such flags, :func:`heaviest` keeps the one with every flag set that the launcher sets together with
the rest of that variant (the most code, the most live values). ``tests/kernels/test_gpu_compile.py``
records real launcher calls and checks each is :func:`covers`-ed by a listed variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import Any

# the options a launcher passes with the constexprs (Triton launch options, not kernel arguments)
LAUNCH_OPTIONS = ("num_warps", "maxnreg")


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

    def key(self, without: Collection[str] = ()) -> tuple:
        """What makes the cubin (kernel, argument types, constexprs, options), less the constexprs ``without``."""
        return (
            self.kernel.fn.__qualname__ if hasattr(self.kernel, "fn") else repr(self.kernel),
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, v) for k, v in self.constexprs.items() if k not in without)),
            self.num_warps,
            self.maxnreg,
        )


def split_meta(meta: Mapping[str, Any]) -> tuple[dict[str, Any], int, int | None]:
    """A launcher's keyword arguments -> (constexprs, num_warps, maxnreg)."""
    constexprs = {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS}
    return constexprs, int(meta["num_warps"]), meta.get("maxnreg")


def spec_label(op: str, name: str, ty: str, constexprs: Mapping[str, Any], flags: Collection[str], **extra) -> str:
    """``op.name dtype`` and the constexprs: sizes as ``NAME=value``, then the other booleans by name where True
    (``ONE_PASS`` -> ``one-pass``, ``INT64`` -> ``int64``, ``HAS_XI0`` -> ``xi0``); the covered ``flags``
    (True in every listed variant but a few) only where False, as ``!NAME``; then ``extra`` (warps, ...)."""
    parts = [f"{op}.{name}", ty]
    parts += [f"{k}={v}" for k, v in constexprs.items() if not isinstance(v, bool)]
    for k, v in constexprs.items():
        if isinstance(v, bool):
            if k in flags:
                parts += [] if v else [f"!{k}"]
            elif v:
                parts.append(k.removeprefix("HAS_").lower().replace("_", "-"))
    parts += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return " ".join(parts)


def heaviest(specs: Iterable[KernelSpec], flags: Collection[str]) -> list[KernelSpec]:
    """The variants to compile: ``specs`` deduplicated, and of those that differ only in ``flags`` (booleans
    whose True value only adds code: the loads and math of an optional input) the one with each flag at the
    largest value the group holds -- which must itself be in the group (the launcher sets those flags
    independently of the rest). Order: first appearance."""
    groups: dict[tuple, list[KernelSpec]] = {}
    for s in specs:
        groups.setdefault(s.key(flags), []).append(s)
    chosen = []
    for members in groups.values():
        top = {f: max(bool(m.constexprs[f]) for m in members) for f in flags if f in members[0].constexprs}
        match = [m for m in members if all(bool(m.constexprs[f]) == v for f, v in top.items())]
        if not match:
            raise ValueError(f"no variant with the heaviest flags {top} among {[m.label for m in members]}")
        chosen.append(match[0])
    return chosen


def covers(
    spec: KernelSpec,
    launch: KernelSpec,
    flags: Collection[str] = (),
    guarded: Mapping[str, Collection[str]] | None = None,
    widened: Collection[str] = (),
) -> bool:
    """Whether compiling ``spec`` checks what runs for ``launch`` (a launcher call, its argument types as the
    JIT specialises them): the same kernel, options and constexprs but for the covered ``flags``, where
    ``spec`` may set a flag the launch leaves False; the same argument types, except

    - arguments of a flag the launch leaves False (``guarded[flag]``: a placeholder tensor is passed, never read);
    - an integer argument the JIT turned into the constant 1 (``constexpr:1``: its value specialisation only
      folds code) against the ``i32`` the gate compiles;
    - an ``i32`` size or stride against the gate's ``i64`` with ``INT64`` (the kernel widens its offsets to
      64 bits either way), and either width of the ``widened`` arguments (used in 64-bit arithmetic only).
    """
    if spec.kernel is not launch.kernel or (spec.num_warps, spec.maxnreg) != (launch.num_warps, launch.maxnreg):
        return False
    if set(spec.constexprs) != set(launch.constexprs):
        return False
    for k, v in launch.constexprs.items():
        w = spec.constexprs[k]
        if w != v and not (k in flags and w is True and v is False):
            return False
    skip = {a for f, args in (guarded or {}).items() if launch.constexprs.get(f) is False for a in args}
    int64 = bool(launch.constexprs.get("INT64"))
    for arg, ty in launch.signature.items():
        want = spec.signature.get(arg)
        if arg in skip or ty == want:
            continue
        if ty == "constexpr:1":
            ty = "i32"
        if ty == want or (want == "i64" and ty == "i32" and (int64 or arg in widened)):
            continue
        if arg in widened and (ty, want) == ("i64", "i32"):
            continue
        return False
    return True
