"""Inference: sliding-window prediction in each input's own geometry, with energy maps and pictures.

For each case the available modalities are loaded, reoriented to RAS and z-scored (the training
chain), absent modalities are zero-filled and masked, and ``sliding_window_inference`` runs the
network — for E2PANet through ``predict_with_energy_maps``, so level-0 energy maps are stitched like
the logits. The region probabilities and the maps are brought back to the file's grid by inverting
the loading transforms (probabilities first, then the threshold, as the MONAI tutorials do), so
predictions keep the input's affine and orientation and carry its label convention.

Per case, in ``OUT/<case>/`` (``layout="flat"``: only the label map, as ``OUT/<case>.nii.gz``)::

    <case>_pred.nii.gz               label map (uint8, the checkpoint's label convention)
    <case>_weight_<modality>.nii.gz  each available modality's share of the fused feature     (maps weights|all)
    <case>_energy_<modality>.nii.gz  free energy of each available modality (low = confident) (maps all)
    <case>_fused_energy.nii.gz       Hopfield energy of the final fused state                 (maps all)
    <case>_overview.png              slices through the tumour: inputs, prediction, maps

Maps are stored compactly as scaled int16 (NIfTI ``scl_slope``; every reader returns floats,
precise to 1/65535 of each map's range, half the size of float32) unless ``maps_dtype="float32"``.
A case's folder is built under a hidden temporary name and renamed when complete, so
``OUT/<case>`` exists only with all its files: a kill or a full disk leaves no partial case, and
``skip_existing`` continues a batch (complete cases kept, partial ones redone). Nothing is
overwritten unless asked; a failing case is reported and the others still run. ``OUT`` is locked
(:class:`e2pa.io.FolderLock`) while a batch writes into it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..checks import check_modality_mask
from ..data import (
    REGIONS,
    DataError,
    LabelConvention,
    canonical_modality,
    get_convention,
    regions_to_label,
    save_label_map,
    save_volume,
)
from ..data.cases import CaseFiles, find_cases
from ..io import FolderLock, OutputExistsError, atomic_folder, atomic_save_figure, os_errors_name
from ..model.registry import build_model, checkpoint_model_config
from .checkpoint import CheckpointError, load_checkpoint
from .device import resolve_device

# Sliding-window overlap of every whole-volume prediction: validation during training, `e2pa evaluate`
# and `e2pa infer` (nnU-Net's tile step of half a patch). One value, so that validation and evaluation
# score the same checkpoint the same way.
SW_OVERLAP = 0.5
_log = logging.getLogger(__name__)
MAP_CHOICES = ("none", "weights", "all")
MAP_DTYPES = ("int16", "float32")
# Errors of the output folder itself: every further case would fail the same way, so the batch stops.
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    modalities: tuple[str, ...]
    label_convention: LabelConvention
    roi_size: tuple[int, ...]
    source: Path
    split: dict | None = None  # the case ids the run trained and validated on (e2pa train records them)

    @property
    def has_energies(self) -> bool:
        return hasattr(self.model, "predict_with_energy_maps") and getattr(self.model, "fusion", None) == "energy"


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """A network from a checkpoint: read with ``weights_only=True``, its configuration validated
    before anything is built, its weights loaded strictly."""
    path = Path(checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    for key in ("model", "model_config", "modalities", "train_config"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry (not written by e2pa train?)")
    try:
        model = build_model(checkpoint_model_config(state["model_config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: invalid model configuration: {error}") from None
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the configured network ({str(error).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    roi = tuple(int(v) for v in state["train_config"].get("roi_size", (96, 96, 96)))
    try:  # a convention read off a dataset.json is stored as its spec; named ones by name (older checkpoints)
        convention = get_convention(state.get("label_convention_spec") or state.get("label_convention", "brats2021"))
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    return LoadedModel(
        model=model,
        modalities=tuple(state["modalities"]),
        label_convention=convention,
        roi_size=roi,
        source=path,
        split=state.get("split") if isinstance(state.get("split"), dict) else None,
    )


# ------------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------------
def sliding_window_outputs(
    loaded: LoadedModel,
    image: torch.Tensor,
    modality_mask: torch.Tensor,
    *,
    sw_batch_size: int = 2,
    overlap: float = SW_OVERLAP,
    device: torch.device | str = "cpu",
    energy_maps: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Whole-volume outputs of one case: image ``[M, *S]`` (absent modalities zero), modality_mask
    ``[M]`` bool → ``{"logits": [1, out, *S], …}`` plus, for E2PA with ``energy_maps``, the level-0
    ``modality_energies``/``modality_weights`` ``[1, M, *S]`` and ``fused_energy`` ``[1, 1, *S]``.

    The one sliding-window path of the package (Gaussian blending, full precision, no gradients):
    inference, evaluation and validation during training all predict through it."""
    from monai.inferers import sliding_window_inference

    predictor = loaded.model.predict_with_energy_maps if energy_maps and loaded.has_energies else loaded.model
    # The mask's values are checked once here, on the host copy (no device read); each window batch
    # then runs the predictor with validate=False (no host read per window batch).
    check_modality_mask(modality_mask.cpu(), 1, image.shape[0], torch.device("cpu"), validate=True)
    with torch.no_grad():
        out = sliding_window_inference(
            image[None].to(device),
            loaded.roi_size,
            sw_batch_size,
            predictor,
            overlap=overlap,
            mode="gaussian",
            progress=progress,
            modality_mask=modality_mask.to(device),
            validate=False,
        )
    return out if isinstance(out, dict) else {"logits": out}


