"""E2PANet: per-modality encoders, EHF fusion at every level, ESA on chosen levels, a U-Net decoder.

Input ``x [B, in_channels, *S]`` with the channels of modality m in the m-th block of
``in_channels / M`` channels (``M = len(modalities)``; BraTS: one channel each, in the datalist's
order); output logits ``[B, out_channels, *S]`` (BraTS: sigmoid TC, WT, ET). Every ablation switch
(issue #9) is a constructor argument; the cohort loss is switched off in the loss (``lambda_ehf=0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UnetOutBlock, UnetUpBlock
from torch.utils.checkpoint import checkpoint

import e2pa_kernels

from ..checks import check_choice, check_finite_float, check_modality_mask, check_positive_int, check_spatial_dims
from .configurable import Configurable
from .layers import EHF, ESA, ESA_BASES, FUSIONS, PRIORS, SCORE_NORMS, EHFEnergies, zero_absent
from .targets import resize_labels

NORMS = {"instance": ("instance", {"affine": True}), "batch": "batch"}
ACTIVATION = ("leakyrelu", {"negative_slope": 0.01})
# Bounds for configs (they may come from untrusted checkpoints): generous for real use, but refuse
# a config that would allocate absurd amounts of memory just by being built.
MAX_LEVELS, MAX_FEATURES, MAX_MODALITIES, MAX_CLASSES, MAX_STEPS, MAX_CHANNELS = 8, 2048, 32, 256, 64, 256


@dataclass
class E2PAEnergies:
    """Everything the fusion explains, per forward pass.

    levels         one :class:`EHFEnergies` per level, finest (full resolution) first
    esa            ESA energy ``[B]`` per ESA level index (non-negative); empty when ESA is off
    modality_mask  ``[B, M]`` bool, the mask the pass ran with (True = available)
    """

    levels: tuple[EHFEnergies, ...]
    esa: dict[int, torch.Tensor]
    modality_mask: torch.Tensor


class _ModalityEncoderStage(nn.Module):
    """M independent residual conv stages run as grouped convolutions (``groups=M``): one conv call
    for all modalities. ``[B, M·C_in, *S]`` → ``[B, M·C_out, *S/stride]``; channel-wise norms
    (instance, batch) keep the modalities independent."""

    def __init__(
        self, spatial_dims: int, num_modalities: int, in_per_modality: int, out_per_modality: int, stride: int, norm
    ):
        super().__init__()
        cin, cout = num_modalities * in_per_modality, num_modalities * out_per_modality
        # bias=False: every conv here feeds a channel-wise norm that removes a constant anyway (and a
        # bias with zero gradient only collects optimiser noise)
        grouped = dict(spatial_dims=spatial_dims, groups=num_modalities, norm=norm, bias=False)
        self.conv1 = Convolution(in_channels=cin, out_channels=cout, strides=stride, act=ACTIVATION, **grouped)
        self.conv2 = Convolution(in_channels=cout, out_channels=cout, act=None, **grouped)
        self.residual = Convolution(
            in_channels=cin, out_channels=cout, strides=stride, kernel_size=1, act=None, **grouped
        )
        self.activation = nn.LeakyReLU(ACTIVATION[1]["negative_slope"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2(self.conv1(x)) + self.residual(x))


def _int_sequence(name: str, value: object, *, low: int, high: int, min_len: int, max_len: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        raise ValueError(f"E2PANet: {name} must be a list/tuple of {min_len} to {max_len} ints; got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise ValueError(f"E2PANet: {name} entries must be ints in [{low}, {high}]; got {value!r}")
    return list(value)


def _bounded_int(name: str, value: object, high: int, minimum: int = 1) -> int:
    check_positive_int("E2PANet", name, value, minimum)
    if value > high:
        raise ValueError(f"E2PANet: {name} must be <= {high}; got {value}")
    return value


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check every E2PANet argument (types, ranges, consistency) without building anything; returns
    the JSON-serialisable normalised config (sequences as lists). Raises TypeError/ValueError naming
    the argument."""
    cfg = dict(config)
    cfg["spatial_dims"] = check_spatial_dims("E2PANet", cfg["spatial_dims"])
    modalities = cfg["modalities"]
    if (
        not isinstance(modalities, (list, tuple))
        or not 1 <= len(modalities) <= MAX_MODALITIES
        or not all(isinstance(m, str) and m for m in modalities)
        or len(set(modalities)) != len(modalities)
    ):
        raise ValueError(
            f"E2PANet: modalities must be 1 to {MAX_MODALITIES} distinct non-empty names; got {modalities!r}"
        )
    cfg["modalities"] = list(modalities)
    cfg["in_channels"] = _bounded_int("in_channels", cfg["in_channels"], MAX_CHANNELS)
    if cfg["in_channels"] % len(modalities):
        raise ValueError(
            f"E2PANet: in_channels ({cfg['in_channels']}) must be a multiple of the number of "
            f"modalities ({len(modalities)}): each modality owns in_channels / M input channels"
        )
    cfg["out_channels"] = _bounded_int("out_channels", cfg["out_channels"], MAX_CHANNELS)
    cfg["features"] = _int_sequence(
        "features", cfg["features"], low=1, high=MAX_FEATURES, min_len=1, max_len=MAX_LEVELS
    )
    levels = len(cfg["features"])
    cfg["num_classes"] = _bounded_int("num_classes", cfg["num_classes"], MAX_CLASSES, minimum=2)
    cfg["fusion"] = check_choice("E2PANet", "fusion", cfg["fusion"], FUSIONS)
    cfg["esa_levels"] = _int_sequence(
        "esa_levels", cfg["esa_levels"], low=-levels, high=levels - 1, min_len=0, max_len=levels
    )
    chosen = [level % levels for level in cfg["esa_levels"]]
    if len(set(chosen)) != len(chosen):
        raise ValueError(
            f"E2PANet: esa_levels name a level twice (negative indices count from the deepest): {cfg['esa_levels']!r}"
        )
    cfg["esa_rank"] = _bounded_int("esa_rank", cfg["esa_rank"], MAX_FEATURES)
    too_narrow = [level for level in chosen if cfg["features"][level] < cfg["esa_rank"]]
    if too_narrow:
        raise ValueError(
            f"E2PANet: esa_rank ({cfg['esa_rank']}) must not exceed the features of an ESA level; "
            f"levels {too_narrow} have {[cfg['features'][level] for level in too_narrow]}"
        )
    cfg["esa_basis"] = check_choice("E2PANet", "esa_basis", cfg["esa_basis"], ESA_BASES)
    cfg["esa_moment_weight"] = check_finite_float("E2PANet", "esa_moment_weight", cfg["esa_moment_weight"])
    for name in ("temperature", "prior_temperature", "beta"):
        cfg[name] = check_finite_float("E2PANet", name, cfg[name], positive=True)
    cfg["steps"] = _bounded_int("steps", cfg["steps"], MAX_STEPS)
    cfg["norm"] = check_choice("E2PANet", "norm", cfg["norm"], tuple(NORMS))
    cfg["fusion_norm"] = check_choice("E2PANet", "fusion_norm", cfg["fusion_norm"], SCORE_NORMS)
    cfg["fusion_prior"] = check_choice("E2PANet", "fusion_prior", cfg["fusion_prior"], PRIORS)
    if cfg["fusion_prior"] == "agreement" and cfg["fusion_norm"] != "rms":
        raise ValueError("E2PANet: fusion_prior='agreement' needs fusion_norm='rms'")
    if not isinstance(cfg["use_checkpointing"], bool):
        raise TypeError(f"E2PANet: use_checkpointing must be a bool; got {type(cfg['use_checkpointing']).__name__}")
    return cfg


