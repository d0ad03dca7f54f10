"""Inference: sliding-window prediction in each input's own geometry, with energy maps and pictures.

For each case the available modalities are loaded, reoriented to RAS and z-scored (the training
chain), absent modalities are zero-filled and masked, and ``sliding_window_inference`` runs the
network — for E2PANet through ``predict_with_energy_maps``, so level-0 energy maps are stitched like
the logits. The region probabilities and the maps are brought back to the file's grid by inverting
the loading transforms (probabilities first, then the threshold, as the MONAI tutorials do), so
predictions keep the input's affine and orientation and carry its label convention.

Per case, in ``OUT/<case>/``::

    <case>_pred.nii.gz                   label map (uint8, the checkpoint's label convention)
    <case>_energy_<modality>.nii.gz      free energy of each available modality (low = confident)
    <case>_weight_<modality>.nii.gz      each available modality's share of the fused feature
    <case>_fused_energy.nii.gz           Hopfield energy of the final fused state
    <case>_overview.png                  slices through the tumour: inputs, prediction, maps

Nothing is overwritten unless asked; a failing case is reported and the others still run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import REGIONS, DataError, canonical_modality, regions_to_label, save_label_map, save_volume
from ..data.nifti import nifti_stem
from ..io import OutputExistsError, atomic_save_figure
from ..model.registry import build_model
from .checkpoint import CheckpointError, load_checkpoint
from .device import resolve_device

# Sliding-window overlap of every whole-volume prediction: validation during training, `e2pa evaluate`
# and `e2pa infer` (nnU-Net's tile step of half a patch). One value, so that validation and evaluation
# score the same checkpoint the same way.
SW_OVERLAP = 0.5
_log = logging.getLogger(__name__)

@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    modalities: tuple[str, ...]
    label_convention: str
    roi_size: tuple[int, ...]
    source: Path

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
        model = build_model(state["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: invalid model configuration: {error}") from None
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the configured network "
                              f"({str(error).splitlines()[0]})") from None
    model.to(device).eval()
    roi = tuple(int(v) for v in state["train_config"].get("roi_size", (96, 96, 96)))
    return LoadedModel(model=model, modalities=tuple(state["modalities"]),
                       label_convention=str(state.get("label_convention", "brats2021")), roi_size=roi, source=path)


# ------------------------------------------------------------------------------------------------
# finding the inputs
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaseFiles:
    """One case: its name and the NIfTI file of each modality found (a subset of the model's)."""

    name: str
    files: dict[str, Path]


def _modality_of(path: Path) -> str | None:
    """The modality a BraTS-style file name ends with (``…_t1ce.nii.gz``, ``…-t2f.nii.gz``), or None."""
    stem = nifti_stem(path.name)
    if stem is None:
        return None
    for separator in ("_", "-"):
        if separator in stem:
            try:
                return canonical_modality(stem.rsplit(separator, 1)[1])
            except ValueError:
                continue
    return None


def _case_from_files(files: Sequence[Path], name: str | None = None) -> CaseFiles:
    found: dict[str, Path] = {}
    for path in files:
        modality = _modality_of(path)
        if modality is None:
            continue  # the label map or unrelated files
        if modality in found:
            raise DataError(f"{path.parent}: two files for {modality}: {found[modality].name} and {path.name}")
        found[modality] = path
    if not found:
        raise DataError(f"{name or files[0].parent}: no modality files found (expected names ending in "
                        f"_flair/_t1/_t1ce/_t2 or -t2f/-t1n/-t1c/-t2w .nii.gz)")
    stem = nifti_stem(next(iter(found.values())).name)
    return CaseFiles(name=name or stem.rsplit("_" if "_" in stem else "-", 1)[0], files=found)


def find_cases(inputs: Sequence[str | os.PathLike]) -> list[CaseFiles]:
    """Cases from ``inputs``: NIfTI files (together, one case), case folders, or folders of case folders."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"--input: {', '.join(missing)} do(es) not exist")
    files = [p for p in paths if p.is_file()]
    cases = [_case_from_files(files)] if files else []
    for folder in (p for p in paths if p.is_dir()):
        niftis = sorted(p for p in folder.iterdir() if p.is_file() and _modality_of(p))
        if niftis:
            cases.append(_case_from_files(niftis, folder.name))
            continue
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in subfolders:
            sub_files = sorted(p for p in sub.iterdir() if p.is_file() and _modality_of(p))
            if sub_files:
                cases.append(_case_from_files(sub_files, sub.name))
        if not subfolders or not any(c.files for c in cases):
            raise DataError(f"{folder}: no case found (no modality NIfTI files in it or in its sub-folders)")
    return cases


# ------------------------------------------------------------------------------------------------
# prediction
# ------------------------------------------------------------------------------------------------
def sliding_window_outputs(loaded: LoadedModel, image: torch.Tensor, modality_mask: torch.Tensor, *,
                           sw_batch_size: int = 2, overlap: float = SW_OVERLAP, device: torch.device | str = "cpu",
                           energy_maps: bool = True) -> dict[str, torch.Tensor]:
    """Whole-volume outputs of one case: image ``[M, *S]`` (absent modalities zero), modality_mask
    ``[M]`` bool → ``{"logits": [1, out, *S], …}`` plus, for E2PA with ``energy_maps``, the level-0
    ``modality_energies``/``modality_weights`` ``[1, M, *S]`` and ``fused_energy`` ``[1, 1, *S]``.

    The one sliding-window path of the package (Gaussian blending, full precision, no gradients):
    inference, evaluation and validation during training all predict through it."""
    from monai.inferers import sliding_window_inference
    predictor = loaded.model.predict_with_energy_maps if energy_maps and loaded.has_energies else loaded.model
    with torch.no_grad():
        out = sliding_window_inference(image[None].to(device), loaded.roi_size, sw_batch_size, predictor,
                                       overlap=overlap, mode="gaussian", modality_mask=modality_mask.to(device))
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


def predict_case(loaded: LoadedModel, case: CaseFiles, *, modalities: Sequence[str] | None = None,
                 sw_batch_size: int = 2, overlap: float = SW_OVERLAP, device: torch.device | str = "cpu",
                 energy_maps: bool = True) -> CasePrediction:
    """Predict one case with the modalities in ``modalities`` (default: every modality found)."""
    from monai.data import MetaTensor

    from ..data import infer_transforms
    wanted = tuple(canonical_modality(m) for m in modalities) if modalities else tuple(case.files)
    unknown = [m for m in wanted if m not in loaded.modalities]
    if unknown:
        raise DataError(f"case {case.name}: the model was trained on {', '.join(loaded.modalities)}; "
                        f"it cannot use {', '.join(unknown)}")
    absent = [m for m in wanted if m not in case.files]
    if absent:
        raise DataError(f"case {case.name}: requested modality file(s) not found: {', '.join(absent)} "
                        f"(found {', '.join(case.files) or 'none'})")
    available = tuple(m for m in loaded.modalities if m in wanted)
    transform = infer_transforms(modalities=available)
    item = transform({"image": [str(case.files[m]) for m in available], "case": case.name})
    loaded_image = item["image"]
    full = torch.zeros((len(loaded.modalities), *loaded_image.shape[1:]), dtype=torch.float32)
    for i, m in enumerate(available):
        full[loaded.modalities.index(m)] = torch.as_tensor(loaded_image[i])
    mask = torch.tensor([m in available for m in loaded.modalities])
    outputs = sliding_window_outputs(loaded, full, mask, sw_batch_size=sw_batch_size, overlap=overlap, device=device,
                                     energy_maps=energy_maps)
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
        meta = MetaTensor(torch.as_tensor(array).as_subclass(torch.Tensor), meta=loaded_image.meta,
                          applied_operations=loaded_image.applied_operations)
        return np.asarray(transform.inverse({"image": meta})["image"])

    regions = to_file_grid(probabilities)
    stacked = to_file_grid(torch.stack(list(maps.values()))) if maps else np.zeros((0,))
    file_maps = {k: stacked[i] for i, k in enumerate(maps)}
    import nibabel as nib
    reference = nib.load(str(case.files[available[0]]))
    file_images = to_file_grid(loaded_image.as_tensor())
    intensities = {m: file_images[i] for i, m in enumerate(available)}
    return CasePrediction(name=case.name, label=regions_to_label(regions > 0.5, loaded.label_convention),
                          regions=regions > 0.5, maps=file_maps, available=available, reference=reference,
                          intensities=intensities)


def output_paths(out_dir: Path, prediction: CasePrediction) -> dict[str, Path]:
    folder = out_dir / prediction.name
    paths = {"pred": folder / f"{prediction.name}_pred.nii.gz"}
    paths.update({k: folder / f"{prediction.name}_{k}.nii.gz" for k in prediction.maps})
    paths["overview"] = folder / f"{prediction.name}_overview.png"
    return paths


def save_prediction(prediction: CasePrediction, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write a case's outputs (see the module docstring); with ``overwrite=False`` nothing is written
    when any of them already exists."""
    paths = output_paths(Path(out_dir), prediction)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"case {prediction.name}: {len(existing)} output file(s) already exist "
                                f"(e.g. {existing[0]}); pass --overwrite to replace them")
    save_label_map(prediction.label, prediction.reference, paths["pred"], overwrite=overwrite,
                   label_convention=None)
    for key, array in prediction.maps.items():
        save_volume(array, prediction.reference, paths[key], overwrite=overwrite)
    render_overview(prediction, paths["overview"], overwrite=overwrite)
    return list(paths.values())


