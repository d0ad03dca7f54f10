"""Label-map pairs on which e2pa's ``official`` metric convention is compared with the official BraTS
evaluator (``brats-evaluation`` 0.0.10 with panoptica 2.1.7, ``config_gli.yaml``).

Codes as in BraTS 2024 GLI: 1 NETC, 2 SNFH, 3 ET, 4 RC. Hand-made cases cover the edge cases the
issue lists; phantom cases are the phantom's tumour with realistic prediction errors. Spacing is
anisotropic on purpose (it exposes which axis the official reader measures with which zoom).

Regenerate the frozen outputs (the official package needs numpy < 2.3 and pandas < 3, so it lives
in its own venv; nothing else here needs it)::

    python -m venv /tmp/offvenv && /tmp/offvenv/bin/pip install brats-evaluation==0.0.10 panoptica==2.1.7
    PYTHONPATH=. .venv/bin/python tests/data/_official_cases.py /tmp/official_cases      # writes NIfTI pairs
    /tmp/offvenv/bin/python tests/data/make_official_reference.py /tmp/official_cases \\
        tests/data/official_brats_eval.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SHAPE = (40, 36, 32)
AFFINE = np.diag([1.0, 1.25, 1.5, 1.0])


def _blob(center, radii, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _tumour(center, scale=1.0, shape=SHAPE) -> np.ndarray:
    """Edema shell (2) around a necrotic core (1) with an enhancing rim (3)."""
    label = np.zeros(shape, np.uint8)
    label[_blob(center, (7 * scale, 6 * scale, 5 * scale), shape)] = 2
    label[_blob(center, (4.5 * scale, 4 * scale, 3.5 * scale), shape)] = 3
    label[_blob(center, (2.5 * scale, 2 * scale, 2 * scale), shape)] = 1
    return label


def hand_made_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Case id → (reference, prediction) label maps ``uint8 [*SHAPE]``."""
    t = _tumour((14, 14, 12))
    shifted = np.roll(t, 2, axis=0)
    cases = {"00001-000": (t, shifted)}  # shifted tumour
    cases["00002-000"] = (t, np.roll(t, 2, axis=2))  # shift along the 1.5 mm axis
    cases["00003-000"] = (t, _tumour((30, 26, 22), 0.7))  # no overlap
    cases["00004-000"] = (t, np.zeros(SHAPE, np.uint8))  # empty prediction
    cases["00005-000"] = (np.zeros(SHAPE, np.uint8), _tumour((20, 18, 16), 0.6))  # empty truth
    cases["00006-000"] = (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8))  # both empty
    two = np.maximum(_tumour((10, 10, 10), 0.8), _tumour((30, 26, 22), 0.7))
    cases["00007-000"] = (two, _tumour((11, 10, 10), 0.8))  # two lesions, one missed
    extra = t.copy()
    extra[_blob((33, 30, 26), (2, 2, 2))] = 3
    extra[_blob((33, 6, 26), (3, 2, 2))] = 2
    cases["00008-000"] = (t, extra)  # extra false positives
    touching = np.zeros(SHAPE, np.uint8)
    touching[8:16, 8:16, 8:14] = 3
    touching[16:22, 16:22, 14:18] = 3  # touches the first at a corner (26-conn.)
    split = touching.copy()
    split[15:17, :, :] = 0
    cases["00009-000"] = (touching, split)  # touching lesions vs two pieces
    rc = t.copy()
    rc[_blob((28, 26, 20), (4, 3, 3))] = 4
    rc_pred = np.roll(t, 1, axis=1)
    rc_pred[_blob((29, 26, 20), (4, 3, 3))] = 4
    cases["00010-000"] = (rc, rc_pred)  # resection cavity
    small = np.zeros(SHAPE, np.uint8)
    for i, c in enumerate(((6, 6, 6), (6, 20, 6), (20, 6, 20), (30, 30, 10))):
        small[_blob(c, (1.5 + i * 0.5,) * 3)] = 3
    small_pred = np.roll(small, 1, axis=1)
    small_pred[_blob((20, 6, 20), (3, 3, 3))] = 0
    cases["00011-000"] = (small, small_pred)  # many small lesions, one missed
    return cases


def phantom_cases() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Case id → (reference, prediction, affine) from the phantom (needs nilearn): its tumour in
    BraTS 2023 codes with a resection cavity added, and predictions with typical errors."""
    from e2pa.data import make_phantom_case

    out = {}
    rng = np.random.default_rng(7)
    for i in range(3):
        case = make_phantom_case([11, i], 40, 3.0, label_convention="brats2023")
        ref = case.label.copy()
        pred = np.roll(ref, 1 + i, axis=i % 3)
        pred[np.roll(ref == 3, -1, axis=2) & (pred > 0)] = 3  # ET grown into the core
        noise = (rng.random(ref.shape) < 0.002) & (case.images["flair"] > 0)
        pred[noise] = 2  # scattered false-positive edema
        if i == 1:
            pred[pred == 1] = 3  # necrosis missed
        if i == 2:
            cavity = np.zeros(ref.shape, bool)
            centre = np.argwhere(case.images["flair"] > 0).mean(axis=0).astype(int)
            cavity[tuple(slice(c - 2, c + 3) for c in centre)] = True
            ref[cavity & (ref == 0)] = 4
            pred[np.roll(cavity, 1, axis=0) & (pred == 0)] = 4
        out[f"9000{i}-000"] = (ref.astype(np.uint8), pred.astype(np.uint8), case.affine)
    return out


def all_cases() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    cases = {k: (r, p, AFFINE) for k, (r, p) in hand_made_cases().items()}
    cases.update(phantom_cases())
    return cases


def write_cases(folder: Path) -> None:
    """``folder/ref/BraTS-GLI-<id>-seg.nii.gz`` and ``folder/pred/BraTS-GLI-<id>.nii.gz``, as the
    official evaluator expects them."""
    import nibabel as nib

    for sub in ("ref", "pred"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case, (ref, pred, affine) in all_cases().items():
        nib.save(nib.Nifti1Image(ref, affine), folder / "ref" / f"BraTS-GLI-{case}-seg.nii.gz")
        nib.save(nib.Nifti1Image(pred, affine), folder / "pred" / f"BraTS-GLI-{case}.nii.gz")


if __name__ == "__main__":
    write_cases(Path(sys.argv[1]))
