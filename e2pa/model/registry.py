"""Build any e2pa network from a configuration dict (as stored in checkpoints), validating it first.

A configuration is the network's constructor arguments plus ``"architecture"`` (default
``"e2pa"``); unknown architectures, keys, types and values are rejected before anything is built,
so a checkpoint from an untrusted source cannot make us construct something unexpected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .baselines import SegResNetBaseline
from .network import E2PANet

ARCHITECTURES: dict[str, type[nn.Module]] = {"e2pa": E2PANet, "segresnet": SegResNetBaseline}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    if not isinstance(config, Mapping):
        raise TypeError(f"model configuration must be a mapping; got {type(config).__name__}")
    kwargs = dict(config)
    architecture = kwargs.pop("architecture", "e2pa")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"model configuration: unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[architecture].from_config(kwargs)


def checkpoint_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model configuration read from a checkpoint, with the defaults of the formulation it was trained
    under: an E2PANet configuration without ``fusion_norm`` predates the normalised fusion and was
    trained with raw features (``"none"``)."""
    config = dict(config)
    if config.get("architecture", "e2pa") == "e2pa" and "fusion_norm" not in config:
        config["fusion_norm"] = "none"
    return config


def model_config(model: nn.Module) -> dict[str, Any]:
    """The configuration :func:`build_model` rebuilds ``model`` from."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return {"architecture": name, **model.config}
    raise TypeError(f"not an e2pa network: {type(model).__name__}")
