"""BraTS-family label conventions and the conversion between label maps and the TC/WT/ET regions.

A label map is an integer volume ``[*S]`` (or ``[1, *S]``) with one tumour sub-region per value;
the networks predict three nested, overlapping *regions* instead, channels first in MONAI's order:

- ``TC`` tumour core     = necrosis/non-enhancing core ∪ enhancing tumour
- ``WT`` whole tumour    = every tumour label (core ∪ edema)
- ``ET`` enhancing tumour

The three conventions in use differ only in which integer codes which sub-region:

============  ===========  =====  =====  =====
convention    NCR / NETC   ED /   ET     RC
                           SNFH
============  ===========  =====  =====  =====
brats2021     1            2      4      —       (BraTS 2018-2021)
brats2023     1            2      3      —       (BraTS 2023 GLI)
brats2024     1            2      3      4       (BraTS 2024 GLI post-treatment: 4 = resection cavity)
msd           2            1      3      —       (Medical Segmentation Decathlon Task01, per its dataset.json;
                                                  also nnU-Net's BraTS region datasets, e.g. Dataset137)
============  ===========  =====  =====  =====

Mixing them up silently ruins ET scores, so every entry point checks the values it is given.

The resection cavity (RC) is not tumour: it belongs to none of TC, WT, ET (the official BraTS 2024
evaluator, ``brats-evaluation`` 0.0.10 ``configs/config_gli.yaml``: ET = 3, NETC = 1, SNFH = 2, RC = 4,
TC = 1 + 3, WT = 1 + 2 + 3). :meth:`LabelConvention.scored_regions` lists every region the scorer
reports, sub-regions included.
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
    resection_cavity: int | None = None

    def __post_init__(self) -> None:
        codes = (self.necrotic, self.edema, self.enhancing)
        codes += (self.resection_cavity,) if self.resection_cavity is not None else ()
        if len(set(codes)) != len(codes) or not all(isinstance(c, int) and 0 < c < 256 for c in codes):
            raise ValueError(
                f"label convention {self.name!r}: the NCR, ED, ET (and RC) codes must be different "
                f"integers in 1..255 (stored as uint8); got {codes}"
            )

    @property
    def values(self) -> tuple[int, ...]:
        """The allowed label values, background included, ascending."""
        rc = (self.resection_cavity,) if self.resection_cavity is not None else ()
        return tuple(sorted((0, self.necrotic, self.edema, self.enhancing, *rc)))

    @property
    def label_names(self) -> dict[int, str]:
        """Value → name, in the spelling of a Decathlon ``dataset.json`` ``labels`` map."""
        names = {
            0: "background",
            self.necrotic: "necrotic tumour core (NCR)",
            self.edema: "peritumoral edema (ED)",
            self.enhancing: "enhancing tumour (ET)",
        }
        if self.resection_cavity is not None:
            names[self.resection_cavity] = "resection cavity (RC)"
        return dict(sorted(names.items()))

    def scored_regions(self) -> dict[str, tuple[int, ...]]:
        """Region name → the label values it unites, in report order: the nested TC, WT, ET the
        networks predict, then the sub-regions NETC (necrosis / non-enhancing core), SNFH (edema)
        and, where the convention has it, RC — the groups of the official BraTS 2024 evaluator."""
        regions = {
            "TC": (self.necrotic, self.enhancing),
            "WT": (self.necrotic, self.edema, self.enhancing),
            "ET": (self.enhancing,),
            "NETC": (self.necrotic,),
            "SNFH": (self.edema,),
        }
        if self.resection_cavity is not None:
            regions["RC"] = (self.resection_cavity,)
        return regions

    def to_dict(self) -> dict:
        """A JSON-able spec that :func:`get_convention` turns back into this convention."""
        return {
            "name": self.name,
            "necrotic": self.necrotic,
            "edema": self.edema,
            "enhancing": self.enhancing,
            "resection_cavity": self.resection_cavity,
            "description": self.description,
        }


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention(
        "brats2021", necrotic=1, edema=2, enhancing=4, description="BraTS 2018-2021: 1 NCR/NET, 2 ED, 4 ET"
    ),
    "brats2023": LabelConvention(
        "brats2023", necrotic=1, edema=2, enhancing=3, description="BraTS 2023: 1 NCR, 2 ED/SNFH, 3 ET"
    ),
    "brats2024": LabelConvention(
        "brats2024",
        necrotic=1,
        edema=2,
        enhancing=3,
        resection_cavity=4,
        description="BraTS 2024 GLI post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC",
    ),
    "msd": LabelConvention(
        "msd",
        necrotic=2,
        edema=1,
        enhancing=3,
        description="MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour",
    ),
}
_ALIASES = {
    "brats2018": "brats2021",
    "brats2019": "brats2021",
    "brats2020": "brats2021",
    "brats": "brats2021",
    "msd_task01": "msd",
    "task01": "msd",
    "decathlon": "msd",
    "brats2024_gli": "brats2024",
    "brats2025": "brats2024",
    "brats_gli_2024": "brats2024",
}


def get_convention(convention: str | LabelConvention | Mapping) -> LabelConvention:
    """Resolve a convention name (``"brats2021"``, ``"brats2023"``, ``"brats2024"``, ``"msd"`` or an
    alias such as ``"brats2020"``), a :meth:`LabelConvention.to_dict` spec (how checkpoints store
    conventions read off a ``dataset.json``) or pass a :class:`LabelConvention` through;
    :class:`ValueError` for unknown names and bad specs."""
    if isinstance(convention, LabelConvention):
        return convention
    if isinstance(convention, Mapping):
        try:
            return LabelConvention(
                **{k: convention[k] for k in ("name", "necrotic", "edema", "enhancing")},
                resection_cavity=convention.get("resection_cavity"),
                description=str(convention.get("description", "")),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"invalid label convention spec {dict(convention)!r}: {error}") from None
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
        role = _label_role(str(name))
        if role is not None:
            if role in codes:
                raise DataError(
                    f"label names {dict(label_names)}: two labels ({codes[role]} and {code}) read as {role}"
                )
            codes[role] = code
    return _convention_from_codes(codes, f"the label names {dict(label_names)}")


def _label_role(name: str) -> str | None:
    """Which sub-region a label name means (``necrotic``, ``edema``, ``enhancing``,
    ``resection_cavity``), or None (background and unknown names)."""
    words = re.findall(r"[a-z]+", name.lower())
    enhancing_word = any(w.startswith("enhanc") for w in words)
    necrotic_word = any(w.startswith("necro") for w in words) or bool({"ncr", "net", "netc"} & set(words))
    if necrotic_word or ("non" in words and enhancing_word):
        return "necrotic"
    if enhancing_word or "et" in words:
        return "enhancing"
    if {"edema", "oedema", "snfh", "ed"} & set(words) or "hyperintensity" in words:
        return "edema"
    if "cavity" in words or "rc" in words or "resection" in words:
        return "resection_cavity"
    return None


def _convention_from_codes(codes: Mapping[str, int], source: str) -> LabelConvention:
    missing = {"necrotic", "edema", "enhancing"} - codes.keys()
    if missing:
        raise DataError(
            f"cannot tell the label convention from {source}: no label recognised as "
            f"{', '.join(sorted(missing))} (name them e.g. 'necrotic tumour core', 'edema', "
            "'enhancing tumour', 'resection cavity')"
        )
    key = (codes["necrotic"], codes["edema"], codes["enhancing"], codes.get("resection_cavity"))
    for known in CONVENTIONS.values():
        if (known.necrotic, known.edema, known.enhancing, known.resection_cavity) == key:
            return known
    try:
        return LabelConvention("custom", *key[:3], description=f"from {source}", resection_cavity=key[3])
    except ValueError as error:
        raise DataError(f"{source}: {error}") from None


def convention_from_nnunet_labels(labels: Mapping[str, object]) -> LabelConvention:
    """The convention of an nnU-Net v2 ``dataset.json`` ``labels`` map (name → int, or name → list of
    ints for region-based training), e.g. nnU-Net's BraTS ``{"background": 0, "whole tumor": [1, 2, 3],
    "tumor core": [2, 3], "enhancing tumor": [3]}`` (1 edema, 2 necrosis, 3 ET — the ``msd`` codes).

    Plain labels are recognised by name (as in :func:`convention_from_label_names`); regions by
    name (whole tumour / WT, tumour core / TC, enhancing tumour / ET) and resolved to codes: ET's
    code, TC minus ET = necrosis, WT minus TC = edema. Raises :class:`DataError` saying what to add.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"the 'labels' map must be an object of name → label value; got {labels!r}")
    plain: dict[int, str] = {}
    regions: dict[str, set[int]] = {}
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        try:
            ints = {int(v) for v in values}
            if any(int(v) != v for v in values):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError(f"label {name!r}: value {value!r} is not an integer or a list of integers") from None
        if isinstance(value, (list, tuple)) and len(ints) > 1:
            region = _region_name(str(name))
            if region is None:
                raise DataError(
                    f"region label {name!r} = {list(value)}: not recognised as whole tumour (WT) or "
                    "tumour core (TC); rename it"
                )
            regions[region] = ints
        else:
            (code,) = ints
            plain[code] = str(name)
    if not regions:
        return convention_from_label_names(plain)
    codes: dict[str, int] = {}
    for code, name in plain.items():
        role = _label_role(name)
        if role is not None:
            codes[role] = code
    missing = sorted(({"WT", "TC"} - regions.keys()) | ({"ET"} - ({"ET"} if "enhancing" in codes else set())))
    if missing:
        raise DataError(
            f"region labels {dict(labels)}: need 'whole tumor' (WT), 'tumor core' (TC) and "
            f"'enhancing tumor' (ET); missing {', '.join(missing)}"
        )
    core = regions["TC"] - {codes["enhancing"]}
    edema = regions["WT"] - regions["TC"]
    if len(core) != 1 or len(edema) != 1 or not regions["TC"] <= regions["WT"]:
        raise DataError(
            f"region labels {dict(labels)}: expected WT ⊃ TC ⊃ {{ET}} with one label per step "
            "(edema = WT − TC, necrosis = TC − ET)"
        )
    codes["necrotic"], codes["edema"] = core.pop(), edema.pop()
    return _convention_from_codes(codes, f"the region labels {dict(labels)}")


