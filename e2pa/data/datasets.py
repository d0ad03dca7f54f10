"""Finding BraTS-family data on disk and the MONAI transform chains that load it.

Discovery turns a data set into a :class:`Cohort`: MONAI-style lists of case dicts
``{"image": [flair, t1, t1ce, t2] paths or one 4-D path, "label": path, "case": name}`` plus the
modality order and the label convention. Three layouts are understood:

- a folder of BraTS case folders, ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (2018-2021) or
  ``<case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (2023): :func:`discover_brats`;
- a Decathlon ``dataset.json``: MSD Task01 (one 4-D image per case, modality order from the json)
  or the phantom's (four 3-D paths per case): :func:`load_datalist`;
- an nnU-Net v2 raw dataset, ``DatasetNNN_Name/{imagesTr,labelsTr,imagesTs}`` with one file per
  channel (``CASE_0000.nii.gz`` ...) and a ``dataset.json`` with ``channel_names``, ``labels``
  (name → int, or name → list of ints for region-based training), ``numTraining`` and
  ``file_ending``: :func:`load_nnunet`;
- any of them, picked from the path (a json, its folder, or nnU-Net's ``imagesTr`` / ``imagesTs`` /
  ``labelsTr``): :func:`discover`.

Channel order is never guessed: channels are mapped to the modality roles by the names the json
gives them (``channel_names``, ``modality``, or the modality suffixes of the file names it lists),
and anything that cannot be mapped stops with an error saying what to add.

The chains (:func:`train_transforms`, :func:`val_transforms`, :func:`infer_transforms`) validate
each case with :func:`e2pa.data.nifti.check_case` before MONAI touches it, so a bad file raises
:class:`DataError` naming it rather than a RuntimeError from deep inside ``LoadImaged``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import convert_to_dst_type

from .errors import DataError
from .labels import LabelConvention, convention_from_label_names, get_convention, label_to_regions
from .modalities import BRATS_NAMING, MODALITIES, canonical_modality
from .nifti import DEFAULT_AFFINE_ATOL, NIFTI_SUFFIXES, CaseGeometry, check_case, nifti_stem
from .validation import known_valid

SPLITS = ("training", "validation", "test")


@dataclass
class Cohort:
    """A discovered data set.

    ``training`` / ``validation``: labelled case dicts; ``test``: case dicts without ``"label"``.
    ``modalities``: the channel order of ``"image"`` (canonical names). ``label_convention``: how
    the label maps code the tumour sub-regions. ``source``: the folder or json it came from.
    """

    training: list[dict]
    validation: list[dict]
    test: list[dict]
    modalities: tuple[str, ...]
    label_convention: LabelConvention
    source: Path
    layout: str = ""

    def split(self, validation_fraction: float, seed: int = 0) -> Cohort:
        """A copy with a random ``validation_fraction`` of ``training`` (at least one case when the
        fraction is positive and two or more cases exist) moved to ``validation``; deterministic
        for a seed."""
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}")
        n_validation = round(len(self.training) * validation_fraction)
        if validation_fraction > 0 and len(self.training) >= 2:
            n_validation = max(n_validation, 1)
        order = list(range(len(self.training)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:n_validation])
        return replace(
            self,
            training=[c for i, c in enumerate(self.training) if i not in chosen],
            validation=self.validation + [c for i, c in enumerate(self.training) if i in chosen],
        )


# ------------------------------------------------------------------------------ BraTS folders
def discover_brats(
    root: str | os.PathLike, *, label_convention: str | LabelConvention = "auto", require_labels: bool = False
) -> Cohort:
    """Find BraTS case folders under ``root``.

    Each sub-folder holding files named ``<anything>_flair.nii.gz`` … (or the 2023 ``-t2f`` …
    names) is a case; folders without such files are ignored. Cases with a ``seg`` file go to
    ``training``, the others to ``test`` (``require_labels=True`` makes a missing label an error).
    ``label_convention="auto"`` reads the convention off the naming scheme (2023 names → 1/2/3,
    older names → 1/2/4). Raises :class:`DataError` naming the case for missing modalities, mixed
    naming schemes, duplicate files, or when no case is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of BraTS cases" + ("" if root.exists() else " (it does not exist)"))
    cases, schemes = [], set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _brats_files(folder)
        if not found:
            continue
        scheme_names = {scheme for scheme, _ in found.values()}
        if len(scheme_names) > 1:
            raise DataError(f"case {folder.name} ({folder}): mixes the naming schemes {sorted(scheme_names)}")
        scheme = scheme_names.pop()
        schemes.add(scheme)
        missing = [m for m in MODALITIES if m not in found]
        if missing:
            expected = ", ".join(
                f"{m} (*{BRATS_NAMING[scheme]['separator']}{BRATS_NAMING[scheme][m]}.nii.gz)" for m in missing
            )
            raise DataError(f"case {folder.name} ({folder}): missing modality files: {expected}")
        case = {"image": [str(found[m][1]) for m in MODALITIES], "case": folder.name}
        if "label" in found:
            case["label"] = str(found["label"][1])
        cases.append(case)
    if not cases:
        raise DataError(
            f"{root}: no BraTS case folders found (expected <case>/<case>_flair.nii.gz, _t1, _t1ce, _t2 "
            "or the 2023 names -t2f, -t1n, -t1c, -t2w)"
        )
    unlabelled = [c["case"] for c in cases if "label" not in c]
    if require_labels and unlabelled:
        raise DataError(
            f"{root}: {len(unlabelled)} case(s) have no label file (*_seg.nii.gz): {', '.join(unlabelled[:5])}"
        )
    if label_convention == "auto":
        if len(schemes) > 1:
            raise DataError(
                f"{root}: cases use different naming schemes {sorted(schemes)}; cannot infer one label "
                "convention, pass label_convention"
            )
        label_convention = schemes.pop()
    return Cohort(
        training=[c for c in cases if "label" in c],
        validation=[],
        test=[c for c in cases if "label" not in c],
        modalities=MODALITIES,
        label_convention=get_convention(label_convention),
        source=root,
        layout="brats-folders",
    )


