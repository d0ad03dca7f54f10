"""e2pa.data — BraTS-family data: label conventions, validated NIfTI I/O, discovery, MONAI transform
chains and an offline BraTS-like phantom.

The light parts (errors, labels, modalities, NIfTI I/O: numpy + nibabel) load with the package; the
heavy ones load on first use — ``datasets`` imports MONAI (~4 s) and ``phantom`` nilearn (~2 s) —
so that ``from e2pa.data import DataError`` does not pull either in by itself.
"""

import importlib

from .cases import CaseFiles, find_cases
from .errors import DataError
from .labels import (
    CONVENTIONS,
    REGIONS,
    LabelConvention,
    check_label_values,
    convention_from_label_names,
    convert_labels,
    get_convention,
    label_to_regions,
    nested_regions,
    regions_to_label,
)
from .modalities import MODALITIES, brats_file_name, canonical_modality
from .nifti import CaseGeometry, check_case, load_image, read_label_map, read_volume, save_label_map, save_volume

_LAZY = {
    "Cohort": "datasets",
    "discover": "datasets",
    "discover_brats": "datasets",
    "load_datalist": "datasets",
    "load_nnunet": "datasets",
    "channel_roles": "datasets",
    "LabelToRegionsd": "datasets",
    "CheckedCompose": "datasets",
    "train_transforms": "datasets",
    "val_transforms": "datasets",
    "infer_transforms": "datasets",
    "PhantomCase": "phantom",
    "make_phantom_case": "phantom",
    "write_phantom_cohort": "phantom",
    "check_phantom_geometry": "phantom",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CaseFiles",
    "find_cases",
    "CONVENTIONS",
    "MODALITIES",
    "REGIONS",
    "CaseGeometry",
    "DataError",
    "LabelConvention",
    "brats_file_name",
    "canonical_modality",
    "check_case",
    "check_label_values",
    "convention_from_label_names",
    "convert_labels",
    "get_convention",
    "label_to_regions",
    "load_image",
    "nested_regions",
    "read_label_map",
    "read_volume",
    "regions_to_label",
    "save_label_map",
    "save_volume",
    *_LAZY,
]
