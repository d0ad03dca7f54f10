"""NIfTI reading and validation: every kind of bad file gives a DataError naming it; writers keep
the reference geometry and write atomically."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _data_factories import TINY_AFFINE, TINY_SHAPE, tiny_label, write_nifti

from e2pa.data import DataError, check_case, load_image, read_label_map, read_volume, save_label_map, save_volume


def test_a_good_case_passes_and_reports_its_grid(make_case):
    case = make_case()
    geometry = check_case(case["image"], case["label"], case="Case_000")
    assert geometry.shape == TINY_SHAPE
    assert np.allclose(geometry.affine, TINY_AFFINE)


def test_missing_modality_files_are_listed(make_case):
    case = make_case()
    for gone in (1, 3):
        Path(case["image"][gone]).unlink()
    with pytest.raises(DataError, match=r"case Case_000: missing files: t1 \(.*_t1\.nii\.gz\), t2 \(.*_t2\.nii\.gz\)"):
        check_case(case["image"], case["label"], case="Case_000")


def test_shape_mismatch_names_both_files_and_shapes(make_case):
    case = make_case()
    write_nifti(Path(case["image"][2]), np.ones((10, 12, 7), np.float32))
    with pytest.raises(
        DataError,
        match=r"t1ce \(.*_t1ce\.nii\.gz\) has shape 10×12×7 "
        r"but flair \(.*_flair\.nii\.gz\) has 10×12×8",
    ):
        check_case(case["image"], case["label"])


def test_affine_mismatch_says_by_how_much(make_case):
    case = make_case()
    shifted = TINY_AFFINE.copy()
    shifted[0, 3] += 1.5
    write_nifti(Path(case["image"][3]), np.ones(TINY_SHAPE, np.float32), shifted)
    with pytest.raises(
        DataError,
        match=r"t2 \(.*_t2\.nii\.gz\) has a different affine from flair "
        r".* differ by up to 1\.5",
    ):
        check_case(case["image"], case["label"])


def test_label_on_another_grid_is_caught(make_case):
    case = make_case()
    write_nifti(Path(case["label"]), tiny_label(), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match=r"label \(.*_seg\.nii\.gz\) has a different affine"):
        check_case(case["image"], case["label"])


@pytest.mark.parametrize("bad, count", [(np.nan, "3 NaN"), (np.inf, "0 NaN, 3 ±inf")])
def test_non_finite_intensities_are_counted(make_case, bad, count):
    case = make_case()
    volume = np.ones(TINY_SHAPE, np.float32)
    volume[1, 1, :3] = bad
    write_nifti(Path(case["image"][0]), volume)
    with pytest.raises(DataError, match=rf"flair: .*_flair\.nii\.gz: 3 of 960 voxels are not finite \({count}"):
        check_case(case["image"], case["label"])


def test_values_beyond_float32_are_not_finite(tmp_path):
    path = write_nifti(tmp_path / "huge.nii.gz", np.full((4, 4, 4), 1e300))
    with pytest.raises(DataError, match="huge.nii.gz: 64 of 64 voxels are not finite"):
        read_volume(path)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gzip_is_an_unreadable_file(make_case, keep):
    case = make_case()
    path = Path(case["image"][1])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=r"t1: .*_t1\.nii\.gz: unreadable or truncated NIfTI file"):
        check_case(case["image"], case["label"])


def test_truncated_uncompressed_file_says_how_short(tmp_path):
    path = write_nifti(tmp_path / "short.nii", np.ones((8, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        DataError,
        match=r"short\.nii: truncated file: "
        r"the header declares 2400 bytes, the file holds 2300",
    ):
        read_volume(path)


def test_not_a_nifti_file(tmp_path):
    path = tmp_path / "notes_flair.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image"))
    with pytest.raises(DataError, match="notes_flair.nii.gz: unreadable or truncated"):
        read_volume(path)


def test_four_d_where_three_d_expected(make_case):
    case = make_case()
    write_nifti(Path(case["image"][0]), np.ones((*TINY_SHAPE, 2), np.float32))
    with pytest.raises(DataError, match=r"_flair\.nii\.gz: expected a 3-D volume, got a 4-D one of shape 10×12×8×2"):
        check_case(case["image"], case["label"])


def test_four_d_image_needs_one_channel_per_modality(tmp_path):
    path = write_nifti(tmp_path / "BRATS_001.nii.gz", np.ones((*TINY_SHAPE, 3), np.float32))
    with pytest.raises(
        DataError, match="expected a 4-D volume with 4 modalities on the last axis, got shape 10×12×8×3"
    ):
        check_case(str(path))


def test_labels_outside_the_convention_name_the_file(make_case):
    case = make_case(convention="brats2021")
    with pytest.raises(DataError, match=r"_seg\.nii\.gz: label values \[4\] are not in the brats2023"):
        check_case(case["image"], case["label"], label_convention="brats2023")
    assert check_case(case["image"], case["label"], label_convention="brats2021").shape == TINY_SHAPE


def test_labels_are_read_without_a_float_round_trip(tmp_path):
    path = write_nifti(tmp_path / "seg.nii.gz", tiny_label().astype(np.int16))
    label, _ = read_label_map(path)
    assert label.dtype == np.uint8 and np.array_equal(label, tiny_label())
    image = nib.Nifti1Image(tiny_label().astype(np.int16), TINY_AFFINE)
    image.header.set_slope_inter(0.5, 0)  # a scaled header turns codes 1, 2, 4 into 0.5, 1, 2
    nib.save(image, tmp_path / "scaled.nii.gz")
    with pytest.raises(DataError, match="non-integer"):
        read_label_map(tmp_path / "scaled.nii.gz")


def test_degenerate_affine(tmp_path):
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    image.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code="scanner")  # nibabel cannot store it as a qform
    path = tmp_path / "flat.nii.gz"
    nib.save(image, path)
    with pytest.raises(DataError, match="flat.nii.gz: degenerate voxel-to-world affine"):
        load_image(path)


def test_missing_single_file(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.nii\.gz: file not found"):
        read_volume(tmp_path / "nowhere.nii.gz")


# ------------------------------------------------------------------------------------ writing
def _reference(tmp_path: Path) -> nib.Nifti1Image:
    """An int16 reference with scaling, an oblique-free LAS affine and distinct qform/sform codes."""
    affine = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -120], [0, 0, 3.0, -60], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.arange(np.prod(TINY_SHAPE), dtype=np.int16).reshape(TINY_SHAPE), affine)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="aligned")
    image.header.set_slope_inter(2.0, 10.0)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, tmp_path / "reference.nii.gz")
    return nib.load(tmp_path / "reference.nii.gz")


def test_save_label_map_keeps_geometry_and_resets_scaling(tmp_path):
    reference = _reference(tmp_path)
    path = save_label_map(
        tiny_label(), tmp_path / "reference.nii.gz", tmp_path / "pred_seg.nii.gz", label_convention="brats2021"
    )
    saved = nib.load(path)
    assert saved.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(saved.dataobj), tiny_label())
    assert np.allclose(saved.affine, reference.affine)
    assert int(saved.header["qform_code"]) == 1 and int(saved.header["sform_code"]) == 2
    assert saved.header.get_xyzt_units() == ("mm", "sec")
    assert not list(tmp_path.glob(".*")), "temporary file left behind"


def test_save_volume_with_a_bare_affine_and_refusing_to_overwrite(tmp_path):
    path = save_volume(np.full(TINY_SHAPE, 3.5), TINY_AFFINE, tmp_path / "energy.nii.gz")
    volume, image = read_volume(path)
    assert volume.dtype == np.float32 and np.all(volume == 3.5) and np.allclose(image.affine, TINY_AFFINE)
    with pytest.raises(DataError, match=r"energy\.nii\.gz already exists; pass overwrite=True"):
        save_volume(np.zeros(TINY_SHAPE), TINY_AFFINE, path)
    save_volume(np.zeros(TINY_SHAPE), TINY_AFFINE, path, overwrite=True)
    assert np.all(read_volume(path)[0] == 0)


def test_save_refuses_an_array_off_the_reference_grid(tmp_path):
    _reference(tmp_path)
    with pytest.raises(DataError, match=r"array of shape 10×12×9 does not fit the reference grid 10×12×8"):
        save_label_map(np.zeros((10, 12, 9), np.uint8), tmp_path / "reference.nii.gz", tmp_path / "x.nii.gz")
    with pytest.raises(DataError, match="integers in 0..255"):
        save_label_map(np.full(TINY_SHAPE, 300), TINY_AFFINE, tmp_path / "y.nii.gz")