def _brats_files(folder: Path) -> dict[str, tuple[str, Path]]:
    """Modality or ``"label"`` → (naming scheme, path) for the BraTS-named NIfTI files in ``folder``."""
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path.name)
        if stem is None or path.name.startswith("."):
            continue
        for scheme, naming in BRATS_NAMING.items():
            part = next((p for p in (*MODALITIES, "label") if stem.endswith(naming["separator"] + naming[p])), None)
            if part is None:
                continue
            if part in found:
                raise DataError(f"case {folder.name}: two files for {part}: {found[part][1]} and {path}")
            found[part] = (scheme, path)
    return found


# ------------------------------------------------------------------------------ dataset.json
def load_datalist(
    json_path: str | os.PathLike, *, label_convention: str | LabelConvention = "auto", allow_outside_paths: bool = False
) -> Cohort:
    """Read a Decathlon-style ``dataset.json`` (MSD Task01 or the phantom's).

    Paths are resolved against the json's folder; the ``modality`` map gives the channel order
    (defaults to flair, t1, t1ce, t2). ``label_convention="auto"`` takes the json's
    ``label_convention`` key, else recognises its ``labels`` names. ``training`` / ``validation``
    entries must have labels; ``test`` entries may be bare paths (as in MSD). Raises
    :class:`DataError` naming the json for a malformed file, unknown modality names, wrong image
    counts and missing files, and — unless ``allow_outside_paths`` — for paths that lead outside
    the json's folder (``../``, absolute paths or symbolic links elsewhere).
    """
    json_path = Path(json_path)
    try:
        spec = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise DataError(f"{json_path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{json_path}: not a readable JSON file ({error})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{json_path}: expected a JSON object with 'training' / 'validation' / 'test' lists")
    if "channel_names" in spec and not isinstance(spec.get("training"), list):
        return load_nnunet(json_path, label_convention=label_convention, spec=spec)
    if label_convention == "auto":
        label_convention = _json_convention(spec, json_path)
    modalities = _modality_order(spec, json_path)
    splits = {
        name: [
            _case_entry(
                entry, json_path, modalities, labelled=name != "test", index=i, allow_outside_paths=allow_outside_paths
            )
            for i, entry in enumerate(_entries(spec, name, json_path))
        ]
        for name in SPLITS
    }
    if not any(splits.values()):
        raise DataError(f"{json_path}: no cases in 'training', 'validation' or 'test'")
    four_d = any(isinstance(c["image"], str) for cases in splits.values() for c in cases)
    return Cohort(
        **splits,
        modalities=modalities,
        label_convention=get_convention(label_convention),
        source=json_path,
        layout="decathlon-4d" if four_d else "decathlon",
    )


