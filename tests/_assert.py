"""Assert the suite's comparison rule (:mod:`e2pa_kernels.testing`, shared with the benchmark gates)."""

from __future__ import annotations

import torch

from e2pa_kernels.testing import compare_to_reference


def assert_matches_reference(
    name: str, out: torch.Tensor, truth: torch.Tensor, torch_same: torch.Tensor | None, dtype: torch.dtype | None = None
) -> None:
    result = compare_to_reference(name, out, truth, torch_same, dtype)
    assert result.ok, result.message
