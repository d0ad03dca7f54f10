"""Where the engine runs: the one place that turns a ``--device`` setting into a ``torch.device``.

Light to import (torch is imported when a device is resolved): the command line names
:class:`DeviceError` among the errors it reports in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeviceError(ValueError):
    """A device setting this machine cannot honour (e.g. ``cuda`` without CUDA); says which."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when there is one, else the CPU; any other name (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) → that device, checked to exist on this machine."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"--device {name}: not a device name ({error}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
