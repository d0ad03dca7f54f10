"""Fixtures of the data-layer tests: tiny hand-made BraTS cases and one small phantom cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _data_factories import TINY_SHAPE, tiny_label, write_nifti

from e2pa.data import MODALITIES, brats_file_name


@pytest.fixture
def make_case(tmp_path):
    """``make_case(name="Case_000", naming="brats2021", convention=None, root=tmp_path)`` writes a
    complete tiny BraTS case folder (float32 images, uint8 label) and returns ``{"image": [4 paths],
    "label": path, "case": name}`` as strings."""

    def make(
        name: str = "Case_000",
        naming: str = "brats2021",
        convention: str | None = None,
        root: Path | None = None,
        seed: int = 0,
    ) -> dict:
        folder = (root or tmp_path) / name
        folder.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        images = []
        for modality in MODALITIES:
            volume = rng.uniform(100, 1000, TINY_SHAPE).astype(np.float32)
            volume[0] = 0  # background, as in skull-stripped BraTS
            images.append(str(write_nifti(folder / brats_file_name(name, modality, naming), volume)))
        label = tiny_label(convention=convention or naming)
        label_path = write_nifti(folder / brats_file_name(name, "label", naming), label)
        return {"image": images, "label": str(label_path), "case": name}

    return make


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """dataset.json of a 3-case 32³ phantom cohort (2 training, 1 validation), written once."""
    from e2pa.data import write_phantom_cohort

    return write_phantom_cohort(tmp_path_factory.mktemp("phantom"), cases=3, seed=7, shape=32, validation_fraction=0.34)
