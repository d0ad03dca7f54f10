"""The implementations an e2pa op (or layer) is compared across.

- ``ours``:      the public op on its ``auto`` backend (Triton on CUDA, the memory-lean torch path on CPU);
- ``reference``: the public op on the ``reference`` backend, i.e. the plain-autograd oracle, eager;
- ``compile``:   ``torch.compile(reference, dynamic=False)``: the best PyTorch can do with the same math;
- ``torch``:     the memory-lean torch path, asked for explicitly (CPU runs only).
"""

from __future__ import annotations

import torch
import torch._functorch.config

import e2pa_kernels

from .registry import Case, Inputs, Provider


def _tensors(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return tuple(v for v in inputs.values() if isinstance(v, torch.Tensor))


def backend(name: str, backend_name: str, devices: tuple[str, ...] = ("cpu", "cuda")) -> Provider:
    """``case.call`` inside ``e2pa_kernels.use_backend(backend_name)``."""

    def build(case: Case):
        def call(**inputs):
            with e2pa_kernels.use_backend(backend_name):
                return case.call(**inputs)

        return call

    def identity(case: Case, inputs: Inputs) -> str:
        with e2pa_kernels.use_backend(backend_name):
            return f"backend:{e2pa_kernels.select_backend(*_tensors(inputs))}"

    return Provider(name=name, build=build, identity=identity, devices=devices)


def compiled_reference() -> Provider:
    def build(case: Case):
        # A fresh Dynamo cache per (case, dtype): compiling one reference function at every size and
        # dtype of a sweep would exceed Dynamo's recompile limit, after which it silently runs eager.
        torch._dynamo.reset()
        # The bwd mode replays one backward (retain_graph), which a backward with donated buffers
        # refuses. Donation only lets the backward write into saved buffers it consumes (a little
        # peak memory, no kernel time), so the compiled baseline is built without it.
        torch._functorch.config.donated_buffer = False
        return torch.compile(case.reference, dynamic=False)

    return Provider(name="compile", build=build, identity=lambda case, inputs: "compile:reference")


OP_PROVIDERS = (
    backend("ours", "auto"),
    backend("reference", "reference"),
    compiled_reference(),
    backend("torch", "torch", devices=("cpu",)),
)
