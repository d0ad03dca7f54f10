"""The phantom: determinism, geometry, tumour labels, tissue contrasts, and the cohort writer."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from e2pa.data import MODALITIES, DataError, discover, get_convention, make_phantom_case, write_phantom_cohort
from e2pa.data.phantom import COMPARTMENTS, SEQUENCES, check_phantom_geometry


def test_same_seed_same_case_and_different_seed_different_case():
    first, again, other = make_phantom_case(3, 32), make_phantom_case(3, 32), make_phantom_case(4, 32)
    for modality in MODALITIES:
        assert np.array_equal(first.images[modality], again.images[modality])
        assert not np.array_equal(first.images[modality], other.images[modality])
    assert np.array_equal(first.label, again.label)
    assert not np.array_equal(first.label, other.label)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("convention", ["brats2021", "brats2023"])
def test_every_tumour_label_present_and_inside_the_brain(seed, convention):
    case = make_phantom_case(seed, 24, label_convention=convention)
    expected = get_convention(convention)
    assert set(np.unique(case.label).tolist()) == set(expected.values)
    assert case.brain_mask[case.label > 0].all(), "tumour voxels outside the brain"
    for modality, image in case.images.items():
        assert image.dtype == np.float32 and image.shape == case.shape
        assert np.all(image[~case.brain_mask] == 0), f"{modality}: background must stay 0 (skull-stripped)"
        assert np.isfinite(image).all()


def test_tumour_centre_is_supratentorial_and_the_tumour_is_one_lesion():
    from scipy import ndimage

    for seed in range(5):
        case = make_phantom_case(seed, 32)
        core = np.argwhere(case.label == case.label_convention.necrotic).mean(axis=0)
        world_z = (case.affine @ np.append(core, 1.0))[2]
        assert world_z > -5, f"seed {seed}: necrotic core at MNI z = {world_z:.1f} mm (cerebellum level)"
        assert ndimage.label(case.label > 0)[1] == 1


def test_tissue_contrasts_are_qualitatively_right():
    """Mean intensity per tissue, each contrast relative to its own white matter."""
    case = make_phantom_case(11, 48, noise="rician")
    convention = case.label_convention
    regions = {
        "wm": case.fractions["wm"] > 0.9,
        "gm": case.fractions["gm"] > 0.7,
        "csf": case.fractions["csf"] > 0.8,
        "ed": case.label == convention.edema,
        "ncr": case.label == convention.necrotic,
        "et": case.label == convention.enhancing,
    }
    assert all(mask.sum() >= 10 for mask in regions.values()), {k: int(m.sum()) for k, m in regions.items()}
    mean = {m: {k: float(case.images[m][mask].mean()) for k, mask in regions.items()} for m in MODALITIES}

    flair, t1, t1ce, t2 = (mean[m] for m in MODALITIES)
    assert flair["csf"] < 0.3 * min(flair["wm"], flair["gm"]), "FLAIR must null CSF"
    assert flair["ed"] > 1.3 * max(flair["wm"], flair["gm"]), "edema is hyperintense on FLAIR"
    assert t2["ed"] > 1.3 * max(t2["wm"], t2["gm"]), "edema is hyperintense on T2"
    assert t2["csf"] > t2["gm"] > t2["wm"], "T2: CSF > GM > WM"
    assert t1["wm"] > t1["gm"] > t1["csf"], "T1: WM > GM > CSF"
    assert t1ce["et"] > 1.4 * t1ce["wm"], "the enhancing rim is bright on T1ce"
    assert t1ce["et"] / t1ce["wm"] > 1.4 * t1["et"] / t1["wm"], "enhancement comes from gadolinium (T1ce vs T1)"
    assert t1ce["ncr"] < t1ce["et"], "the necrotic core does not enhance"


def test_flair_inversion_time_nulls_csf():
    flair = SEQUENCES["flair"]
    assert flair.signal(COMPARTMENTS["csf"]) < 1e-9
    assert flair.ti_ms == pytest.approx(math.log(2) * COMPARTMENTS["csf"].t1_ms, rel=0.05)


def test_grid_covers_the_template_at_the_requested_spacing():
    case = make_phantom_case(0, None, spacing_mm=4.0)
    assert case.shape == tuple(math.ceil(n / 4.0) for n in (197, 233, 189))
    assert case.spacing_mm == pytest.approx((4.0, 4.0, 4.0))
    # Voxel 0 stays the template's voxel 0 (MNI -98, -134, -72): the grid is only coarser.
    assert case.affine[:3, 3] == pytest.approx((-98.0, -134.0, -72.0))


def test_fitted_grid_keeps_the_brain_inside_with_a_margin():
    case = make_phantom_case(0, (40, 48, 36), spacing_mm=2.0)
    assert case.shape == (40, 48, 36)
    inside = np.argwhere(case.brain_mask)
    assert inside.min() >= 1 and np.all(inside.max(axis=0) <= np.array(case.shape) - 2)
    assert case.spacing_mm[0] > 2.0, "the voxel grows when the brain does not fit at 2 mm"
    assert np.allclose(case.affine[:3, :3], np.diag(case.spacing_mm)), "RAS, isotropic"


@pytest.mark.parametrize(
    "shape, spacing", [(16, 2.0), ((32, 32), 2.0), (32, 0.5), (32, float("nan")), (1000, 2.0), (32.5, 2.0)]
)
def test_bad_geometry_is_refused(shape, spacing):
    with pytest.raises(ValueError, match="shape|spacing"):
        check_phantom_geometry(shape, spacing)


def test_cohort_json_is_a_valid_decathlon_datalist(phantom_cohort):
    spec = json.loads(phantom_cohort.read_text())
    assert spec["modality"] == {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}
    assert spec["labels"] == {
        "0": "background",
        "1": "necrotic tumour core (NCR)",
        "2": "peritumoral edema (ED)",
        "4": "enhancing tumour (ET)",
    }
    assert (spec["numTraining"], spec["numValidation"]) == (2, 1)
    for split, count in (("training", 2), ("validation", 1)):
        items = load_decathlon_datalist(phantom_cohort, data_list_key=split)
        assert len(items) == count
        for item in items:
            assert [p.rsplit("_", 1)[1] for p in item["image"]] == [f"{m}.nii.gz" for m in MODALITIES]
            assert item["label"].endswith("_seg.nii.gz")


def test_cohort_files_have_the_phantom_geometry_and_dtypes(phantom_cohort):
    case = json.loads(phantom_cohort.read_text())["training"][0]
    label = nib.load(phantom_cohort.parent / case["label"])
    assert label.get_data_dtype() == np.uint8 and label.shape == (32, 32, 32)
    expected = make_phantom_case([7, 0], 32)
    assert np.allclose(label.affine, expected.affine)
    assert np.array_equal(np.asanyarray(label.dataobj), expected.label)
    flair = nib.load(phantom_cohort.parent / case["image"][0])
    assert flair.get_data_dtype() == np.float32
    assert np.array_equal(flair.get_fdata(dtype=np.float32), expected.images["flair"])
    assert not list(phantom_cohort.parent.glob(".*")), "temporary files left behind"


def test_cohort_refuses_to_overwrite_unless_asked(tmp_path):
    write_phantom_cohort(tmp_path, cases=1, seed=0, shape=24)
    with pytest.raises(DataError, match="Phantom_000.*overwrite"):
        write_phantom_cohort(tmp_path, cases=1, seed=1, shape=24)
    t1 = tmp_path / "Phantom_000" / "Phantom_000_t1.nii.gz"
    before = nib.load(t1).get_fdata()
    write_phantom_cohort(tmp_path, cases=1, seed=1, shape=24, overwrite=True)
    assert not np.array_equal(nib.load(t1).get_fdata(), before)


def test_brats2023_cohort_uses_2023_names_and_is_discovered_as_such(tmp_path):
    json_path = write_phantom_cohort(
        tmp_path, cases=2, seed=0, shape=24, label_convention="brats2023", validation_fraction=0
    )
    assert (tmp_path / "Phantom-000" / "Phantom-000-t1c.nii.gz").is_file()
    assert json.loads(json_path.read_text())["labels"]["3"] == "enhancing tumour (ET)"
    json_path.unlink()  # folder discovery must infer the convention from the file names alone
    cohort = discover(tmp_path)
    assert cohort.label_convention.name == "brats2023" and len(cohort.training) == 2


def test_a_case_does_not_depend_on_the_cohort_size(tmp_path):
    write_phantom_cohort(tmp_path / "one", cases=1, seed=5, shape=24)
    write_phantom_cohort(tmp_path / "two", cases=2, seed=5, shape=24)
    for name in ("Phantom_000/Phantom_000_seg.nii.gz", "Phantom_000/Phantom_000_t2.nii.gz"):
        one, two = (np.asanyarray(nib.load(tmp_path / cohort / name).dataobj) for cohort in ("one", "two"))
        assert np.array_equal(one, two)
