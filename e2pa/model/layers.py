"""Drop-in fusion layers: :class:`EHF` (energy-guided hierarchical fusion) and :class:`ESA`
(energy-regularised space alignment), as formulated in ``docs/method.md``.

Layout (MONAI style, channels first): per-modality features ``x [B, M, C, *S]``, a fused feature
``[B, C, *S]``, a modality mask ``[B, M]`` bool (True = available), 2-D or 3-D. Both layers call only
the public ops of :mod:`e2pa_kernels`, so the backend (Triton / memory-lean PyTorch / reference)
follows ``E2PA_BACKEND`` and :func:`e2pa_kernels.use_backend`.

A masked (absent) modality has no influence on any output or on any other input's gradient: its
features are replaced by zeros with ``torch.where`` (so NaN/inf in it cannot leak, not even through
``0 · NaN`` in a backward pass), its log-prior is ``-inf``, and it is left out of every mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

import e2pa_kernels
from e2pa_kernels.reference import rms_normalize

from ..checks import check_choice, check_finite_float, check_modality_mask, check_positive_int, check_spatial_dims

FUSIONS = ("energy", "mean", "concat")
SCORE_NORMS = ("rms", "none")
PRIORS = ("energy", "agreement")
GATE_INIT = -2.0  # sigmoid(-2) = 0.12: the normalised EHF starts 88 % masked mean
ESA_BASES = ("eigh", "learned")


def mask_view(mask: torch.Tensor, trailing_dims: int) -> torch.Tensor:
    """``[B, M]`` → ``[B, M, 1, …, 1]`` broadcastable against a tensor with ``trailing_dims`` more axes."""
    return mask.view(*mask.shape, *([1] * trailing_dims))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over available modalities: x ``[B, M, C, *S]`` (absent entries already zero), mask ``[B, M]``
    → ``[B, C, *S]`` in x's dtype."""
    count = mask.sum(dim=1).to(x.dtype)
    return x.sum(dim=1) / mask_view(count, x.dim() - 2)


