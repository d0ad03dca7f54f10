"""Discovery of BraTS folders, MSD and phantom dataset.json files, and the MONAI transform chains."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _data_factories import TINY_AFFINE, TINY_SHAPE, tiny_label, write_nifti
from monai.data import DataLoader, Dataset

from e2pa.data import (
    MODALITIES,
    DataError,
    LabelToRegionsd,
    discover,
    discover_brats,
    infer_transforms,
    label_to_regions,
    load_datalist,
    train_transforms,
    val_transforms,
)


# ------------------------------------------------------------------------------------ discovery
@pytest.mark.parametrize("naming, convention", [("brats2021", "brats2021"), ("brats2023", "brats2023")])
def test_brats_folders_are_found_with_their_convention(tmp_path, make_case, naming, convention):
    made = [make_case(f"BraTS_{i:03d}", naming=naming) for i in range(2)]
    (tmp_path / "notes").mkdir()  # a folder without BraTS files is not a case
    cohort = discover_brats(tmp_path)
    assert cohort.label_convention.name == convention and cohort.modalities == MODALITIES
    assert [c["case"] for c in cohort.training] == ["BraTS_000", "BraTS_001"]
    assert cohort.training == made  # image paths in flair, t1, t1ce, t2 order


def test_unlabelled_cases_go_to_test(tmp_path, make_case):
    make_case("A")
    Path(make_case("B")["label"]).unlink()
    cohort = discover(tmp_path)
    assert [c["case"] for c in cohort.training] == ["A"] and [c["case"] for c in cohort.test] == ["B"]
    assert "label" not in cohort.test[0]
    with pytest.raises(DataError, match=r"1 case\(s\) have no label file.*: B"):
        discover_brats(tmp_path, require_labels=True)


def test_discovery_names_the_case_missing_a_modality(tmp_path, make_case):
    case = make_case("BraTS_007")
    Path(case["image"][2]).unlink()
    with pytest.raises(DataError, match=r"case BraTS_007 .*missing modality files: t1ce \(\*_t1ce\.nii\.gz\)"):
        discover(tmp_path)


def test_discovery_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "absent")
    (tmp_path / "empty_case").mkdir()
    with pytest.raises(DataError, match="no BraTS case folders found"):
        discover(tmp_path)


def test_msd_task01_four_d_layout(tmp_path):
    """MSD: one 4-D image per case, modality order and label names from its dataset.json."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "imagesTr" / "BRATS_001.nii.gz", rng.uniform(1, 9, (*TINY_SHAPE, 4)).astype(np.float32))
    write_nifti(tmp_path / "labelsTr" / "BRATS_001.nii.gz", tiny_label(convention="msd"))
    spec = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
        "test": ["./imagesTr/BRATS_001.nii.gz"],
    }  # MSD lists test images as bare paths
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    cohort = discover(tmp_path)
    assert cohort.layout == "decathlon-4d" and cohort.label_convention.name == "msd"
    assert cohort.modalities == ("flair", "t1", "t1ce", "t2")
    case = cohort.training[0]
    assert case["case"] == "BRATS_001" and case["image"].endswith("imagesTr/BRATS_001.nii.gz")
    assert cohort.test == [{"image": case["image"], "case": "BRATS_001"}]

    out = val_transforms(label_convention=cohort.label_convention, modalities=cohort.modalities)(case)
    assert out["image"].shape == (4, *TINY_SHAPE) and out["label"].shape == (3, *TINY_SHAPE)
    assert torch.equal(out["label"].bool(), torch.from_numpy(label_to_regions(tiny_label(convention="msd"), "msd")))