def _region_name(name: str) -> str | None:
    words = re.findall(r"[a-z]+", name.lower())
    if "wt" in words or ("whole" in words and any(w.startswith("tum") for w in words)):
        return "WT"
    if "tc" in words or ("core" in words and any(w.startswith("tum") for w in words)):
        return "TC"
    return None


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
        raise DataError(
            f"{where}label values {shown} are not in the {convention.name} convention "
            f"{list(convention.values)} ({convention.description}){hint}"
        )


def _spatial(label: np.ndarray) -> np.ndarray:
    """Drop a leading singleton channel axis: ``[1, *S]`` → ``[*S]``."""
    label = np.asarray(label)
    return label[0] if label.ndim == 4 and label.shape[0] == 1 else label


def label_to_regions(
    label: np.ndarray, convention: str | LabelConvention = "brats2021", source: str | None = None
) -> np.ndarray:
    """Label map ``[*S]`` or ``[1, *S]`` → boolean regions ``[3, *S]`` in the order TC, WT, ET.

    Raises :class:`DataError` (naming ``source``) for values outside ``convention``.
    """
    convention = get_convention(convention)
    label = _spatial(label)
    check_label_values(label, convention, source)
    necrotic, edema = label == convention.necrotic, label == convention.edema
    enhancing = label == convention.enhancing
    return np.stack([necrotic | enhancing, necrotic | edema | enhancing, enhancing])


