"""e2pa: energy-guided multi-modality MRI fusion — layers, network, data, training, inference.

The layers and the network load on first use (``from e2pa import E2PANet``), so that the command
line and ``e2pa.data`` start without importing torch and MONAI.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "EHF": "model.layers",
    "ESA": "model.layers",
    "EHFEnergies": "model.layers",
    "ESADetails": "model.layers",
    "CohortEnergyLoss": "model.losses",
    "E2PALoss": "model.losses",
    "regions_to_classes": "model.targets",
    "E2PAEnergies": "model.network",
    "E2PANet": "model.network",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