@dataclasses.dataclass
class CasePrediction:
    """Outputs on the input file's grid (arrays ``[*S]`` / ``[k, *S]``) and the reference image."""

    name: str
    label: np.ndarray
    regions: np.ndarray
    maps: dict[str, np.ndarray]
    available: tuple[str, ...]
    reference: object
    intensities: dict[str, np.ndarray]


def predict_case(
    loaded: LoadedModel,
    case: CaseFiles,
    *,
    modalities: Sequence[str] | None = None,
    sw_batch_size: int = 2,
    overlap: float = SW_OVERLAP,
    device: torch.device | str = "cpu",
    energy_maps: bool = True,
    progress: bool = False,
) -> CasePrediction:
    """Predict one case with the modalities in ``modalities`` (default: every modality found);
    ``progress`` shows a bar over the sliding windows."""
    from monai.data import MetaTensor

    from ..data import infer_transforms

    wanted = tuple(canonical_modality(m) for m in modalities) if modalities else tuple(case.files)
    unknown = [m for m in wanted if m not in loaded.modalities]
    if unknown:
        raise DataError(
            f"case {case.name}: the model was trained on {', '.join(loaded.modalities)}; "
            f"it cannot use {', '.join(unknown)}"
        )
    absent = [m for m in wanted if m not in case.files]
    if absent:
        raise DataError(
            f"case {case.name}: requested modality file(s) not found: {', '.join(absent)} "
            f"(found {', '.join(case.files) or 'none'})"
        )
    available = tuple(m for m in loaded.modalities if m in wanted)
    if case.four_d:  # one 4-D file: load every channel, then take the wanted ones by name
        transform = infer_transforms(modalities=case.four_d)
        item = transform({"image": str(case.files[available[0]]), "case": case.name})
        channel_of = [case.four_d.index(m) for m in available]
    else:
        transform = infer_transforms(modalities=available)
        item = transform({"image": [str(case.files[m]) for m in available], "case": case.name})
        channel_of = list(range(len(available)))
    loaded_image = item["image"]
    full = torch.zeros((len(loaded.modalities), *loaded_image.shape[1:]), dtype=torch.float32)
    for i, m in enumerate(available):
        full[loaded.modalities.index(m)] = torch.as_tensor(loaded_image[channel_of[i]])
    mask = torch.tensor([m in available for m in loaded.modalities])
    outputs = sliding_window_outputs(
        loaded,
        full,
        mask,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        device=device,
        energy_maps=energy_maps,
        progress=progress,
    )
    probabilities = torch.sigmoid(outputs["logits"][0].float()).cpu()
    maps = {}
    if "modality_energies" in outputs:
        for i, m in enumerate(loaded.modalities):
            if m in available:
                maps[f"energy_{m}"] = outputs["modality_energies"][0, i].float().cpu()
                maps[f"weight_{m}"] = outputs["modality_weights"][0, i].float().cpu()
        maps["fused_energy"] = outputs["fused_energy"][0, 0].float().cpu()

    def to_file_grid(array: torch.Tensor) -> np.ndarray:
        """Undo the reorientation (and any resampling) of the loading chain for a [k, *S] array."""
        meta = MetaTensor(
            torch.as_tensor(array).as_subclass(torch.Tensor),
            meta=loaded_image.meta,
            applied_operations=loaded_image.applied_operations,
        )
        return np.asarray(transform.inverse({"image": meta})["image"])

    regions = to_file_grid(probabilities)
    stacked = to_file_grid(torch.stack(list(maps.values()))) if maps else np.zeros((0,))
    file_maps = {k: stacked[i] for i, k in enumerate(maps)}
    import nibabel as nib

    reference = nib.load(str(case.files[available[0]]))
    if case.four_d:
        reference = reference.slicer[..., 0]  # the 3-D grid of the 4-D image
    file_images = to_file_grid(loaded_image.as_tensor())
    intensities = {m: file_images[channel_of[i]] for i, m in enumerate(available)}
    return CasePrediction(
        name=case.name,
        label=regions_to_label(regions > 0.5, loaded.label_convention),
        regions=regions > 0.5,
        maps=file_maps,
        available=available,
        reference=reference,
        intensities=intensities,
    )


