"""Argument checks shared by the whole package: one clear error naming the owner, the argument and
what was expected, instead of a failure deep inside torch or MONAI.

Every ``check_*`` returns the checked value (normalised where it says so), so a constructor reads
``self.steps = check_positive_int(owner, "steps", steps)``. :func:`check_config_keys` is the gate
of every ``from_config`` (configurations may come from untrusted checkpoints). Only
:func:`check_modality_mask` needs torch; it imports it when called, so this module stays light.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def check_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` is a Python int ``>= minimum`` (bools rejected); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}; got {value}")
    return value


def check_finite_float(owner: str, name: str, value: object, *, positive: bool = False) -> float:
    """``value`` is a finite Python number (``> 0`` when ``positive``, else ``>= 0``); returns a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{owner}: {name} must be a finite {'positive' if positive else 'non-negative'} number; got {value!r}"
        )
    return value


def check_spatial_dims(owner: str, value: object) -> int:
    """``value`` is 2 or 3 (an int); returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in (2, 3):
        raise ValueError(f"{owner}: spatial_dims must be 2 or 3; got {value!r}")
    return value


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` is one of the strings ``choices``; returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_config_keys(cls: type, config: object) -> dict[str, Any]:
    """``config`` is a mapping whose keys are all constructor arguments of ``cls``; returns a dict copy.

    The check of every ``from_config``: unknown keys are refused before anything is built (missing
    keys take the constructor's defaults, values are the constructor's to check)."""
    owner = f"{cls.__name__}.from_config"
    if not isinstance(config, Mapping):
        raise TypeError(f"{owner}: config must be a mapping; got {type(config).__name__}")
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(map(repr, set(config) - allowed))
    if unknown:
        raise ValueError(f"{owner}: unknown config keys {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return dict(config)


def check_modality_mask(
    modality_mask: torch.Tensor | None, batch: int, num_modalities: int, device: torch.device, *, validate: bool = True
) -> torch.Tensor:
    """Validate a modality mask and return it as ``[B, M]`` bool on ``device``.

    ``None`` means every modality is available. A ``[M]`` or ``[1, M]`` mask is shared by the whole
    batch: sliding-window inference batches windows of one case together, so the predictor cannot be
    handed a per-window mask. Every sample must keep at least one modality: a check of the mask's
    values (one host read, see :func:`e2pa_kernels.check_values`), run when ``validate`` — at the
    public entry points; the network's layers and the trainer, whose masks are checked or built
    non-empty upstream, pass ``validate=False``.
    """
    import torch

    import e2pa_kernels

    if modality_mask is None:
        return torch.ones(batch, num_modalities, dtype=torch.bool, device=device)
    if not isinstance(modality_mask, torch.Tensor):
        raise TypeError(
            f"modality_mask must be a bool torch.Tensor of shape [B, M]; got {type(modality_mask).__name__}"
        )
    if modality_mask.dtype != torch.bool:
        raise ValueError(f"modality_mask must have dtype bool (True = modality available); got {modality_mask.dtype}")
    shape = tuple(modality_mask.shape)
    if shape not in ((batch, num_modalities), (1, num_modalities), (num_modalities,)):
        raise ValueError(
            f"modality_mask must have shape [B, M] = [{batch}, {num_modalities}] "
            f"(or [1, {num_modalities}] / [{num_modalities}], shared by the batch); got {list(shape)}"
        )
    mask = modality_mask.to(device).reshape(-1, num_modalities).expand(batch, num_modalities)
    if validate:
        present = mask.any(dim=1)
        e2pa_kernels.check_values(
            present,
            "modality_mask: a sample has no available modality (every entry False)",
            lambda: (
                f"modality_mask: sample(s) {(~present).nonzero().flatten().tolist()} have no available modality "
                f"(every entry False); each sample needs at least one"
            ),
        )
    return mask
