"""Small factories shared by the data-layer tests (imported by name; pytest puts this folder on
sys.path)."""
from __future__ import annotations

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
