"""Finding the cases to predict: NIfTI files, case folders, nnU-Net ``imagesTs``-style folders and MSD
4-D images, with the channels of the last two named by a ``dataset.json`` (never guessed).

:func:`find_cases` → ``[CaseFiles]``: each case's name and the file of each modality found.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError
from .modalities import canonical_modality
from .nifti import load_image, nifti_stem


@dataclasses.dataclass
class CaseFiles:
    """One case: its name and the NIfTI file of each modality found (a subset of the model's)."""

    name: str
    files: dict[str, Path]
    four_d: tuple[str, ...] = ()  # a 4-D image (every entry of ``files`` is the same path): its channel order


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
        raise DataError(
            f"{name or files[0].parent}: no modality files found (expected names ending in "
            f"_flair/_t1/_t1ce/_t2 or -t2f/-t1n/-t1c/-t2w .nii.gz)"
        )
    stem = nifti_stem(next(iter(found.values())).name)
    return CaseFiles(name=name or stem.rsplit("_" if "_" in stem else "-", 1)[0], files=found)


def find_cases(
    inputs: Sequence[str | os.PathLike], *, dataset_json: str | os.PathLike | None = None
) -> list[CaseFiles]:
    """Cases from ``inputs``: NIfTI files (together, one case), case folders, folders of case folders,
    an nnU-Net ``imagesTs``-style folder (``<case>_0000.nii.gz`` ..., one file per channel) or a folder
    of MSD 4-D images (one file per case, modalities on the last axis).

    The channels of nnU-Net files and 4-D images are mapped to modalities by the names in a
    ``dataset.json`` (nnU-Net ``channel_names`` or Decathlon ``modality``): ``dataset_json`` when
    given, else the one in the input's folder or the folder above it (nnU-Net's and MSD's layout).
    Without one the order is not guessed: :class:`DataError` says what to pass."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"--input: {', '.join(missing)} do(es) not exist")
    files = [p for p in paths if p.is_file()]
    cases = []
    if files:
        if all(_modality_of(p) for p in files):
            cases.append(_case_from_files(files))
        else:
            cases += _channel_cases(files, dataset_json)
    for folder in (p for p in paths if p.is_dir()):
        niftis = sorted(p for p in folder.iterdir() if p.is_file() and _modality_of(p))
        if niftis:
            cases.append(_case_from_files(niftis, folder.name))
            continue
        others = sorted(
            p for p in folder.iterdir() if p.is_file() and nifti_stem(p.name) and not p.name.startswith(".")
        )
        if others:
            cases += _channel_cases(others, dataset_json)
            continue
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for sub in subfolders:
            sub_files = sorted(p for p in sub.iterdir() if p.is_file() and _modality_of(p))
            if sub_files:
                cases.append(_case_from_files(sub_files, sub.name))
        if not subfolders or not any(c.files for c in cases):
            raise DataError(f"{folder}: no case found (no modality NIfTI files in it or in its sub-folders)")
    return cases


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _channel_roles_near(folder: Path, dataset_json: str | os.PathLike | None, what: str) -> tuple[str, ...]:
    """Channel index → modality, from ``dataset_json`` or a dataset.json in ``folder`` or its parent."""
    from .datasets import channel_roles

    candidates = [Path(dataset_json)] if dataset_json else [folder / "dataset.json", folder.parent / "dataset.json"]
    json_path = next((c for c in candidates if c.is_file()), None)
    if json_path is None:
        raise DataError(
            f"{folder}: {what} carry no modality names; pass --data with the dataset.json whose "
            "'channel_names' (nnU-Net) or 'modality' (Decathlon) maps channel indices to FLAIR, T1, "
            "T1ce, T2" + (f" ({dataset_json} does not exist)" if dataset_json else "")
        )
    try:
        spec = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{json_path}: not a readable JSON file ({error})") from None
    key = next((k for k in ("channel_names", "modality") if isinstance(spec, dict) and k in spec), None)
    if key is None:
        raise DataError(f"{json_path}: no 'channel_names' or 'modality' map to name the channels of {what}")
    return channel_roles(spec[key], f"{json_path}: '{key}'")


def _channel_cases(files: Sequence[Path], dataset_json: str | os.PathLike | None) -> list[CaseFiles]:
    """nnU-Net channel files (``<case>_<XXXX>``) grouped by case, or 4-D images one per case."""
    grouped: dict[str, dict[int, Path]] = {}
    four_d = []
    for path in files:
        match = _CHANNEL_FILE.match(nifti_stem(path.name) or "")
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
        elif len(load_image(path).shape) == 4:
            four_d.append(path)
        else:
            raise DataError(
                f"{path}: neither a BraTS-named modality file (*_flair.nii.gz ...), an nnU-Net channel "
                "file (<case>_0000.nii.gz ...) nor a 4-D image with the modalities on its last axis"
            )
    cases = []
    if grouped:
        roles = _channel_roles_near(files[0].parent, dataset_json, "nnU-Net channel files (<case>_0000.nii.gz)")
        for case, channels in sorted(grouped.items()):
            unknown = sorted(set(channels) - set(range(len(roles))))
            if unknown:
                raise DataError(
                    f"case {case}: channel file(s) {unknown} are not in the dataset.json's {len(roles)} channels"
                )
            cases.append(CaseFiles(name=case, files={roles[i]: p for i, p in sorted(channels.items())}))
    if four_d:
        roles = _channel_roles_near(four_d[0].parent, dataset_json, "4-D images")
        for path in four_d:
            channels = load_image(path).shape[3]
            if channels != len(roles):
                raise DataError(
                    f"{path}: {channels} channels on the last axis, but the dataset.json names "
                    f"{len(roles)} ({', '.join(roles)})"
                )
            cases.append(CaseFiles(name=nifti_stem(path.name), files=dict.fromkeys(roles, path), four_d=roles))
    return cases