LAYOUTS = ("e2pa", "flat")


def output_paths(out_dir: Path, prediction: CasePrediction, layout: str = "e2pa", maps: str = "all") -> dict[str, Path]:
    """Where a case's outputs go. ``"e2pa"``: ``OUT/<case>/`` with the label map, maps and overview;
    ``"flat"``: only the label map as ``OUT/<case>.nii.gz`` — nnU-Net's predictions layout and the
    official BraTS evaluator's naming (it matches ``<ID>.nii.gz``). ``maps``: which maps (see
    :data:`MAP_CHOICES`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "flat":
        return {"pred": out_dir / f"{prediction.name}.nii.gz"}
    folder = out_dir / prediction.name
    paths = {"pred": folder / f"{prediction.name}_pred.nii.gz"}
    paths.update({k: folder / f"{prediction.name}_{k}.nii.gz" for k in prediction.maps if _map_wanted(k, maps)})
    paths["overview"] = folder / f"{prediction.name}_overview.png"
    return paths


def _map_wanted(key: str, maps: str) -> bool:
    return maps == "all" or (maps == "weights" and key.startswith("weight_"))


def case_output(out_dir: Path, name: str, layout: str = "e2pa") -> Path:
    """What holds a case's outputs: its folder (``"e2pa"``) or its label map (``"flat"``)."""
    return out_dir / (f"{name}.nii.gz" if layout == "flat" else name)