_MODALITY_HINT = "FLAIR (or T2-FLAIR, t2f), T1 (T1w, t1n), T1ce (T1Gd, T1c, T1-contrast, t1post), T2 (T2w)"


def channel_roles(names: object, source: str) -> tuple[str, ...]:
    """A ``{"0": "FLAIR", "1": "T1w", ...}`` map (Decathlon ``modality`` or nnU-Net ``channel_names``)
    → the modality role of each channel in channel order. Names are matched case-insensitively
    through :func:`canonical_modality`; an unknown name, a gap in the indices or two channels with
    one role raise :class:`DataError` naming the channel and what to write instead."""
    if not isinstance(names, Mapping) or not names:
        raise DataError(
            f"{source}: expected an object of channel index → modality name, e.g. "
            f'{{"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}}; got {names!r}'
        )
    try:
        indices = sorted(names, key=int)
    except (TypeError, ValueError):
        raise DataError(f"{source}: channel indices must be integers 0, 1, ...; got {list(names)}") from None
    if [int(i) for i in indices] != list(range(len(indices))):
        raise DataError(f"{source}: channel indices must be 0..{len(indices) - 1}; got {indices}")
    roles = []
    for index in indices:
        try:
            roles.append(canonical_modality(str(names[index])))
        except ValueError:
            raise DataError(
                f"{source}: channel {index} is named {names[index]!r}, which is not a modality e2pa "
                f"knows; name it one of {_MODALITY_HINT} (case does not matter)"
            ) from None
    duplicated = sorted({r for r in roles if roles.count(r) > 1})
    if duplicated:
        raise DataError(
            f"{source}: several channels map to {', '.join(duplicated)} ({dict(names)}); each modality must appear once"
        )
    return tuple(roles)


def _modality_order(spec: Mapping, json_path: Path) -> tuple[str, ...]:
    """The channel order of the json's images: its ``modality`` map, else its ``channel_names``, else
    the modality suffixes of the image files it lists (``*_flair.nii.gz`` ...). Never assumed."""
    for key in ("modality", "channel_names"):
        if key in spec:
            modalities = channel_roles(spec[key], f"{json_path}: '{key}'")
            break
    else:
        modalities = _modalities_from_file_names(spec, json_path)
    if sorted(modalities) != sorted(MODALITIES):
        raise DataError(
            f"{json_path}: modalities {list(modalities)} are not the four BraTS modalities {list(MODALITIES)}"
        )
    return modalities


def _modalities_from_file_names(spec: Mapping, json_path: Path) -> tuple[str, ...]:
    entries = [e for split in SPLITS for e in _entries(spec, split, json_path)]
    if not entries:
        raise DataError(f"{json_path}: no cases in 'training', 'validation' or 'test'")
    lists = [e["image"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("image"), list)]
    missing_map = (
        f"{json_path}: no 'modality' map, so the channel order cannot be known; add e.g. "
        '"modality": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"} in the order of the images'
    )
    if not lists:
        raise DataError(missing_map + " (its 4-D images carry no modality names)")
    orders = set()
    for paths in lists:
        order = []
        for path in paths:
            stem = nifti_stem(Path(str(path)).name) or ""
            role = next(
                (r for sep in ("_", "-") if sep in stem for r in [_safe_modality(stem.rsplit(sep, 1)[1])] if r), None
            )
            if role is None:
                raise DataError(f"{missing_map} (the file name {path!r} ends in no modality name)")
            order.append(role)
        orders.add(tuple(order))
    if len(orders) > 1:
        raise DataError(f"{missing_map} (the listed files use different orders: {sorted(orders)})")
    return orders.pop()


def _safe_modality(name: str) -> str | None:
    try:
        return canonical_modality(name)
    except ValueError:
        return None


def _json_convention(spec: Mapping, json_path: Path) -> LabelConvention:
    try:
        if "label_convention" in spec:
            return get_convention(spec["label_convention"])
        if isinstance(spec.get("labels"), Mapping):
            return convention_from_label_names(spec["labels"])
    except (ValueError, TypeError) as error:
        raise DataError(f"{json_path}: {error}") from None
    raise DataError(f"{json_path}: no 'labels' map or 'label_convention' key; pass label_convention explicitly")


def _entries(spec: Mapping, split: str, json_path: Path) -> list:
    entries = spec.get(split, [])
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: '{split}' must be a list of cases; got {type(entries).__name__}")
    return entries


