"""Baselines with E2PANet's interface, so the same training, inference and evaluation code runs them.

``SegResNetBaseline``: MONAI's SegResNet (Myronenko 2018, the BraTS 2018 winner) with early fusion —
the modalities are input channels; an absent modality is zero-filled (the usual way to run a
4-channel network with missing inputs). It has no energies.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_modality_mask
from .configurable import Configurable
from .layers import zero_absent


class SegResNetBaseline(Configurable, nn.Module):
    """``forward(x [B, M, *S], modality_mask=None, target=None, return_energies=False)`` → logits
    ``[B, out_channels, *S]`` (``(logits, None)`` with ``return_energies``: there are none)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2"),
        init_filters: int = 8,
        blocks_down: tuple[int, ...] = (1, 2, 2, 4),
        dropout_prob: float | None = None,
    ):
        super().__init__()
        from monai.networks.nets import SegResNet

        if in_channels != len(modalities):
            raise ValueError(
                f"SegResNetBaseline: in_channels ({in_channels}) must equal the number of modalities "
                f"({len(modalities)})"
            )
        if isinstance(init_filters, bool) or not isinstance(init_filters, int) or init_filters < 8 or init_filters % 8:
            # MONAI's SegResNet normalises with GroupNorm(8 groups): anything else fails deep inside it
            raise ValueError(
                f"SegResNetBaseline: init_filters must be a positive multiple of 8 (SegResNet's "
                f"GroupNorm has 8 groups); got {init_filters!r}"
            )
        self._config = dict(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            modalities=list(modalities),
            init_filters=init_filters,
            blocks_down=list(blocks_down),
            dropout_prob=dropout_prob,
        )
        self.num_modalities = len(modalities)
        self.net = SegResNet(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            blocks_down=tuple(blocks_down),
            blocks_up=(1,) * (len(blocks_down) - 1),
            dropout_prob=dropout_prob,
        )
        # SegResNet halves the grid len(blocks_down) - 1 times
        self.features = tuple(init_filters * 2**i for i in range(len(blocks_down)))

    def forward(
        self,
        x: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        return_energies: bool = False,
        validate: bool = True,
    ):
        mask = check_modality_mask(modality_mask, x.shape[0], self.num_modalities, x.device, validate=validate)
        logits = self.net(zero_absent(x, None if modality_mask is None else mask))
        return (logits, None) if return_energies else logits