def zero_absent(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x ``[B, M, C, *S]`` with absent modalities replaced by exact zeros (``where``, not a product,
    so NaN/inf there vanish from the forward and from every gradient). ``mask`` None = no mask was
    given (all available): x itself, so a full-modality step pays no copy and saves none for backward."""
    if mask is None:
        return x
    return torch.where(mask_view(mask, x.dim() - 2), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_features(owner: str, x: object, spatial_dims: int, num_modalities: int, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{owner}: x must be a floating-point torch.Tensor [B, M, C, *S]; got "
            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
        )
    if x.dim() != spatial_dims + 3 or x.shape[1] != num_modalities or x.shape[2] != channels:
        raise ValueError(
            f"{owner}: x must have shape [B, M={num_modalities}, C={channels}, *S] with {spatial_dims} "
            f"spatial axes; got {list(x.shape)}"
        )


# --------------------------------------------------------------------------------------------------
# EHF
# --------------------------------------------------------------------------------------------------
@dataclass
class EHFEnergies:
    """What one EHF level explains about its fusion (``*S`` = the level's spatial size).

    energies  ``[B, M, *S]``       free energy of each modality under the shared head (+inf where absent)
    weights   ``[B, M, *S]``       each modality's share of the fused feature (0 where absent);
                                   uniform over available modalities for ``fusion="mean"``, None for "concat"
    trace     ``[B, steps+1, *S]`` Hopfield energy E(ξ_0) … E(ξ_steps); None for the implicit baselines
    ce        ``[B, M, *S]``       per-modality cross-entropy of the head (0 where absent), when a target is given
    """

    energies: torch.Tensor
    weights: torch.Tensor | None
    trace: torch.Tensor | None
    ce: torch.Tensor | None

    @property
    def fused_energy(self) -> torch.Tensor | None:
        """``[B, *S]`` energy of the final fused state E(ξ_steps); None for the implicit baselines."""
        return None if self.trace is None else self.trace[:, -1]


class EHF(nn.Module):
    """One level of energy-guided hierarchical fusion.

    Per voxel: a linear ``K``-class head gives each modality's free energy ``E_m``; the prior
    ``a_m = -E_m/τ + log(mask_m)`` then weighs the modalities in a Hopfield energy descent
    (``energy_propagate``) that starts from ``ξ_0`` = masked mean of the modalities, or, when
    ``previous_channels`` is set, ``ψ(F^(l-1))``, a stride-2 convolution of the previous (finer)
    level's fused feature — the "hierarchical" part.

    The head is shared by all modalities: the prior compares energies *across* modalities, which is
    only meaningful if they are measured by the same function (the paper's "shared energy space").
    It also keeps the op a single ``free_energy`` call.

    ``fusion="mean"`` (masked mean) and ``fusion="concat"`` (masked concatenation + 1×1 conv) are the
    implicit baselines of the ablation: energies never reach their fused feature and they build no
    ``ψ`` (``previous`` is ignored). They still compute the heads when energies or deep-supervision
    terms are asked for, so that an ablation changes only the fusion rule, not the supervision.

    Args:
        spatial_dims: 2 or 3. in_channels: ``C`` per modality (and of the fused feature).
        num_modalities: ``M``. num_classes: ``K`` of the energy head.
        temperature: ``T`` of ``E = -T·logsumexp(z/T)``. prior_temperature: ``τ`` of the prior.
        beta: inverse temperature ``β`` of the Hopfield energy. steps: number of propagation steps.
        previous_channels: channels of the previous level's fused feature (None at the first level).
        fusion: ``"energy"`` | ``"mean"`` | ``"concat"``.
        score_norm: ``"rms"`` (default) — the head and the propagation see every modality's feature
            (and ``ξ_0``) divided by its per-voxel root-mean-square over channels, so the Hopfield
            scores compare directions (``β·C·cos``) and not norms; the fused feature is the propagation's
            modality weights applied to the raw features, ``Σ_m p_m x_m`` (uniform weights = the
            masked mean) (docs/method.md, "normalised fusion"); ``"none"`` — the first formulation:
            raw features everywhere and the fused feature is the Hopfield state ξ.
        eps: the RMS floor of ``score_norm="rms"``.
        prior: ``"energy"`` (default) — ``a_m = -E_m/τ`` inside the fused ``energy_fusion`` node;
            ``"agreement"`` (needs ``score_norm="rms"``) — plus ``Σ_k q̄_k log q_mk``, the log-likelihood
            of the available modalities' consensus head posterior under modality m's own, via
            ``free_energy`` + ``energy_propagate`` (docs/method.md).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_modalities: int,
        num_classes: int,
        temperature: float = 1.0,
        prior_temperature: float = 1.0,
        beta: float = 1.0,
        steps: int = 3,
        previous_channels: int | None = None,
        fusion: str = "energy",
        score_norm: str = "rms",
        eps: float = 1e-5,
        prior: str = "energy",
    ):
        super().__init__()
        owner = "EHF"
        self.spatial_dims = check_spatial_dims(owner, spatial_dims)
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        self.num_modalities = check_positive_int(owner, "num_modalities", num_modalities)
        self.num_classes = check_positive_int(owner, "num_classes", num_classes, minimum=2)
        self.temperature = check_finite_float(owner, "temperature", temperature, positive=True)
        self.prior_temperature = check_finite_float(owner, "prior_temperature", prior_temperature, positive=True)
        self.beta = check_finite_float(owner, "beta", beta, positive=True)
        self.steps = check_positive_int(owner, "steps", steps)
        self.previous_channels = (
            None if previous_channels is None else check_positive_int(owner, "previous_channels", previous_channels)
        )
        self.fusion = check_choice(owner, "fusion", fusion, FUSIONS)
        self.score_norm = check_choice(owner, "score_norm", score_norm, SCORE_NORMS)
        self.prior = check_choice(owner, "prior", prior, PRIORS)
        if self.prior == "agreement" and self.score_norm != "rms":
            raise ValueError(f"{owner}: prior='agreement' needs score_norm='rms'")
        self.eps = check_finite_float(owner, "eps", eps, positive=True)

        self.head = nn.Linear(in_channels, num_classes)  # weight [K, C], bias [K]: the shared energy head
        # normalised form: the fused feature starts near the masked mean and learns how far to follow
        # the energy weights, g = sigmoid(gate_logit) (docs/method.md, "normalised fusion")
        self.gate_logit = (
            nn.Parameter(torch.tensor(float(GATE_INIT))) if fusion == "energy" and self.score_norm == "rms" else None
        )
        self.previous_to_initial_state = (
            Convolution(spatial_dims, previous_channels, in_channels, strides=2, kernel_size=3, conv_only=True)
            if fusion == "energy" and previous_channels is not None
            else None
        )
        self.concat_projection = (
            Convolution(spatial_dims, num_modalities * in_channels, in_channels, kernel_size=1, conv_only=True)
            if fusion == "concat"
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, "
            f"num_modalities={self.num_modalities}, num_classes={self.num_classes}, fusion={self.fusion!r}, "
            f"temperature={self.temperature}, prior_temperature={self.prior_temperature}, beta={self.beta}, "
            f"steps={self.steps}, score_norm={self.score_norm!r}"
        )

    def forward(
        self,
        x: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        previous: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        return_energies: bool = False,
        validate: bool = True,
    ):
        """Fuse the modalities of one level.

        Args:
            x: ``[B, M, C, *S]`` per-modality features.
            modality_mask: ``[B, M]`` bool, True = available (``[M]``/``[1, M]`` = same for the batch;
                None = all available).
            previous: ``[B, previous_channels, *S']`` previous level's fused feature, ``S' = 2·S``
                (required when ``previous_channels`` is set and ``fusion="energy"``).
            target: ``[B, *S]`` int64 class indices in ``[0, K)``: adds each modality's head
                cross-entropy to the energies (deep supervision); needs ``return_energies=True``.
            return_energies: also return an :class:`EHFEnergies`.
            validate: check the values of modality_mask and target (host reads; see
                :func:`e2pa_kernels.check_values`). E2PANet checks them once and passes False.

        Returns:
            fused ``[B, C, *S]``, and ``(fused, EHFEnergies)`` when ``return_energies``.
        """
        _check_features("EHF", x, self.spatial_dims, self.num_modalities, self.in_channels)
        if target is not None and not return_energies:
            raise ValueError(
                "EHF: target only feeds the per-modality ce of the returned energies; pass return_energies=True with it"
            )
        if previous is not None and self.previous_channels is None:
            raise ValueError("EHF: previous was given but this level was built with previous_channels=None")
        mask = check_modality_mask(modality_mask, x.shape[0], self.num_modalities, x.device, validate=validate)
        given_mask = None if modality_mask is None else mask
        if self.fusion == "energy":
            # one node: the head, the prior, ξ0 and the propagation, masking included (no zeroed copy
            # of x), with a backward that writes dx once
            xi0 = None if self.previous_to_initial_state is None else self._previous_state(x, previous)
            if self.score_norm == "rms" and self.prior == "energy":
                # one lean node: normalisation, energy_fusion and the gated mix of the raw features
                fused, weights, trace, energies, ce = e2pa_kernels.normalized_fusion(
                    x,
                    self.head.weight,
                    self.head.bias,
                    given_mask,
                    xi0,
                    torch.sigmoid(self.gate_logit),
                    eps=self.eps,
                    temperature=self.temperature,
                    prior_temperature=self.prior_temperature,
                    beta=self.beta,
                    steps=self.steps,
                    target=target,
                    validate=validate,
                )
            elif self.score_norm == "rms":
                # zeroed first (where, not a product): an absent modality's NaN must not reach the RMS
                raw = zero_absent(x, given_mask)
                normalized = rms_normalize(raw, self.eps, channel_dim=2)
                xi0 = None if xi0 is None else rms_normalize(xi0, self.eps, channel_dim=1)
                energy_weights, trace, energies, ce = self._agreement_fusion(normalized, mask, xi0, target, validate)
                # each modality's share: (1 - g)·uniform over the available ones + g·energy weight; the
                # shares mix the raw features, so g = 0 is exactly the masked mean
                gate = torch.sigmoid(self.gate_logit).to(energy_weights.dtype)
                uniform = mask.to(energy_weights.dtype) / mask.sum(dim=1, keepdim=True).to(energy_weights.dtype)
                weights = (1 - gate) * mask_view(uniform, self.spatial_dims) + gate * energy_weights
                fused = (weights.unsqueeze(2).to(raw.dtype) * raw).sum(dim=1)
            else:
                fused, weights, trace, energies, ce = self._energy_fusion(x, given_mask, xi0, target, validate)
            return (
                (fused, EHFEnergies(energies=energies, weights=weights, trace=trace, ce=ce))
                if return_energies
                else fused
            )

        x = zero_absent(x, given_mask)
        present = mask_view(mask, self.spatial_dims)  # [B, M, 1, ..., 1] against [B, M, *S]
        energies = ce = weights = None
        if return_energies:
            energies, ce = self._energy_heads(x, target, validate)
        if self.fusion == "mean":
            fused = masked_mean(x, mask)
            if return_energies:
                share = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).to(x.dtype)
                weights = mask_view(share, self.spatial_dims).expand(energies.shape)
        else:
            fused = self.concat_projection(x.flatten(1, 2))

        if not return_energies:
            return fused
        energies = torch.where(present, energies, torch.full((), math.inf, dtype=energies.dtype, device=x.device))
        if ce is not None:
            ce = torch.where(present, ce, torch.zeros((), dtype=ce.dtype, device=x.device))
        return fused, EHFEnergies(energies=energies, weights=weights, trace=None, ce=ce)

    def _agreement_fusion(self, x, mask, xi0, target, validate: bool):
        """The propagation with the prior ``a_m = -E_m/τ + Σ_k q̄_k log q_mk``: the head's free energy plus
        the log-likelihood of the available modalities' consensus class posterior ``q̄`` under
        modality m's own posterior ``q_m`` (low where m's head contradicts the others). x: normalised
        ``[B, M, C, *S]`` (absent = 0); mask ``[B, M]``. Returns (weights, trace, energies, ce)."""
        spatial = x.dim() - 3
        out = e2pa_kernels.free_energy(
            x,
            self.head.weight,
            self.head.bias,
            temperature=self.temperature,
            target=target,
            spatial_dims=self.spatial_dims,
            validate=validate,
        )
        energies, ce = out if target is not None else (out, None)
        logits = torch.einsum("bmc...,kc->bmk...", x, self.head.weight.to(x.dtype)) + self.head.bias.to(x.dtype).view(
            1, 1, -1, *([1] * spatial)
        )
        log_q = torch.log_softmax(logits.float(), dim=2)
        present = mask_view(mask, spatial + 1)  # [B, M, 1, 1...] against [B, M, K, *S]
        count = mask.sum(dim=1).to(log_q.dtype).view(-1, 1, 1, *([1] * spatial))
        consensus = torch.where(present, log_q.exp(), torch.zeros((), device=x.device)).sum(1, keepdim=True) / count
        agreement = (consensus * log_q).sum(dim=2)  # [B, M, *S]
        available = mask_view(mask, spatial)
        log_prior = torch.where(
            available,
            -energies.float() / self.prior_temperature + agreement,
            torch.full((), -math.inf, device=x.device),
        )
        if xi0 is None:
            xi0 = masked_mean(x, mask)
        _, weights, trace = e2pa_kernels.energy_propagate(
            x, xi0, log_prior.to(x.dtype), beta=self.beta, steps=self.steps
        )
        energies = torch.where(available, energies, torch.full((), math.inf, dtype=energies.dtype, device=x.device))
        if ce is not None:
            ce = torch.where(available, ce, torch.zeros((), dtype=ce.dtype, device=x.device))
        return weights, trace, energies, ce

    def _energy_fusion(self, x, mask, xi0, target, validate: bool):
        out = e2pa_kernels.energy_fusion(
            x,
            self.head.weight,
            self.head.bias,
            mask,
            xi0,
            temperature=self.temperature,
            prior_temperature=self.prior_temperature,
            beta=self.beta,
            steps=self.steps,
            target=target,
            validate=validate,
        )
        out = tuple(out)
        return out if len(out) == 5 else (*out, None)

    def _energy_heads(self, x: torch.Tensor, target: torch.Tensor | None, validate: bool):
        """(energies ``[B, M, *S]``, ce ``[B, M, *S]`` or None) of the shared head on every modality."""
        out = e2pa_kernels.free_energy(
            x,
            self.head.weight,
            self.head.bias,
            temperature=self.temperature,
            target=target,
            spatial_dims=self.spatial_dims,
            validate=validate,
        )
        return out if target is not None else (out, None)

    def _previous_state(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """ξ_0 = ψ(previous) ``[B, C, *S]`` of a deeper level (the first level's masked mean is
        formed inside ``energy_fusion``)."""
        if previous is None:
            raise ValueError(
                f"EHF: previous (the previous level's fused feature [B, {self.previous_channels}, *2S]) "
                f"is required: this level was built with previous_channels={self.previous_channels}"
            )
        expected = (x.shape[0], self.previous_channels, *(2 * s for s in x.shape[3:]))
        if tuple(previous.shape) != expected:
            raise ValueError(
                f"EHF: previous must have shape [B, previous_channels, *2S] = {list(expected)}; "
                f"got {list(previous.shape)}"
            )
        return self.previous_to_initial_state(previous)


# --------------------------------------------------------------------------------------------------
# ESA
# --------------------------------------------------------------------------------------------------
@dataclass
class ESADetails:
    """Terms of the ESA energy (``B`` samples, ``M`` modalities, ``r`` factors).

    energy ``[B]`` = alignment + moment_weight · moments; alignment ``[B]`` = (1/N) Σ_m dist_m;
    moments ``[B]`` = Σ_{m,j} (μ_mj − μ_Fj)² + (ν_mj − ν_Fj)²; dist ``[B, M]``; mom1/mom2 ``[B, M+1, r]``
    (index M = the fused feature; sums over voxels); basis ``[B, C, r]`` or ``[C, r]``.
    Absent modalities count in none of the sums (their dist/moments are still reported).
    """

    energy: torch.Tensor
    alignment: torch.Tensor
    moments: torch.Tensor
    dist: torch.Tensor
    mom1: torch.Tensor
    mom2: torch.Tensor
    basis: torch.Tensor


class ESA(nn.Module):
    """Energy-regularised space alignment of the modalities inside the factors of the fused space.

    ``E_ESA = (1/N) Σ_m dist_m + moment_weight · Σ_{m,j} [(μ_mj − μ_Fj)² + (ν_mj − ν_Fj)²]`` per sample,
    summed over available modalities only (``factor_align``; ``μ = mom1/N``, ``ν = mom2/N``).

    Args:
        in_channels: ``C`` of the features. rank: ``r`` factors (``1 <= r <= C``).
        basis: ``"eigh"`` — per sample, the top-``r`` eigenvectors of the fused feature's direction
            second moment (``factor_basis``, no gradient); ``"learned"`` — one ``[C, r]`` parameter
            kept orthonormal by QR.
        moment_weight: ``λ_mom``. eps: norm floor of the direction normalisation.
    """

    def __init__(self, in_channels: int, rank: int, basis: str = "eigh", moment_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        owner = "ESA"
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        self.rank = check_positive_int(owner, "rank", rank)
        if rank > in_channels:
            raise ValueError(f"{owner}: rank must be <= in_channels = {in_channels}; got {rank}")
        self.basis = check_choice(owner, "basis", basis, ESA_BASES)
        self.moment_weight = check_finite_float(owner, "moment_weight", moment_weight)
        self.eps = check_finite_float(owner, "eps", eps, positive=True)
        self.basis_weight = (
            nn.Parameter(torch.linalg.qr(torch.randn(in_channels, rank)).Q) if basis == "learned" else None
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, rank={self.rank}, basis={self.basis!r}, "
            f"moment_weight={self.moment_weight}, eps={self.eps}"
        )

    def forward(
        self,
        x: torch.Tensor,
        fused: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        return_details: bool = False,
        validate: bool = True,
    ):
        """x ``[B, M, C, *S]``, fused ``[B, C, *S]``, modality_mask ``[B, M]`` bool →
        energy ``[B]`` (float32 or float64), and ``(energy, ESADetails)`` when ``return_details``.
        validate: check the mask's values (a host read; E2PANet checks once and passes False)."""
        if (
            not isinstance(fused, torch.Tensor)
            or not fused.is_floating_point()
            or fused.dim() < 3
            or fused.shape[1] != self.in_channels
        ):
            raise ValueError(
                f"ESA: fused must be a floating-point tensor [B, C={self.in_channels}, *S]; got "
                f"{list(fused.shape) if isinstance(fused, torch.Tensor) else type(fused).__name__}"
            )
        spatial_dims = fused.dim() - 2
        if not isinstance(x, torch.Tensor) or x.dim() != fused.dim() + 1:
            raise ValueError(
                f"ESA: x must be [B, M, C, *S] with the spatial axes of fused {list(fused.shape)}; got "
                f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        _check_features("ESA", x, spatial_dims, x.shape[1], self.in_channels)
        if x.shape[0] != fused.shape[0] or x.shape[3:] != fused.shape[2:]:
            raise ValueError(f"ESA: x {list(x.shape)} and fused {list(fused.shape)} must share batch and spatial axes")
        num_modalities = x.shape[1]
        mask = check_modality_mask(modality_mask, x.shape[0], num_modalities, x.device, validate=validate)
        # The energy is a sum over every voxel: keep it out of autocast's bfloat16/float16.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = zero_absent(x, None if modality_mask is None else mask).to(dtype)
            fused = fused.to(dtype)
            basis = (
                e2pa_kernels.factor_basis(fused, self.rank)
                if self.basis == "eigh"
                else e2pa_kernels.orthonormalize(self.basis_weight.to(dtype))
            )
            dist, mom1, mom2 = e2pa_kernels.factor_align(x, fused, basis, eps=self.eps)
            voxels = math.prod(x.shape[3:])
            mean, second = mom1 / voxels, mom2 / voxels
            moment_gap = (
                (mean[:, :num_modalities] - mean[:, num_modalities:]) ** 2
                + (second[:, :num_modalities] - second[:, num_modalities:]) ** 2
            ).sum(dim=2)
            zero = torch.zeros((), dtype=dtype, device=x.device)
            alignment = torch.where(mask, dist, zero).sum(dim=1) / voxels
            moments = torch.where(mask, moment_gap, zero).sum(dim=1)
            energy = alignment + self.moment_weight * moments
        if not return_details:
            return energy
        return energy, ESADetails(
            energy=energy, alignment=alignment, moments=moments, dist=dist, mom1=mom1, mom2=mom2, basis=basis
        )
