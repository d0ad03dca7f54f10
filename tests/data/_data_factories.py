"""Small factories shared by the data-layer tests (imported by name; pytest puts this folder on
sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from e2pa.data import get_convention

TINY_SHAPE = (10, 12, 8)
TINY_AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.5, -8], [0, 0, 0, 1]])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = TINY_AFFINE) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    nib.save(image, path)
    return path


def tiny_label(shape=TINY_SHAPE, convention="brats2021") -> np.ndarray:
    """A label map with all three tumour labels: edema around a core with an enhancing half."""
    convention = get_convention(convention)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:8, 2:9, 1:7] = convention.edema
    label[3:7, 4:7, 2:6] = convention.necrotic
    label[3:7, 4:7, 4:6] = convention.enhancing
    return label


# ------------------------------------------------------------------------------ layouts in the wild
def _phantom_cases(cohort_json: Path) -> tuple[list[dict], object]:
    """The labelled cases of a phantom cohort (images in e2pa's modality order) and its convention."""
    from e2pa.data import discover

    cohort = discover(cohort_json)
    return cohort.training + cohort.validation, cohort.label_convention


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


NNUNET_BRATS_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}  # nnU-Net's Dataset137 order
NNUNET_BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def write_nnunet_dataset(
    cohort_json: Path,
    root: Path,
    *,
    channel_names: dict = NNUNET_BRATS_CHANNELS,
    labels: dict = NNUNET_BRATS_LABELS,
    label_convention: str = "msd",
    test_cases: int = 1,
    test_labels: bool = True,
) -> Path:
    """An nnU-Net v2 raw dataset ``root/DatasetNNN_Name/{imagesTr,labelsTr,imagesTs[,labelsTs]}`` with
    one file per channel in ``channel_names`` order, built from a phantom cohort, as nnU-Net's
    ``generate_dataset_json`` writes it. Labels are recoded to ``label_convention``. Returns dataset.json."""
    from e2pa.data import canonical_modality, convert_labels
    from e2pa.data.modalities import MODALITIES

    cases, source = _phantom_cases(cohort_json)
    root.mkdir(parents=True)
    roles = [canonical_modality(channel_names[str(i)]) for i in range(len(channel_names))]
    n_train = len(cases) - test_cases
    for i, case in enumerate(cases):
        images, labels_dir = ("imagesTr", "labelsTr") if i < n_train else ("imagesTs", "labelsTs")
        (root / images).mkdir(exist_ok=True)
        for channel, role in enumerate(roles):
            data, affine = _load(case["image"][MODALITIES.index(role)])
            write_nifti(root / images / f"{case['case']}_{channel:04d}.nii.gz", data, affine)
        if i < n_train or test_labels:
            (root / labels_dir).mkdir(exist_ok=True)
            label, affine = _load(case["label"])
            write_nifti(
                root / labels_dir / f"{case['case']}.nii.gz", convert_labels(label, source, label_convention), affine
            )
    spec = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": root.name,
    }
    if any(isinstance(v, list) for v in labels.values()):
        spec["regions_class_order"] = [1, 2, 3]
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root / "dataset.json"


MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def write_msd_task01(
    cohort_json: Path, root: Path, *, modality: dict | None = MSD_MODALITY, test_cases: int = 1
) -> Path:
    """An MSD Task01-style dataset: one 4-D image per case (modalities on the last axis in
    ``modality`` order), ``msd`` labels, test images listed as bare paths. Returns dataset.json."""
    from e2pa.data import canonical_modality, convert_labels
    from e2pa.data.modalities import MODALITIES

    cases, source = _phantom_cases(cohort_json)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    order = [canonical_modality(v) for _, v in sorted((modality or MSD_MODALITY).items(), key=lambda kv: int(kv[0]))]
    training, test = [], []
    n_train = len(cases) - test_cases
    for i, case in enumerate(cases):
        volumes = [_load(case["image"][MODALITIES.index(m)]) for m in order]
        stacked = np.stack([v for v, _ in volumes], axis=-1).astype(np.float32)
        folder = "imagesTr" if i < n_train else "imagesTs"
        write_nifti(root / folder / f"{case['case']}.nii.gz", stacked, volumes[0][1])
        if i < n_train:
            label, affine = _load(case["label"])
            write_nifti(root / "labelsTr" / f"{case['case']}.nii.gz", convert_labels(label, source, "msd"), affine)
            training.append(
                {"image": f"./imagesTr/{case['case']}.nii.gz", "label": f"./labelsTr/{case['case']}.nii.gz"}
            )
        else:
            test.append(f"./imagesTs/{case['case']}.nii.gz")
    spec = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training),
        "training": training,
        "test": test,
    }
    if modality is not None:
        spec["modality"] = modality
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root / "dataset.json"


def write_brats2024(cohort_json: Path, root: Path) -> Path:
    """A BraTS 2024 GLI post-treatment-style cohort: 2023 file names (``-t2f`` ...), labels 1 NETC,
    2 SNFH, 3 ET and a 4 RC resection cavity beside the tumour, listed in a dataset.json whose label
    names say so. Returns dataset.json."""
    from e2pa.data import brats_file_name, convert_labels
    from e2pa.data.modalities import MODALITIES

    cases, source = _phantom_cases(cohort_json)
    entries = []
    for case in cases:
        name = f"BraTS-GLI-{case['case'][-3:]}00-000"
        folder = root / name
        folder.mkdir(parents=True)
        files = []
        for i, modality in enumerate(MODALITIES):
            data, affine = _load(case["image"][i])
            files.append(str(write_nifti(folder / brats_file_name(name, modality, "brats2023"), data, affine)))
        label, affine = _load(case["label"])
        label = convert_labels(label, source, "brats2023")
        brain = _load(case["image"][0])[0] > 0
        centre = np.argwhere(brain & (label == 0)).mean(axis=0).astype(int)
        cavity = np.zeros(label.shape, bool)
        cavity[tuple(slice(c - 2, c + 3) for c in centre)] = True
        label[cavity & (label == 0)] = 4
        seg = write_nifti(folder / brats_file_name(name, "label", "brats2023"), label.astype(np.uint8), affine)
        entries.append({"image": files, "label": str(seg), "case": name})
    spec = {
        "name": "BraTS-GLI-2024",
        "modality": {"0": "FLAIR", "1": "T1", "2": "T1c", "3": "T2"},
        "labels": {"0": "background", "1": "NETC", "2": "SNFH", "3": "ET", "4": "RC"},
        "training": entries[:-1],
        "validation": entries[-1:],
    }
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root / "dataset.json"