def _case_entry(
    entry: object,
    json_path: Path,
    modalities: tuple[str, ...],
    *,
    labelled: bool,
    index: int,
    allow_outside_paths: bool = False,
) -> dict:
    """One datalist entry → a case dict with absolute paths, checked to exist."""
    where = f"{json_path}: entry {index}"
    if isinstance(entry, str):  # MSD lists test images as bare paths
        entry = {"image": entry}
    if not isinstance(entry, Mapping) or "image" not in entry:
        raise DataError(f"{where} must be an object with an 'image' key; got {entry!r}")
    image = entry["image"]
    if isinstance(image, list):
        if len(image) != len(modalities) or not all(isinstance(p, str) for p in image):
            raise DataError(
                f"{where}: 'image' must list {len(modalities)} paths ({', '.join(modalities)}); got {image!r}"
            )
        paths: list[str] | str = [_resolve(p, json_path) for p in image]
    elif isinstance(image, str):
        paths = _resolve(image, json_path)
    else:
        raise DataError(f"{where}: 'image' must be a path or a list of paths; got {image!r}")
    case = {"image": paths}
    if labelled or "label" in entry:
        if not isinstance(entry.get("label"), str):
            raise DataError(f"{where}: a labelled case needs a 'label' path; got {entry.get('label')!r}")
        case["label"] = _resolve(entry["label"], json_path)
    files = ([paths] if isinstance(paths, str) else paths) + ([case["label"]] if "label" in case else [])
    missing = [p for p in files if not Path(p).is_file()]
    if missing:
        raise DataError(f"{where}: missing files: {', '.join(missing)}")
    if not allow_outside_paths:
        root = json_path.parent.resolve()
        outside = [p for p in files if not Path(p).resolve().is_relative_to(root)]
        if outside:
            raise DataError(
                f"{where}: {', '.join(outside)} lie(s) outside the dataset folder {root}; "
                f"entries must stay inside it (pass --allow-outside-paths to permit this)"
            )
    case["case"] = str(entry.get("case") or _case_name(paths if isinstance(paths, str) else paths[0]))
    return case


def _resolve(path: str, json_path: Path) -> str:
    return str((json_path.parent / path).resolve()) if not os.path.isabs(path) else path


def _case_name(image_path: str) -> str:
    """A case name from an image file name: extension and a trailing modality suffix removed."""
    stem = nifti_stem(Path(image_path).name) or Path(image_path).stem
    return re.sub(r"[_-](flair|t1ce|t1|t2|t2f|t1n|t1c|t2w|0000)$", "", stem)


# ------------------------------------------------------------------------------ nnU-Net v2 raw
NNUNET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def load_nnunet(
    json_path: str | os.PathLike, *, label_convention: str | LabelConvention = "auto", spec: Mapping | None = None
) -> Cohort:
    """Read an nnU-Net v2 raw dataset from its ``dataset.json``.

    Training cases: ``imagesTr/<case>_<XXXX><file_ending>`` (one file per channel, ``XXXX`` the
    4-digit channel index) with ``labelsTr/<case><file_ending>``; test cases: ``imagesTs`` (labelled
    when ``labelsTs/<case><file_ending>`` exists). ``channel_names`` maps channels to modality roles
    by name (:func:`channel_roles`); images are listed in e2pa's modality order whatever the channel
    order. ``labels`` (name → int, or region name → list of ints) gives the convention
    (:func:`~e2pa.data.labels.convention_from_nnunet_labels`). Raises :class:`DataError` naming the
    file for a bad json, a missing channel or label file, and ``numTraining`` not matching.
    """
    json_path = Path(json_path)
    if spec is None:
        try:
            spec = json.loads(json_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{json_path}: not a readable JSON file ({error})") from None
    root = json_path.parent
    roles = channel_roles(spec.get("channel_names"), f"{json_path}: 'channel_names'")
    ending = spec.get("file_ending", ".nii.gz")
    if ending not in NIFTI_SUFFIXES:
        raise DataError(f"{json_path}: file_ending {ending!r} is not supported; e2pa reads NIfTI (.nii.gz, .nii)")
    if label_convention == "auto":
        if "labels" not in spec:
            raise DataError(
                f"{json_path}: no 'labels' map (nnU-Net's name → label value); add one, e.g. "
                '{"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}'
            )
        from .labels import convention_from_nnunet_labels

        try:
            label_convention = convention_from_nnunet_labels(spec["labels"])
        except DataError as error:
            raise DataError(f"{json_path}: {error}") from None
    order = sorted(range(len(roles)), key=lambda i: MODALITIES.index(roles[i]))
    modalities = tuple(roles[i] for i in order)
    training = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, order, json_path, labelled=True)
    test = _nnunet_cases(root / "imagesTs", root / "labelsTs", ending, order, json_path, labelled=False)
    declared = spec.get("numTraining")
    if declared is not None and declared != len(training):
        raise DataError(
            f"{json_path}: numTraining is {declared} but imagesTr/labelsTr hold {len(training)} training case(s)"
        )
    if not training and not test:
        raise DataError(f"{json_path}: no cases in {root / 'imagesTr'} or {root / 'imagesTs'}")
    return Cohort(
        training=training,
        validation=[],
        test=test,
        modalities=modalities,
        label_convention=get_convention(label_convention),
        source=json_path,
        layout="nnunet",
    )


