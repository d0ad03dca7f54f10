"""Smoke run of a core install (``pip install e2pa``, no extras): train a few steps, infer, score.

Run by ``make smoke-core`` with the core venv's Python, from outside the source tree so that the
installed package is what runs. The tiny cohort is written with numpy + nibabel (the phantom needs
nilearn, an extra), so nothing beyond the core dependencies is imported. Exits non-zero on failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def write_cohort(root: Path, cases: int = 3, shape: tuple[int, int, int] = (24, 24, 20)) -> Path:
    """BraTS 2021-style case folders: four modalities and a 1/2/4 label map with a tumour blob."""
    rng = np.random.default_rng(0)
    grid = np.indices(shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(cases):
        centre = np.array(shape) // 2 + rng.integers(-3, 4, 3)
        radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        label = np.zeros(shape, np.uint8)
        label[radius < 6] = 2
        label[radius < 4] = 4
        label[radius < 2] = 1
        brain = np.sqrt(sum((g - s / 2) ** 2 for g, s in zip(grid, shape))) < min(shape) / 2
        folder = root / f"Case_{i:03d}"
        folder.mkdir(parents=True)
        for j, modality in enumerate(("flair", "t1", "t1ce", "t2")):
            image = (
                100 + 50 * j + 80 * (label == 2) + 120 * (label == 4) * (modality == "t1ce") + rng.normal(0, 5, shape)
            ) * brain
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"Case_{i:03d}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"Case_{i:03d}_seg.nii.gz")
    return root


def e2pa(*args: str) -> None:
    command = [sys.executable, "-m", "e2pa", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    import e2pa as package

    for extra in ("nilearn",):
        if importlib.util.find_spec(extra) is not None:
            sys.exit(f"smoke-core: {extra} is installed; this venv must hold the core dependencies only")
    print(f"e2pa from {package.__file__}", flush=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_cohort(tmp / "data")
        e2pa(
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp / "run"),
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--batch-size",
            "1",
            "--roi",
            "16",
            "--features",
            "4",
            "8",
            "--no-progress",
        )
        e2pa(
            "infer",
            "--checkpoint",
            str(tmp / "run" / "checkpoints" / "last.pt"),
            "--input",
            str(data / "Case_002"),
            "--out",
            str(tmp / "pred"),
        )
        written = sorted(p.name for p in (tmp / "pred" / "Case_002").iterdir())
        assert "Case_002_pred.nii.gz" in written and "Case_002_overview.png" in written, written
        assert (tmp / "run" / "training_curve.png").is_file()
        e2pa(
            "score", "--pred", str(tmp / "pred"), "--data", str(data), "--missing", "skip", "--out", str(tmp / "scores")
        )
        assert (tmp / "scores" / "scores.json").is_file()
    print("smoke-core: train, infer and score ran with the core dependencies only")


if __name__ == "__main__":
    main()