class E2PANet(Configurable, nn.Module):
    """Energy-induced explicit propagation and alignment network (``docs/method.md``).

    Per level l (``L = len(features)``, level 0 at full resolution, each deeper level halves every
    spatial axis): M independent encoder stages (grouped convolutions), an :class:`EHF` fusing the
    ``[B, M, features[l], *S_l]`` modality features into ``F^(l)`` (from ``ψ(F^(l-1))`` at l > 0), an
    :class:`ESA` energy on ``esa_levels``; a U-Net decoder (MONAI ``UnetUpBlock``) on ``F^(0…L-1)``.

    Args:
        spatial_dims: 2 or 3. in_channels: input channels, a multiple of ``M = len(modalities)``.
        out_channels: output logits. modalities: modality names (M = len).
        features: channels per modality and of the fused feature at each level.
        num_classes: ``K`` of the energy heads (BraTS: 4, see :func:`e2pa.model.targets.regions_to_classes`).
        fusion: ``"energy"`` (EHF) | ``"mean"`` | ``"concat"`` (implicit baselines).
        esa_levels: level indices with ESA (negative = from the deepest); ``()`` = ESA off.
        esa_rank, esa_basis, esa_moment_weight: ``r``, ``"eigh"|"learned"``, ``λ_mom`` of ESA.
        temperature, prior_temperature, steps: ``T``, ``τ`` and the propagation steps of EHF.
        beta: sharpness of the propagation; level l uses ``β_l = beta / √C_l`` (the modern-Hopfield
            scaling: scores ⟨x_m, ξ⟩ grow with the channel count C_l, so a fixed β would make the
            modality weights all-or-nothing at the wide, deep levels).
        norm: ``"instance"`` (default: every sample and modality keeps its own statistics) | ``"batch"``
            (statistics mix samples, so a zeroed absent modality shifts that modality's statistics).
        fusion_norm: ``"rms"`` (default) | ``"none"``: EHF's ``score_norm`` (docs/method.md, "normalised
            fusion"). A checkpoint written before the option existed is rebuilt with ``"none"``
            (:func:`e2pa.model.registry.checkpoint_model_config`).
        fusion_prior: ``"energy"`` (default) | ``"agreement"``: EHF's ``prior`` (needs ``fusion_norm="rms"``).
        use_checkpointing: recompute encoder stages and decoder blocks in backward (activation
            checkpointing) to save memory; with ``norm="batch"`` the recomputation updates the
            running statistics a second time.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        modalities: tuple[str, ...] = ("flair", "t1", "t1ce", "t2"),
        features: tuple[int, ...] = (16, 32, 64, 128),
        num_classes: int = 4,
        fusion: str = "energy",
        esa_levels: tuple[int, ...] = (-1,),
        esa_rank: int = 8,
        esa_basis: str = "eigh",
        esa_moment_weight: float = 1.0,
        temperature: float = 1.0,
        prior_temperature: float = 1.0,
        beta: float = 1.0,
        steps: int = 3,
        norm: str = "instance",
        use_checkpointing: bool = False,
        fusion_norm: str = "rms",
        fusion_prior: str = "energy",
    ):
        super().__init__()
        self._config = validate_config(
            dict(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                modalities=modalities,
                features=features,
                num_classes=num_classes,
                fusion=fusion,
                esa_levels=esa_levels,
                esa_rank=esa_rank,
                esa_basis=esa_basis,
                esa_moment_weight=esa_moment_weight,
                temperature=temperature,
                prior_temperature=prior_temperature,
                beta=beta,
                steps=steps,
                norm=norm,
                use_checkpointing=use_checkpointing,
                fusion_norm=fusion_norm,
                fusion_prior=fusion_prior,
            )
        )
        cfg = self._config
        self.spatial_dims = cfg["spatial_dims"]
        self.in_channels = cfg["in_channels"]
        self.num_modalities = len(cfg["modalities"])
        self.features = tuple(cfg["features"])
        self.fusion = cfg["fusion"]
        self.use_checkpointing = cfg["use_checkpointing"]
        norm_layer = NORMS[cfg["norm"]]
        levels = len(self.features)
        per_modality_in = (self.in_channels // self.num_modalities,) + self.features[:-1]

        self.encoder = nn.ModuleList(
            _ModalityEncoderStage(
                self.spatial_dims, self.num_modalities, cin, cout, stride=1 if level == 0 else 2, norm=norm_layer
            )
            for level, (cin, cout) in enumerate(zip(per_modality_in, self.features))
        )
        self.fusion_levels = nn.ModuleList(
            EHF(
                self.spatial_dims,
                channels,
                self.num_modalities,
                cfg["num_classes"],
                temperature=cfg["temperature"],
                prior_temperature=cfg["prior_temperature"],
                beta=cfg["beta"] / math.sqrt(channels),
                steps=cfg["steps"],
                previous_channels=self.features[level - 1] if level > 0 else None,
                fusion=self.fusion,
                score_norm=cfg["fusion_norm"],
                prior=cfg["fusion_prior"],
            )
            for level, channels in enumerate(self.features)
        )
        self.esa = nn.ModuleDict(
            {
                str(level % levels): ESA(
                    self.features[level % levels],
                    cfg["esa_rank"],
                    basis=cfg["esa_basis"],
                    moment_weight=cfg["esa_moment_weight"],
                )
                for level in cfg["esa_levels"]
            }
        )
        # decoder[i] lifts level L-1-i to level L-2-i and merges that level's fused skip feature
        self.decoder = nn.ModuleList(
            UnetUpBlock(
                self.spatial_dims,
                self.features[level + 1],
                self.features[level],
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm_layer,
                act_name=ACTIVATION,
            )
            for level in reversed(range(levels - 1))
        )
        self.output = UnetOutBlock(self.spatial_dims, self.features[0], cfg["out_channels"])

    # ---------------------------------------------------------------------------------------------
    # forward
    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        return_energies: bool = False,
        validate: bool = True,
    ):
        """Segment.

        Args:
            x: ``[B, in_channels, *S]``, every spatial size divisible by ``2^(L-1)``.
            modality_mask: ``[B, M]`` bool, True = available (``[M]``/``[1, M]`` for the whole batch, as
                with ``sliding_window_inference(..., modality_mask=mask)``); None = all available.
                Absent modalities are zeroed at the input and have no influence.
            target: ``[B, *S]`` int64 classes in ``[0, num_classes)`` (see ``regions_to_classes``) for the
                heads' deep-supervision ce; needs ``return_energies=True``.
            return_energies: also return an :class:`E2PAEnergies` (with the ESA energies).
            validate: check the values of modality_mask (a modality per sample) and target (classes in
                range) here, once (host reads; under ``torch.compile`` asynchronous asserts, see
                :func:`e2pa_kernels.check_values`); the layers inside never read values back. A
                training loop whose masks and labels are valid by construction passes False.

        Returns:
            logits ``[B, out_channels, *S]``, or ``(logits, E2PAEnergies)``.
        """
        return self._run(x, modality_mask, target, return_energies, with_esa=return_energies, validate=validate)

    def predict_with_energy_maps(
        self, x: torch.Tensor, modality_mask: torch.Tensor | None = None, validate: bool = True
    ) -> dict[str, torch.Tensor]:
        """Full-resolution prediction and level-0 energy maps, as a dict of ``[B, ·, *S]`` tensors (a
        sliding-window predictor: ``sliding_window_inference(x, roi, sw, net.predict_with_energy_maps)``).

        Keys: ``logits [B, out, *S]``; ``modality_energies [B, M, *S]`` (free energy of each modality;
        +inf where absent); ``modality_weights [B, M, *S]`` (each modality's share of the fused feature);
        ``fused_energy [B, 1, *S]`` (Hopfield energy of the final fused state). Needs ``fusion="energy"``.
        """
        if self.fusion != "energy":
            raise ValueError(
                f"E2PANet.predict_with_energy_maps: energy maps need fusion='energy'; this network "
                f"uses fusion={self.fusion!r} (an implicit baseline without a fused energy)"
            )
        logits, energies = self._run(x, modality_mask, None, True, with_esa=False, validate=validate)
        finest = energies.levels[0]
        return {
            "logits": logits,
            "modality_energies": finest.energies,
            "modality_weights": finest.weights,
            "fused_energy": finest.fused_energy.unsqueeze(1),
        }

    def _run(
        self,
        x: torch.Tensor,
        modality_mask: torch.Tensor | None,
        target: torch.Tensor | None,
        return_energies: bool,
        with_esa: bool,
        validate: bool,
    ):
        self._check_input(x)
        batch, spatial = x.shape[0], x.shape[2:]
        if target is not None:
            if not return_energies:
                raise ValueError(
                    "E2PANet: target only feeds the heads' ce inside the returned energies; "
                    "pass return_energies=True with it"
                )
            if target.is_floating_point() or target.shape != (batch, *spatial):
                raise ValueError(
                    f"E2PANet: target must be integer class indices [B, *S] = {[batch, *spatial]} "
                    f"(see regions_to_classes); got {target.dtype} {list(target.shape)}"
                )
            if validate:
                classes = self.fusion_levels[0].num_classes
                ok = (target >= 0) & (target < classes)
                summary = f"E2PANet: target values must lie in [0, {classes - 1}] (num_classes = {classes})"
                e2pa_kernels.check_values(ok, summary, lambda: f"{summary}; found {target[~ok].unique()[:8].tolist()}")
        mask = check_modality_mask(modality_mask, batch, self.num_modalities, x.device, validate=validate)
        # None when no mask was given: the layers then skip their zeroing copies (nothing is absent)
        given_mask = None if modality_mask is None else mask
        # zeroed at the input too, so an absent modality's (possibly NaN) voxels never enter its encoder
        features = zero_absent(x.view(batch, self.num_modalities, -1, *spatial), given_mask).view_as(x)

        fused_levels, level_energies, esa_energies = [], [], {}
        for level, (stage, fuse) in enumerate(zip(self.encoder, self.fusion_levels)):
            features = self._checkpointed(stage, features)
            per_modality = features.view(batch, self.num_modalities, -1, *features.shape[2:])
            level_target = None if target is None else resize_labels(target, per_modality.shape[3:])
            previous = fused_levels[-1] if fused_levels else None
            out = fuse(
                per_modality,
                given_mask,
                previous=previous,
                target=level_target,
                return_energies=return_energies,
                validate=False,
            )
            fused = out[0] if return_energies else out
            if return_energies:
                level_energies.append(out[1])
            if with_esa and str(level) in self.esa:
                esa_energies[level] = self.esa[str(level)](per_modality, fused, given_mask, validate=False)
            fused_levels.append(fused)

        decoded = fused_levels[-1]
        for block, skip in zip(self.decoder, reversed(fused_levels[:-1])):
            decoded = self._checkpointed(block, decoded, skip)
        logits = self.output(decoded)
        if not return_energies:
            return logits
        return logits, E2PAEnergies(levels=tuple(level_energies), esa=esa_energies, modality_mask=mask)

    def _checkpointed(self, module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.use_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def _check_input(self, x: object) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"E2PANet: x must be a floating-point torch.Tensor [B, {self.in_channels}, *S]; got "
                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"E2PANet: x must have shape [B, in_channels={self.in_channels}, *S] with "
                f"{self.spatial_dims} spatial axes; got {list(x.shape)}"
            )
        factor = 2 ** (len(self.features) - 1)
        if any(size % factor for size in x.shape[2:]):
            raise ValueError(
                f"E2PANet: every spatial size of x must be divisible by 2^(L-1) = {factor} "
                f"(L = {len(self.features)} levels); got {list(x.shape[2:])} — pad or crop the input "
                f"(e.g. monai.transforms.DivisiblePad(k={factor}))"
            )