def _nnunet_cases(
    images: Path, labels: Path, ending: str, order: list[int], json_path: Path, *, labelled: bool
) -> list[dict]:
    """Case dicts of one nnU-Net images folder; ``order``: file channel index for each listed image."""
    if not images.is_dir():
        if labelled and labels.is_dir():
            raise DataError(f"{json_path}: {labels} exists but {images} does not")
        return []
    channels: dict[str, dict[int, Path]] = {}
    for path in sorted(images.iterdir()):
        if not path.name.endswith(ending) or path.name.startswith("."):
            continue
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(
                f"{path}: not named <case>_<XXXX>{ending} (one file per channel, XXXX the channel "
                "index, as nnU-Net expects)"
            )
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = []
    for case, files in channels.items():
        expected = set(range(len(order)))
        if set(files) != expected:
            missing = sorted(expected - set(files))
            extra = sorted(set(files) - expected)
            raise DataError(
                f"case {case} in {images}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing channel file(s) {', '.join(f'{case}_{i:04d}{ending}' for i in missing)}"
                        if missing
                        else "",
                        f"channel(s) {extra} are not in channel_names" if extra else "",
                    )
                    if part
                )
            )
        entry = {"image": [str(files[i]) for i in order], "case": case}
        label = labels / f"{case}{ending}"
        if label.is_file():
            entry["label"] = str(label)
        elif labelled:
            raise DataError(f"case {case}: no label file {label}")
        cases.append(entry)
    if labels.is_dir():
        orphans = sorted(
            p.name for p in labels.iterdir() if p.name.endswith(ending) and p.name[: -len(ending)] not in channels
        )
        if orphans:
            raise DataError(f"{labels}: label file(s) without images in {images}: {', '.join(orphans[:5])}")
    return cases


def discover(
    path: str | os.PathLike, *, label_convention: str | LabelConvention = "auto", allow_outside_paths: bool = False
) -> Cohort:
    """A cohort from a ``dataset.json`` file (Decathlon or nnU-Net), a folder holding one, one of an
    nnU-Net dataset's ``imagesTr`` / ``imagesTs`` / ``labelsTr`` / ``labelsTs`` folders (the dataset it
    belongs to), or a folder of BraTS cases. ``allow_outside_paths``: see :func:`load_datalist`."""
    path = Path(path)
    if path.is_file():
        return load_datalist(path, label_convention=label_convention, allow_outside_paths=allow_outside_paths)
    if (path / "dataset.json").is_file():
        return load_datalist(
            path / "dataset.json", label_convention=label_convention, allow_outside_paths=allow_outside_paths
        )
    if path.name in NNUNET_FOLDERS and (path.parent / "dataset.json").is_file():
        return load_datalist(
            path.parent / "dataset.json", label_convention=label_convention, allow_outside_paths=allow_outside_paths
        )
    return discover_brats(path, label_convention=label_convention)


