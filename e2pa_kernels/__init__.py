"""e2pa_kernels: Triton-accelerated ops for energy-guided multi-modality fusion.

Ops (each with a Triton path, a memory-lean PyTorch path and a plain-autograd reference):
``free_energy``, ``energy_propagate``, ``factor_align`` (+ ``factor_basis``, ``orthonormalize``), and
``energy_fusion``: one EHF level (ops 1 and 2 with the masking around them) as a single node whose
backward writes the x-sized gradient once, and ``normalized_fusion``: EHF's default normalised level
(RMS-normalised features through it, gated shares mixing the raw features) as one lean node.
``symeig``: a float64 Jacobi eigensolver kernel that reads nothing back to the host (``factor_basis`` runs it
on the triton backend).
Backend choice: :func:`select_backend`, overridden by ``E2PA_BACKEND`` or :func:`use_backend`.
Importing this package never touches CUDA.
"""

import os as _os

# Triton 3.9 warns when this is unset; "1" keeps its current default (fused multiply-add on).
_os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from . import reference  # noqa: E402
from ._runtime import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    interpreter_enabled,
    requested_backend,
    select_backend,
    use_backend,
)
from ._validate import check_values  # noqa: E402
from .energy_fusion import EnergyFusion, energy_fusion, normalized_fusion  # noqa: E402
from .energy_propagate import energy_propagate  # noqa: E402
from .factor_align import factor_align, factor_basis, orthonormalize  # noqa: E402
from .free_energy import free_energy  # noqa: E402

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "EnergyFusion",
    "check_values",
    "energy_fusion",
    "energy_propagate",
    "factor_align",
    "factor_basis",
    "free_energy",
    "interpreter_enabled",
    "normalized_fusion",
    "orthonormalize",
    "reference",
    "requested_backend",
    "select_backend",
    "use_backend",
]