FOUR = {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"label_convention": "msd", "modality": {"0": "FLAIR", "1": "T1w", "2": "PD", "3": "T2w"}, "training": []},
            "channel 2 is named 'PD'.*name it one of FLAIR",
        ),
        ({"labels": {"0": "background"}, "training": []}, "cannot tell the label convention"),
        (
            {"label_convention": "brats2021", "modality": FOUR, "training": [{"image": ["a", "b"], "label": "s"}]},
            "'image' must list 4 paths",
        ),
        (
            {"label_convention": "brats2021", "modality": FOUR, "training": [{"image": "x.nii.gz"}]},
            "needs a 'label' path",
        ),
        (
            {
                "label_convention": "brats2021",
                "modality": FOUR,
                "training": [{"image": "x.nii.gz", "label": "y.nii.gz"}],
            },
            r"entry 0: missing files: .*x\.nii\.gz, .*y\.nii\.gz",
        ),
        # no "modality" map: the order is never assumed; read from the listed file names, or an error says what to add
        (
            {"label_convention": "brats2021", "training": [{"image": "x.nii.gz", "label": "y.nii.gz"}]},
            r"no 'modality' map.*add e\.g\. \"modality\"",
        ),
        (
            {
                "label_convention": "brats2021",
                "training": [{"image": ["c_t2.nii", "c_t1.nii", "c_x.nii", "c_flair.nii"], "label": "s"}],
            },
            r"file name 'c_x\.nii' ends in no modality",
        ),
        (
            {
                "label_convention": "brats2021",
                "modality": {"0": "FLAIR", "1": "T1", "2": "T1", "3": "T2"},
                "training": [],
            },
            "several channels map to t1",
        ),
        ({"label_convention": "brats2021", "training": {}}, "'training' must be a list"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_dataset_json(tmp_path, spec, message):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        load_datalist(path)


def test_unparsable_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not a readable JSON file"):
        discover(tmp_path)


def test_split_is_deterministic_and_disjoint(tmp_path, make_case):
    for i in range(5):
        make_case(f"C{i}")
    cohort = discover(tmp_path)
    first, again = cohort.split(0.4, seed=3), cohort.split(0.4, seed=3)
    assert first.validation == again.validation and len(first.validation) == 2
    names = [c["case"] for c in first.training + first.validation]
    assert sorted(names) == [f"C{i}" for i in range(5)]


# ------------------------------------------------------------------------------------ transforms
def test_phantom_round_trip_through_the_validation_chain(phantom_cohort):
    """write → discover → load: [4, ...] image and [3, ...] TC/WT/ET label on the file's grid."""
    cohort = discover(phantom_cohort.parent)
    assert cohort.layout == "decathlon" and cohort.label_convention.name == "brats2021"
    assert (len(cohort.training), len(cohort.validation)) == (2, 1)
    case = cohort.validation[0]
    out = val_transforms(label_convention=cohort.label_convention)(case)
    image, label = out["image"], out["label"]
    assert image.shape == (4, 32, 32, 32) and image.dtype == torch.float32
    assert label.shape == (3, 32, 32, 32) and label.dtype == torch.float32
    reference = nib.load(case["label"])
    assert np.allclose(image.affine.numpy(), reference.affine) and np.allclose(label.affine.numpy(), reference.affine)
    expected = label_to_regions(np.asanyarray(reference.dataobj), "brats2021")
    assert torch.equal(label.bool(), torch.from_numpy(expected))
    tc, wt, et = (label[i].bool() for i in range(3))
    assert bool((et <= tc).all() and (tc <= wt).all()) and int(et.sum()) > 0, "regions must nest ET ⊆ TC ⊆ WT"
    brain = image[1] != 0
    assert abs(float(image[1][brain].mean())) < 1e-3 and abs(float(image[1][brain].std()) - 1) < 1e-2


def test_train_chain_gives_roi_batches_through_a_dataloader(phantom_cohort):
    cohort = discover(phantom_cohort.parent)
    chain = train_transforms(24, label_convention=cohort.label_convention, num_samples=2)
    chain.set_random_state(0)
    batch = next(iter(DataLoader(Dataset(cohort.training, chain), batch_size=2)))
    assert batch["image"].shape == (4, 4, 24, 24, 24) and batch["label"].shape == (4, 3, 24, 24, 24)
    assert batch["label"].sum() > 0, "positive crops are centred on tumour"


def test_train_chain_pads_volumes_smaller_than_the_roi(make_case):
    case = make_case()
    for crop in ("pos_neg", "random"):
        out = train_transforms((16, 16, 16), crop=crop)(case)
        sample = out[0] if isinstance(out, list) else out
        assert sample["image"].shape == (4, 16, 16, 16) and sample["label"].shape == (3, 16, 16, 16)


def test_orientation_and_spacing_are_applied(tmp_path):
    """A LAS file comes out RAS (x flipped, label flipped with it), and resampled on request."""
    las = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -12], [0, 0, 2.5, -8], [0, 0, 0, 1]])
    paths = [str(write_nifti(tmp_path / f"c_{m}.nii.gz", np.ones(TINY_SHAPE, np.float32), las)) for m in MODALITIES]
    case = {"image": paths, "label": str(write_nifti(tmp_path / "c_seg.nii.gz", tiny_label(), las))}
    out = val_transforms()(case)
    assert out["image"].affine[0, 0] == 2.0
    assert torch.equal(out["label"].bool(), torch.from_numpy(label_to_regions(tiny_label())[:, ::-1].copy()))
    resampled = val_transforms(pixdim=(4.0, 4.0, 4.0))(case)
    assert np.allclose(np.diag(resampled["image"].affine.numpy())[:3], (4.0, 4.0, 4.0))
    assert resampled["image"].shape[1:] == resampled["label"].shape[1:]
    assert resampled["image"].shape[1] < TINY_SHAPE[0]