# ------------------------------------------------------------------------------ transforms
class LabelToRegionsd(MapTransform):
    """Dictionary transform: label map ``[*S]`` / ``[1, *S]`` → ``float32`` regions ``[3, *S]`` (TC,
    WT, ET), keeping the MetaTensor metadata (affine, file name).

    Unlike MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` it knows all three conventions and
    refuses values outside the chosen one (:class:`DataError` naming the file) instead of mapping
    them to background.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_convention: str | LabelConvention = "brats2021",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_convention = get_convention(label_convention)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        out = dict(data)
        for key in self.key_iterator(out):
            label = out[key]
            source = label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            regions = label_to_regions(array, self.label_convention, source=source).astype(np.float32)
            out[key] = convert_to_dst_type(
                regions, dst=label, dtype=torch.float32 if isinstance(label, torch.Tensor) else np.float32
            )[0]
        return out


class CheckedCompose(Compose):
    """A :class:`monai.transforms.Compose` that validates each case's files before the chain runs.

    MONAI wraps any exception raised inside a chain in ``RuntimeError("applying transform ...")``;
    checking here, outside that wrapper, lets :class:`DataError` reach the caller as is. Checks run
    only when the chain starts from the beginning on file paths (``start == 0``), so the cached
    second half of a ``CacheDataset`` chain does not re-check, and results are memoised per file
    version (path, size, mtime).
    """

    def __init__(
        self,
        transforms: Sequence,
        *,
        image_key: str = "image",
        label_key: str | None = "label",
        modalities: Sequence[str] = MODALITIES,
        label_convention: str | LabelConvention = "brats2021",
    ) -> None:
        super().__init__(transforms)
        self.image_key, self.label_key = image_key, label_key
        self.modalities = tuple(modalities)
        self.label_convention = get_convention(label_convention)

    def __call__(
        self, input_: object, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> object:
        if start == 0:
            for case in input_ if isinstance(input_, list) else [input_]:
                if isinstance(case, Mapping):
                    self.check(case)
        return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)

    def check(self, case: Mapping) -> CaseGeometry | None:
        """Validate one case dict whose entries are still file paths (else nothing to check)."""
        image = case.get(self.image_key)
        label = case.get(self.label_key) if self.label_key else None
        if not _is_paths(image) or (label is not None and not _is_paths(label)):
            return None
        if self.label_key and label is None:
            raise DataError(f"case {case.get('case', '?')}: no '{self.label_key}' entry for a chain that needs labels")
        images = os.fspath(image) if isinstance(image, (str, os.PathLike)) else tuple(os.fspath(p) for p in image)
        return _check_case_memoised(
            images,
            os.fspath(label) if label is not None else None,
            self.modalities,
            self.label_convention,
            str(case.get("case", "")) or None,
        )


def _is_paths(value: object) -> bool:
    if isinstance(value, (str, os.PathLike)):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _check_case_memoised(
    image: str | tuple[str, ...],
    label: str | None,
    modalities: tuple[str, ...],
    convention: LabelConvention,
    case: str | None,
) -> CaseGeometry | None:
    files = ((image,) if isinstance(image, str) else image) + ((label,) if label else ())
    if known_valid(list(files), modalities, convention, labelled=label is not None):
        return None  # validated up front (validate_cases) and unchanged since: nothing to read twice
    versions = tuple(_file_version(p) for p in files)
    if None in versions:  # a file is missing: let check_case say which
        return check_case(image, label, modalities=modalities, label_convention=convention, case=case)
    return _check_case_version(image, label, modalities, convention, case, versions)


@functools.lru_cache(maxsize=65536)
def _check_case_version(
    image: str | tuple[str, ...],
    label: str | None,
    modalities: tuple[str, ...],
    convention: LabelConvention,
    case: str | None,
    versions: tuple,
) -> CaseGeometry:
    """check_case, memoised: ``versions`` (size and mtime per file) makes an edited file a new key."""
    return check_case(
        image if isinstance(image, str) else list(image),
        label,
        modalities=modalities,
        label_convention=convention,
        case=case,
    )


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class TolerantNibabelReader(NibabelReader):
    """MONAI's NIfTI reader, except that modalities whose affines differ from the first one's by at
    most ``affine_atol`` (scanner rounding, accepted by :func:`~e2pa.data.nifti.check_case`) are read
    on the first one's affine: MONAI stacks channels only when affines agree to ~1e-5 relative.
    Larger differences are left for MONAI to refuse (the case check reports them first)."""

    def __init__(self, affine_atol: float = DEFAULT_AFFINE_ATOL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.affine_atol = affine_atol

    def read(self, data, **kwargs):
        images = super().read(data, **kwargs)
        if not isinstance(images, (list, tuple)) or len(images) < 2:
            return images
        reference = images[0].affine
        aligned = [images[0]]
        for image in images[1:]:
            difference = np.abs(image.affine - reference).max()
            if 0 < difference <= self.affine_atol:
                image = nib.Nifti1Image(image.dataobj, reference, image.header)
            aligned.append(image)
        return aligned


def _loading(keys: list[str], label_convention: LabelConvention | None, pixdim: Sequence[float] | None) -> list:
    """Load (affines within the case check's tolerance read as equal) → channel first → label to
    TC/WT/ET (when ``label_convention``) → RAS → optional resampling to ``pixdim`` mm."""
    chain = [
        LoadImaged(keys=keys, image_only=True, reader=TolerantNibabelReader()),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys="image", dtype=torch.float32),
    ]
    if label_convention is not None:
        chain.append(LabelToRegionsd(keys="label", label_convention=label_convention))
    # labels=None: read the axis labels off the MetaTensor's space (RAS for NIfTI, LPS for ITK readers).
    chain.append(Orientationd(keys=keys, axcodes="RAS", labels=None))
    if pixdim is not None:
        chain.append(Spacingd(keys=keys, pixdim=tuple(pixdim), mode=("bilinear", "nearest")[: len(keys)]))
    return chain


def _normalising() -> NormalizeIntensityd:
    # Per modality, over brain voxels only: BraTS backgrounds are exactly 0 and must stay 0.
    return NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)


def train_transforms(
    roi_size: int | Sequence[int],
    *,
    label_convention: str | LabelConvention = "brats2021",
    modalities: Sequence[str] = MODALITIES,
    pixdim: Sequence[float] | None = None,
    crop: str = "pos_neg",
    num_samples: int = 1,
    pos: float = 1.0,
    neg: float = 1.0,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
) -> CheckedCompose:
    """Training chain for ``{"image", "label"}`` case dicts → ``image float32 [M, *roi]``,
    ``label float32 [3, *roi]`` (TC, WT, ET).

    Validate → load → regions → RAS → (``pixdim``) → pad to ``roi_size`` → crop
    (``crop="pos_neg"``: ``RandCropByPosNegLabeld`` with ``num_samples`` crops centred on tumour with
    odds ``pos:neg``, which returns a list per case (MONAI's DataLoader collates it); ``"random"``:
    ``RandSpatialCropd``) → random flips on each axis → per-channel z-score over the brain → random
    intensity scale and shift of ±``intensity_jitter``.
    """
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
    keys = ["image", "label"]
    if crop == "pos_neg":
        cropping = RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=roi,
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            image_key="image",
            image_threshold=0,
        )
    elif crop == "random":
        cropping = RandSpatialCropd(keys=keys, roi_size=roi, random_size=False)
    else:
        raise ValueError(f"crop must be 'pos_neg' or 'random'; got {crop!r}")
    chain = [
        *_loading(keys, get_convention(label_convention), pixdim),
        SpatialPadd(keys=keys, spatial_size=roi),
        cropping,
        *(RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)),
        _normalising(),
        RandScaleIntensityd(keys="image", factors=intensity_jitter, prob=1.0),
        RandShiftIntensityd(keys="image", offsets=intensity_jitter, prob=1.0),
    ]
    return CheckedCompose(chain, modalities=modalities, label_convention=label_convention)


def val_transforms(
    *,
    label_convention: str | LabelConvention = "brats2021",
    modalities: Sequence[str] = MODALITIES,
    pixdim: Sequence[float] | None = None,
) -> CheckedCompose:
    """Validation chain: whole volumes, ``image float32 [M, *S]`` and ``label float32 [3, *S]`` in RAS
    (resampled to ``pixdim`` mm when given), intensities z-scored per channel over the brain."""
    keys = ["image", "label"]
    chain = [*_loading(keys, get_convention(label_convention), pixdim), _normalising()]
    return CheckedCompose(chain, modalities=modalities, label_convention=label_convention)


def infer_transforms(
    *, modalities: Sequence[str] = MODALITIES, pixdim: Sequence[float] | None = None
) -> CheckedCompose:
    """Inference chain for ``{"image"}`` case dicts: ``image float32 [M, *S]`` as in
    :func:`val_transforms`. Its ``Orientationd`` / ``Spacingd`` are invertible, so predictions can be
    brought back to the file's grid with ``monai.transforms.Invertd(orig_keys="image")``."""
    chain = [*_loading(["image"], None, pixdim), _normalising()]
    return CheckedCompose(chain, label_key=None, modalities=modalities)