def save_prediction(
    prediction: CasePrediction,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    layout: str = "e2pa",
    maps: str = "all",
    maps_dtype: str = "int16",
) -> list[Path]:
    """Write a case's outputs (see the module docstring and :func:`output_paths`): a case folder is
    built under a temporary name and renamed when complete, a flat label map is written atomically.
    An existing case output is replaced only with ``overwrite`` (else :class:`OutputExistsError`,
    nothing written)."""
    if maps not in MAP_CHOICES:
        raise ValueError(f"maps must be one of {MAP_CHOICES}; got {maps!r}")
    out_dir = Path(out_dir)
    final = output_paths(out_dir, prediction, layout, maps)
    target = case_output(out_dir, prediction.name, layout)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"case {prediction.name}: {target} already exists; pass --overwrite to replace it "
            f"or --skip-existing to keep it"
        )
    if layout == "flat":
        save_label_map(
            prediction.label, prediction.reference, final["pred"], overwrite=overwrite, label_convention=None
        )
        return list(final.values())
    with atomic_folder(target, overwrite=overwrite) as tmp:
        paths = {k: tmp / p.name for k, p in final.items()}
        try:
            save_label_map(prediction.label, prediction.reference, paths["pred"], overwrite=True, label_convention=None)
            for key, array in prediction.maps.items():
                if key in paths:
                    save_volume(
                        array, prediction.reference, paths[key], overwrite=True, dtype=_map_dtype(array, maps_dtype)
                    )
            render_overview(prediction, paths["overview"], overwrite=True)
        except OSError as error:  # name the file the user will look for, not its temporary folder
            if error.filename and str(tmp) in str(error.filename) and error.errno is not None:
                raise type(error)(
                    error.errno, error.strerror, str(error.filename).replace(str(tmp), str(target))
                ) from error
            raise
    return list(final.values())


def _map_dtype(array: np.ndarray, wanted: str) -> type:
    """Scaled int16 when asked and the map is finite (it always is for a finite network), else float32."""
    if wanted not in MAP_DTYPES:
        raise ValueError(f"maps_dtype must be one of {MAP_DTYPES}; got {wanted!r}")
    return np.int16 if wanted == "int16" and np.isfinite(array).all() else np.float32


