"""Inference keeps each input's geometry: non-RAS files come back on their own grid and affine,
with the label values of the checkpoint's convention; energy maps exist for available modalities."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from e2pa.data import find_cases
from e2pa.engine.inference import load_model, predict_case, save_prediction


@pytest.fixture(scope="module")
def checkpoint(phantom_json, tmp_path_factory):
    from e2pa.engine.training import TrainConfig, train

    cfg = TrainConfig(
        data=str(phantom_json),
        out=str(tmp_path_factory.mktemp("infer") / "run"),
        epochs=1,
        batch_size=1,
        roi_size=(16, 16, 16),
        max_steps_per_epoch=1,
        progress=False,
        model=dict(features=(4, 8), esa_rank=2),
    )
    train(cfg)
    return Path(cfg.out) / "checkpoints" / "last.pt"


def _reoriented_case(source: Path, target: Path) -> Path:
    """Copy a RAS case with its voxel axes permuted and flipped (an LPI-like layout) and the affine
    changed to match, so world coordinates are unchanged but the array order is not RAS."""
    target.mkdir()
    for path in sorted(source.glob("*.nii.gz")):
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        data = np.flip(np.transpose(data, (1, 0, 2)), axis=(0, 2)).copy()
        swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[0, 3], flip[2, 3] = data.shape[0] - 1, data.shape[2] - 1
        affine = image.affine @ swap @ flip
        name = path.name.replace(source.name, target.name)
        out = nib.Nifti1Image(data, affine)
        out.set_data_dtype(image.get_data_dtype())
        nib.save(out, target / name)
    return target


def test_predictions_keep_the_input_geometry(checkpoint, phantom_json, tmp_path):
    case_dir = _reoriented_case(Path(phantom_json).parent / "Phantom_003", tmp_path / "Oblique_003")
    reference = nib.load(next(case_dir.glob("*_flair.nii.gz")))
    assert nib.aff2axcodes(reference.affine) != ("R", "A", "S")
    loaded = load_model(checkpoint)
    prediction = predict_case(loaded, find_cases([case_dir])[0], modalities=["flair", "t1ce", "t2"])
    assert prediction.available == ("flair", "t1ce", "t2")
    assert set(prediction.maps) == {
        "energy_flair",
        "energy_t1ce",
        "energy_t2",
        "weight_flair",
        "weight_t1ce",
        "weight_t2",
        "fused_energy",
    }
    # the network's view of the intensities, brought back to the file's grid, lines up with the file
    original = np.asanyarray(reference.dataobj).astype(float)
    brain = original > 0
    assert prediction.intensities["flair"].shape == original.shape
    assert np.corrcoef(prediction.intensities["flair"][brain], original[brain])[0, 1] > 0.999
    written = save_prediction(prediction, tmp_path / "out")
    pred = nib.load(written[0])
    np.testing.assert_allclose(pred.affine, reference.affine)
    assert pred.shape == reference.shape and pred.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 4}
    for path in written[1:-1]:
        assert nib.load(path).shape == reference.shape


def test_sliding_window_checks_the_mask_once_not_per_window_batch(checkpoint):
    """The mask's values are read once (on the host copy) whatever the number of window batches; the
    predictor runs each window batch with validate=False. A mask without any modality is refused by
    name before any window runs."""
    import torch

    from e2pa.engine.inference import sliding_window_outputs
    from e2pa_kernels.testing import HostSyncCounter

    loaded = load_model(checkpoint)
    mask = torch.tensor([True, False, True, True])
    counts = {}
    for size in (16, 40):  # one window vs 27 windows (roi 16, overlap 0.5) in 14 window batches
        image = torch.randn(4, size, size, size)
        with HostSyncCounter() as syncs:
            sliding_window_outputs(loaded, image, mask, sw_batch_size=2)
        counts[size] = syncs.count
    assert counts[40] == counts[16], counts
    with pytest.raises(ValueError, match=r"modality_mask: sample\(s\) \[0\] have no available modality"):
        sliding_window_outputs(loaded, torch.randn(4, 16, 16, 16), torch.zeros(4, dtype=torch.bool))