def render_overview(prediction: CasePrediction, path: Path, *, overwrite: bool = False) -> Path:
    """A PNG with one axial slice through the tumour (or the middle): each input modality, the
    prediction outline, and — for E2PA — each modality's energy and weight map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tumour = prediction.regions[1]
    z = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else tumour.shape[2] // 2
    rows = [[(f"{m}", prediction.intensities[m][..., z], "gray") for m in prediction.available]]
    energy_row = [(f"energy {m}", prediction.maps[f"energy_{m}"][..., z], "magma")
                  for m in prediction.available if f"energy_{m}" in prediction.maps]
    weight_row = [(f"weight {m}", prediction.maps[f"weight_{m}"][..., z], "viridis")
                  for m in prediction.available if f"weight_{m}" in prediction.maps]
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
            axes[0][-1].contour(np.rot90(prediction.regions[i][..., z].astype(float)), levels=[0.5],
                                colors=colors[region], linewidths=0.8)
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


def infer(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
          modalities: Sequence[str] | None = None, overwrite: bool = False, device: str = "auto",
          sw_batch_size: int = 2, overlap: float = SW_OVERLAP, energy_maps: bool = True,
          log: Callable[[str], None] | None = None) -> InferenceReport:
    """Predict every case in ``inputs``; a case that fails is reported and the rest still run.

    Progress goes to ``log`` (default: this module's logger; failures as warnings)."""
    info, warn = (log, log) if log else (_log.info, _log.warning)
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev)
    report = InferenceReport(written={}, failures={})
    for case in find_cases(inputs):
        try:
            prediction = predict_case(loaded, case, modalities=modalities, sw_batch_size=sw_batch_size,
                                      overlap=overlap, device=dev, energy_maps=energy_maps)
            report.written[case.name] = save_prediction(prediction, out_dir, overwrite=overwrite)
            info(f"{case.name}: wrote {len(report.written[case.name])} file(s) to {Path(out_dir) / case.name} "
                f"(modalities: {', '.join(prediction.available)})")
        except (DataError, OutputExistsError, OSError, ValueError) as error:
            report.failures[case.name] = " ".join(str(error).split())
            warn(f"{case.name}: FAILED: {report.failures[case.name]}")
    return report


def iter_modalities(text: str | None) -> tuple[str, ...] | None:
    """``"flair,t1ce"`` → ("flair", "t1ce") in canonical names; None stays None."""
    if not text:
        return None
    names = [t for t in (s.strip() for s in text.split(",")) if t]
    try:
        return tuple(canonical_modality(n) for n in names)
    except ValueError as error:
        raise DataError(f"--modalities: {error}") from None