def render_overview(prediction: CasePrediction, path: Path, *, overwrite: bool = False) -> Path:
    """A PNG with one axial slice through the tumour (or the middle): each input modality, the
    prediction outline, and — for E2PA — each modality's energy and weight map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tumour = prediction.regions[1]
    z = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else tumour.shape[2] // 2
    rows = [[(f"{m}", prediction.intensities[m][..., z], "gray") for m in prediction.available]]
    energy_row = [
        (f"energy {m}", prediction.maps[f"energy_{m}"][..., z], "magma")
        for m in prediction.available
        if f"energy_{m}" in prediction.maps
    ]
    weight_row = [
        (f"weight {m}", prediction.maps[f"weight_{m}"][..., z], "viridis")
        for m in prediction.available
        if f"weight_{m}" in prediction.maps
    ]
    rows += [r for r in (energy_row, weight_row) if r]
    cols = max(len(r) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            axes[r][c].axis("off")
        for c, (title, image, cmap) in enumerate(row):
            shown = axes[r][c].imshow(np.rot90(image), cmap=cmap)
            axes[r][c].set_title(title, fontsize=8)
            if cmap != "gray":
                fig.colorbar(shown, ax=axes[r][c], fraction=0.046, pad=0.02)
    base = prediction.intensities[prediction.available[0]][..., z]
    axes[0][-1].imshow(np.rot90(base), cmap="gray")
    colors = {"WT": "yellow", "TC": "red", "ET": "cyan"}
    for i, region in enumerate(REGIONS):
        if prediction.regions[i][..., z].any():
            axes[0][-1].contour(
                np.rot90(prediction.regions[i][..., z].astype(float)),
                levels=[0.5],
                colors=colors[region],
                linewidths=0.8,
            )
    axes[0][-1].set_title("prediction (WT/TC/ET)", fontsize=8)
    fig.suptitle(f"{prediction.name} — axial slice {z}", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, overwrite=overwrite, dpi=100)
    plt.close(fig)
    return path


@dataclasses.dataclass
class InferenceReport:
    written: dict[str, list[Path]]
    failures: dict[str, str]
    skipped: list[str] = dataclasses.field(default_factory=list)


def infer(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    modalities: Sequence[str] | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    device: str = "auto",
    sw_batch_size: int = 2,
    overlap: float = SW_OVERLAP,
    layout: str = "e2pa",
    dataset_json: str | os.PathLike | None = None,
    maps: str = "weights",
    maps_dtype: str = "int16",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> InferenceReport:
    """Predict every case in ``inputs``; a case that fails (bad or unreadable files, a geometry it
    cannot use) is reported and the rest still run. A full or read-only output disk stops the batch
    (every further case would fail the same way) with the cases done so far kept. ``skip_existing``
    keeps complete case outputs from an earlier (interrupted) batch. ``layout``: see
    :func:`output_paths`; ``dataset_json``: names the channels of nnU-Net channel files and 4-D
    images (see :func:`find_cases`); ``maps`` / ``maps_dtype``: see :func:`save_prediction`.

    Progress goes to ``log`` (default: this module's logger; failures as warnings)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    info, warn = (log, log) if log else (_log.info, _log.warning)
    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing exclude each other")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    if maps not in MAP_CHOICES:
        raise ValueError(f"maps must be one of {MAP_CHOICES}; got {maps!r}")
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev)
    cases = find_cases(inputs, dataset_json=dataset_json)
    out_dir = Path(out_dir)
    report = InferenceReport(written={}, failures={})
    with FolderLock(out_dir, "e2pa infer"):
        _check_writable(out_dir)
        for case in cases:
            folder = case_output(out_dir, case.name, layout)
            if folder.exists() and skip_existing:
                report.skipped.append(case.name)
                info(f"{case.name}: skipped ({folder} is complete)")
                continue
            if folder.exists() and not overwrite:
                report.failures[case.name] = (
                    f"{folder} already exists; pass --overwrite to replace it or --skip-existing to keep it"
                )
                warn(f"{case.name}: FAILED: {report.failures[case.name]}")
                continue
            try:
                prediction = predict_case(
                    loaded,
                    case,
                    modalities=modalities,
                    sw_batch_size=sw_batch_size,
                    overlap=overlap,
                    device=dev,
                    progress=progress,
                    energy_maps=maps != "none" and layout == "e2pa",
                )
                report.written[case.name] = save_prediction(
                    prediction, out_dir, overwrite=overwrite, layout=layout, maps=maps, maps_dtype=maps_dtype
                )
                info(
                    f"{case.name}: wrote {len(report.written[case.name])} file(s) to {folder} "
                    f"(modalities: {', '.join(prediction.available)})"
                )
            except OSError as error:
                if error.errno in FATAL_ERRNOS:
                    done = ", ".join(report.written) or "none"
                    raise type(error)(
                        error.errno,
                        f"{error.strerror or os.strerror(error.errno)}; the batch "
                        f"stopped at case {case.name} (complete cases: {done}; run again with "
                        f"--skip-existing to continue)",
                        error.filename,
                    ) from error
                _record_failure(report, case.name, error, warn)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as error:  # noqa: BLE001 — one bad case never stops the batch
                _record_failure(report, case.name, error, warn)
    return report


def _record_failure(report: InferenceReport, name: str, error: Exception, log: Callable[[str], None]) -> None:
    known = isinstance(error, (DataError, OutputExistsError, OSError, ValueError))
    message = " ".join(str(error).split()) or type(error).__name__
    if not known:  # not one of ours: name the type, keep the trace for --traceback / debugging
        message = f"{type(error).__name__}: {message}"
        _log.debug("case %s failed", name, exc_info=error)
    report.failures[name] = message
    log(f"{name}: FAILED: {message}")


def _check_writable(out_dir: Path) -> None:
    """Fail before any prediction when ``out_dir`` cannot take files (read-only, no permission)."""
    import tempfile

    with os_errors_name(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".e2pa-write-test-"):
            pass


def iter_modalities(text: str | None) -> tuple[str, ...] | None:
    """``"flair,t1ce"`` → ("flair", "t1ce") in canonical names; None stays None."""
    if not text:
        return None
    names = [t for t in (s.strip() for s in text.split(",")) if t]
    try:
        return tuple(canonical_modality(n) for n in names)
    except ValueError as error:
        raise DataError(f"--modalities: {error}") from None