def test_infer_chain_needs_no_label(make_case):
    case = make_case()
    out = infer_transforms()({"image": case["image"], "case": "x"})
    assert out["image"].shape == (4, *TINY_SHAPE) and "label" not in out


def test_bad_files_raise_data_error_not_monai_runtime_error(make_case):
    case = make_case()
    Path(case["image"][3]).write_bytes(Path(case["image"][3]).read_bytes()[:40])
    with pytest.raises(DataError, match=r"case Case_000: t2: .*_t2\.nii\.gz: unreadable or truncated"):
        val_transforms()(case)
    with pytest.raises(DataError, match="t2"):
        next(iter(DataLoader(Dataset([case], val_transforms()), batch_size=1)))


def test_labels_outside_the_convention_are_refused_by_the_chain(make_case):
    case = make_case(convention="brats2021")
    with pytest.raises(DataError, match=r"_seg\.nii\.gz: label values \[4\] are not in the brats2023"):
        val_transforms(label_convention="brats2023")(case)


def test_label_to_regions_transform_keeps_metadata():
    from monai.data import MetaTensor

    label = MetaTensor(
        torch.from_numpy(tiny_label())[None],
        affine=torch.from_numpy(TINY_AFFINE),
        meta={"filename_or_obj": "case_seg.nii.gz"},
    )
    out = LabelToRegionsd(keys="label")({"label": label})["label"]
    assert isinstance(out, MetaTensor) and out.shape == (3, *TINY_SHAPE) and out.dtype == torch.float32
    assert np.allclose(out.affine.numpy(), TINY_AFFINE)
    bad = MetaTensor(torch.full((1, 2, 2, 2), 7), meta={"filename_or_obj": "bad_seg.nii.gz"})
    with pytest.raises(DataError, match=r"bad_seg\.nii\.gz: label values \[7\]"):
        LabelToRegionsd(keys="label")({"label": bad})
    assert LabelToRegionsd(keys="label")({"label": tiny_label()})["label"].dtype == np.float32


def test_predictions_invert_back_to_the_file_grid(tmp_path):
    """Invertd undoes the chain's reorientation and resampling: a prediction lands on the input grid."""
    from monai.transforms import Invertd

    las = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -12], [0, 0, 2.5, -8], [0, 0, 0, 1]])
    paths = [str(write_nifti(tmp_path / f"c_{m}.nii.gz", np.ones(TINY_SHAPE, np.float32), las)) for m in MODALITIES]
    chain = infer_transforms(pixdim=(3.0, 3.0, 3.0))
    out = chain({"image": paths})
    out["pred"] = out["image"][:1].clone()
    restored = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert restored.shape == (1, *TINY_SHAPE) and np.allclose(restored.affine.numpy(), las)
