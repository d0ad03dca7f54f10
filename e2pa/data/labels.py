"""BraTS-family label conventions and the conversion between label maps and the TC/WT/ET regions.

A label map is an integer volume ``[*S]`` (or ``[1, *S]``) with one tumour sub-region per value;
the networks predict three nested, overlapping *regions* instead, channels first in MONAI's order:

- ``TC`` tumour core     = necrosis/non-enhancing core ∪ enhancing tumour
- ``WT`` whole tumour    = every tumour label (core ∪ edema)
- ``ET`` enhancing tumour

The three conventions in use differ only in which integer codes which sub-region:

============  ===========  =====  =====
convention    NCR / NET    ED     ET
============  ===========  =====  =====
brats2021     1            2      4       (BraTS 2018-2021)
brats2023     1            2      3       (BraTS 2023 GLI)
msd           2            1      3       (Medical Segmentation Decathlon Task01, per its dataset.json)
============  ===========  =====  =====

Mixing them up silently ruins ET scores, so every entry point checks the values it is given.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import DataError

REGIONS: tuple[str, ...] = ("TC", "WT", "ET")


@dataclass(frozen=True)
class LabelConvention:
    """Which integer codes necrosis (``necrotic``), edema and enhancing tumour in a label map; 0 is
    background."""

    name: str
    necrotic: int
    edema: int
    enhancing: int
    description: str = ""

    def __post_init__(self) -> None:
        codes = (self.necrotic, self.edema, self.enhancing)
        if len(set(codes)) != 3 or not all(isinstance(c, int) and 0 < c < 256 for c in codes):
            raise ValueError(f"label convention {self.name!r}: the NCR, ED and ET codes must be three different "
                             f"integers in 1..255 (stored as uint8); got {codes}")

    @property
    def values(self) -> tuple[int, ...]:
        """The allowed label values, background included, ascending."""
        return tuple(sorted((0, self.necrotic, self.edema, self.enhancing)))

    @property
    def label_names(self) -> dict[int, str]:
        """Value → name, in the spelling of a Decathlon ``dataset.json`` ``labels`` map."""
        names = {0: "background", self.necrotic: "necrotic tumour core (NCR)",
                 self.edema: "peritumoral edema (ED)", self.enhancing: "enhancing tumour (ET)"}
        return dict(sorted(names.items()))


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention("brats2021", necrotic=1, edema=2, enhancing=4,
                                 description="BraTS 2018-2021: 1 NCR/NET, 2 ED, 4 ET"),
    "brats2023": LabelConvention("brats2023", necrotic=1, edema=2, enhancing=3,
                                 description="BraTS 2023: 1 NCR, 2 ED/SNFH, 3 ET"),
    "msd": LabelConvention("msd", necrotic=2, edema=1, enhancing=3,
                           description="MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour"),
}
_ALIASES = {"brats2018": "brats2021", "brats2019": "brats2021", "brats2020": "brats2021",
            "brats": "brats2021", "msd_task01": "msd", "task01": "msd", "decathlon": "msd"}


def get_convention(convention: str | LabelConvention) -> LabelConvention:
    """Resolve a convention name (``"brats2021"``, ``"brats2023"``, ``"msd"`` or an alias such as
    ``"brats2020"``) or pass a :class:`LabelConvention` through; :class:`ValueError` for unknown names."""
    if isinstance(convention, LabelConvention):
        return convention
    key = str(convention).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; choose one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[key]


def convention_from_label_names(label_names: Mapping[str | int, str]) -> LabelConvention:
    """Recognise the convention of a Decathlon ``dataset.json`` ``labels`` map such as
    ``{"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}``.

    Returns the matching named convention, or a custom one when the codes fit none of them; raises
    :class:`DataError` when the names do not identify the three sub-regions.
    """
    codes: dict[str, int] = {}
    for value, name in label_names.items():
        try:
            code = int(value)
        except (TypeError, ValueError):
            raise DataError(f"label value {value!r} in the label names {dict(label_names)} is not an integer") from None
        words = re.findall(r"[a-z]+", str(name).lower())
        enhancing_word = any(w.startswith("enhanc") for w in words)
        necrotic_word = any(w.startswith("necro") for w in words) or bool({"ncr", "net"} & set(words))
        if necrotic_word or ("non" in words and enhancing_word):
            codes["necrotic"] = code
        elif enhancing_word or "et" in words:
            codes["enhancing"] = code
        elif {"edema", "oedema", "snfh", "ed"} & set(words):
            codes["edema"] = code
    missing = {"necrotic", "edema", "enhancing"} - codes.keys()
    if missing:
        raise DataError(f"cannot tell the label convention from the label names {dict(label_names)}: "
                        f"no label recognised as {', '.join(sorted(missing))}")
    for known in CONVENTIONS.values():
        if (known.necrotic, known.edema, known.enhancing) == (codes["necrotic"], codes["edema"], codes["enhancing"]):
            return known
    try:
        return LabelConvention("custom", codes["necrotic"], codes["edema"], codes["enhancing"],
                               description=f"from label names {dict(label_names)}")
    except ValueError as error:
        raise DataError(f"label names {dict(label_names)}: {error}") from None


def check_label_values(label: np.ndarray, convention: str | LabelConvention, source: str | None = None) -> None:
    """Raise :class:`DataError` unless every value of ``label`` (any shape) is an integer of
    ``convention``; the message names ``source`` (a file or case) and the unexpected values, and says
    which other convention the values would fit."""
    convention = get_convention(convention)
    label = np.asarray(label)
    where = f"{source}: " if source else ""
    if label.dtype.kind not in "biuf":
        raise DataError(f"{where}label map has data type {label.dtype}; expected integers")
    values = np.unique(label).tolist()  # Python numbers: exact for every integer dtype
    odd = [v for v in values if not (math.isfinite(v) and v == int(v))] if label.dtype.kind == "f" else []
    if odd:
        raise DataError(f"{where}label map has non-integer values {odd[:8]}; a label map holds integer class codes")
    present = {int(v) for v in values}
    unexpected = sorted(present - set(convention.values))
    if unexpected:
        fits = [c.name for c in CONVENTIONS.values() if present <= set(c.values)]
        hint = f"; the values fit the {' / '.join(fits)} convention" if fits else ""
        shown = f"{unexpected[:8]}" + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise DataError(f"{where}label values {shown} are not in the {convention.name} convention "
                        f"{list(convention.values)} ({convention.description}){hint}")


def _spatial(label: np.ndarray) -> np.ndarray:
    """Drop a leading singleton channel axis: ``[1, *S]`` → ``[*S]``."""
    label = np.asarray(label)
    return label[0] if label.ndim == 4 and label.shape[0] == 1 else label


def label_to_regions(label: np.ndarray, convention: str | LabelConvention = "brats2021",
                     source: str | None = None) -> np.ndarray:
    """Label map ``[*S]`` or ``[1, *S]`` → boolean regions ``[3, *S]`` in the order TC, WT, ET.

    Raises :class:`DataError` (naming ``source``) for values outside ``convention``.
    """
    convention = get_convention(convention)
    label = _spatial(label)
    check_label_values(label, convention, source)
    necrotic, edema = label == convention.necrotic, label == convention.edema
    enhancing = label == convention.enhancing
    return np.stack([necrotic | enhancing, necrotic | edema | enhancing, enhancing])


def regions_to_label(regions: np.ndarray, convention: str | LabelConvention = "brats2021",
                     threshold: float = 0.5) -> np.ndarray:
    """Regions ``[3, *S]`` (TC, WT, ET; boolean, or probabilities cut at ``threshold``) → ``uint8``
    label map ``[*S]`` in ``convention``.

    Written outermost first, WT → edema, TC → necrosis, ET → enhancing, so that inner regions
    overwrite outer ones; a voxel marked TC or ET but not WT (an inconsistent prediction) still
    gets its inner label.
    """
    convention = get_convention(convention)
    regions = np.asarray(regions)
    if regions.ndim < 2 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"regions must be [3, *S] (TC, WT, ET); got shape {regions.shape}")
    inside = regions if regions.dtype == bool else regions > threshold
    label = np.zeros(regions.shape[1:], dtype=np.uint8)
    label[inside[1]] = convention.edema
    label[inside[0]] = convention.necrotic
    label[inside[2]] = convention.enhancing
    return label


def convert_labels(label: np.ndarray, source: str | LabelConvention, target: str | LabelConvention) -> np.ndarray:
    """Recode a label map from one convention to another (e.g. BraTS 2021 4 → BraTS 2023 3); same
    shape, ``uint8``. Raises :class:`DataError` for values outside ``source``."""
    source, target = get_convention(source), get_convention(target)
    label = np.asarray(label)
    check_label_values(label, source)
    out = np.zeros(label.shape, dtype=np.uint8)
    for role in ("necrotic", "edema", "enhancing"):
        out[label == getattr(source, role)] = getattr(target, role)
    return out