def regions_to_label(
    regions: np.ndarray, convention: str | LabelConvention = "brats2021", threshold: float = 0.5
) -> np.ndarray:
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


def nested_regions(
    regions: np.ndarray, convention: str | LabelConvention = "brats2021", threshold: float = 0.5
) -> np.ndarray:
    """The TC/WT/ET regions ``bool [3, *S]`` of the label map that :func:`regions_to_label` writes
    for ``regions`` (probabilities cut at ``threshold``, or booleans): nested by construction (ET ⊆ TC
    ⊆ WT), whatever the raw channels were. Training validation, ``e2pa evaluate`` and the label maps
    ``e2pa infer`` writes all go through here, so they score the same thing."""
    convention = get_convention(convention)
    return label_to_regions(regions_to_label(regions, convention, threshold), convention)


def convert_labels(label: np.ndarray, source: str | LabelConvention, target: str | LabelConvention) -> np.ndarray:
    """Recode a label map from one convention to another (e.g. BraTS 2021 4 → BraTS 2023 3); same
    shape, ``uint8``. Raises :class:`DataError` for values outside ``source``."""
    source, target = get_convention(source), get_convention(target)
    label = np.asarray(label)
    check_label_values(label, source)
    out = np.zeros(label.shape, dtype=np.uint8)
    for role in ("necrotic", "edema", "enhancing"):
        out[label == getattr(source, role)] = getattr(target, role)
    if source.resection_cavity is not None and (label == source.resection_cavity).any():
        if target.resection_cavity is None:
            raise DataError(
                f"the label map has resection-cavity voxels ({source.resection_cavity}) but the "
                f"{target.name} convention has no resection-cavity label"
            )
        out[label == source.resection_cavity] = target.resection_cavity
    return out
