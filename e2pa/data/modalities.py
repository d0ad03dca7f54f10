"""Canonical modality names, their aliases in the wild, and BraTS file naming.

The library's channel order is ``MODALITIES = ("flair", "t1", "t1ce", "t2")``: the order of the
MSD Task01 ``dataset.json`` and of the MONAI BraTS tutorials, so a 4-D MSD image needs no reordering.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
MODALITY_DISPLAY_NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce", "t2": "T2"}

# Names seen in BraTS 2018-2021 file suffixes, BraTS 2023 suffixes and MSD dataset.json files.
_ALIASES = {
    "flair": "flair",
    "t2f": "flair",
    "t2-flair": "flair",
    "t2flair": "flair",
    "t2w-flair": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1-native": "t1",
    "t1-pre": "t1",
    "t1pre": "t1",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t1gd": "t1ce",
    "t1-gd": "t1ce",
    "t1-ce": "t1ce",
    "t1post": "t1ce",
    "t1-contrast": "t1ce",
    "t1contrast": "t1ce",
    "t1-post": "t1ce",
    "t1-post-contrast": "t1ce",
    "t1postcontrast": "t1ce",
    "t1wce": "t1ce",
    "t1w-ce": "t1ce",
    "t1-gad": "t1ce",
    "t1gad": "t1ce",
    "t1-c": "t1ce",
    "t1-enhanced": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}

# BraTS file naming: ``<case><separator><suffix>.nii.gz``; the separator and the suffixes changed in 2023.
BRATS_NAMING: dict[str, dict[str, str]] = {
    "brats2021": {"separator": "_", "flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "label": "seg"},
    "brats2023": {"separator": "-", "flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "label": "seg"},
}


def canonical_modality(name: str) -> str:
    """Map a modality name as written in a file name or ``dataset.json`` (``"T1w"``, ``"t1gd"``,
    ``"t2f"`` ...) to one of :data:`MODALITIES`; raise :class:`ValueError` for an unknown name."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    if key.replace("-", "") in _ALIASES:
        return _ALIASES[key.replace("-", "")]
    raise ValueError(f"unknown MRI modality name {name!r}; known names: {sorted(_ALIASES)}")


def brats_file_name(case: str, part: str, naming: str = "brats2021", extension: str = ".nii.gz") -> str:
    """File name of one modality (``part`` in :data:`MODALITIES`) or of the label map (``part="label"``)
    of ``case`` in a BraTS naming scheme, e.g. ``BraTS2021_00000_t1ce.nii.gz`` or
    ``BraTS-GLI-00000-000-t1c.nii.gz``."""
    scheme = BRATS_NAMING[naming]
    return f"{case}{scheme['separator']}{scheme[part]}{extension}"
