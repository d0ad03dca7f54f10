"""Data where users keep it: nnU-Net v2 raw datasets, MSD Task01 4-D images and BraTS 2024
post-treatment labels, each built from phantom volumes, trained a few steps, inferred and scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _data_factories import (
    NNUNET_BRATS_CHANNELS,
    write_brats2024,
    write_msd_task01,
    write_nnunet_dataset,
)

from e2pa.cli import main
from e2pa.data import DataError, discover


def _train(data: Path, out: Path) -> Path:
    from e2pa.engine.training import TrainConfig, train

    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        epochs=1,
        batch_size=1,
        roi_size=(16, 16, 16),
        max_steps_per_epoch=1,
        progress=False,
        validation_fraction=0.0,
        model=dict(features=(4, 8), esa_rank=2),
    )
    train(cfg)
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def nnunet(phantom_cohort, tmp_path_factory) -> Path:
    return write_nnunet_dataset(phantom_cohort, tmp_path_factory.mktemp("nnunet") / "Dataset137_BraTS2021")


def test_nnunet_raw_dataset_is_read_by_channel_names(nnunet):
    cohort = discover(nnunet)
    assert cohort.layout == "nnunet" and cohort.label_convention.name == "msd"  # region labels → 1 ED, 2 NCR, 3 ET
    assert cohort.modalities == ("flair", "t1", "t1ce", "t2")
    case = cohort.training[0]
    # channel files reordered by name: FLAIR is channel 3 in nnU-Net's BraTS order
    assert [Path(p).name for p in case["image"]] == [f"{case['case']}_{i:04d}.nii.gz" for i in (3, 0, 1, 2)]
    assert len(cohort.training) == 2 and len(cohort.test) == 1 and "label" in cohort.test[0]
    for entry in (nnunet.parent, nnunet.parent / "imagesTr", nnunet.parent / "labelsTr"):
        assert discover(entry).training == cohort.training


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["channel_names"].update({"2": "ADC"}), r"channel 2 is named 'ADC'.*T1ce \(T1Gd"),
        (lambda s: s.update(numTraining=5), "numTraining is 5 but imagesTr/labelsTr hold 2"),
        (lambda s: s.update(file_ending=".mha"), "file_ending '.mha' is not supported"),
        (lambda s: s.update(labels={"background": 0, "tumour": 1}), "no label recognised as"),
    ],
)
def test_nnunet_dataset_errors_say_what_to_fix(nnunet, tmp_path, change, message):
    copy = tmp_path / nnunet.parent.name
    shutil.copytree(nnunet.parent, copy)
    spec = json.loads((copy / "dataset.json").read_text())
    change(spec)
    (copy / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message):
        discover(copy)


def test_nnunet_missing_channel_file_is_named(nnunet, tmp_path):
    copy = tmp_path / nnunet.parent.name
    shutil.copytree(nnunet.parent, copy)
    victim = sorted((copy / "imagesTr").glob("*_0002.nii.gz"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=rf"missing channel file\(s\) {victim.name}"):
        discover(copy)


def test_nnunet_train_infer_score(nnunet, tmp_path, capsys):
    root = nnunet.parent
    checkpoint = _train(root / "imagesTr", tmp_path / "run")  # --data imagesTr works like the json
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(root / "imagesTs"),
                "--out",
                str(tmp_path / "pred"),
                "--layout",
                "flat",
            ]
        )
        == 0
    )
    written = sorted(p.name for p in (tmp_path / "pred").glob("*.nii*"))
    test_case = discover(nnunet).test[0]["case"]
    assert written == [f"{test_case}.nii.gz"]  # nnU-Net's predictions layout
    prediction = nib.load(tmp_path / "pred" / written[0])
    reference = nib.load(root / "imagesTs" / f"{test_case}_0000.nii.gz")
    np.testing.assert_allclose(prediction.affine, reference.affine)
    assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1, 2, 3}  # the dataset.json's label values
    assert (
        main(
            [
                "score",
                "--pred",
                str(tmp_path / "pred"),
                "--data",
                str(nnunet),
                "--split",
                "test",
                "--out",
                str(tmp_path / "scores"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert list(scores["per_case"]) == [test_case] and scores["label_convention"] == "msd"
    capsys.readouterr()


def test_msd_four_d_train_and_infer(phantom_cohort, tmp_path):
    json_path = write_msd_task01(phantom_cohort, tmp_path / "Task01_BrainTumour")
    cohort = discover(json_path)
    assert cohort.layout == "decathlon-4d" and cohort.modalities == ("flair", "t1", "t1ce", "t2")
    checkpoint = _train(json_path, tmp_path / "run")
    test_image = json_path.parent / "imagesTs"
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(test_image),
                "--out",
                str(tmp_path / "pred"),
                "--no-energy-maps",
            ]
        )
        == 0
    )
    case = cohort.test[0]["case"]
    assert (tmp_path / "pred" / case / f"{case}_pred.nii.gz").is_file()
    # a 4-D training image too (one modality left out by name), scored against its label
    train_case = cohort.training[0]
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(checkpoint),
                "--input",
                train_case["image"],
                "--layout",
                "flat",
                "--modalities",
                "flair,t1ce,t2",
                "--out",
                str(tmp_path / "pred_tr"),
            ]
        )
        == 0
    )
    report = tmp_path / "scores"
    assert (
        main(
            [
                "score",
                "--pred",
                str(tmp_path / "pred_tr"),
                "--data",
                str(json_path),
                "--missing",
                "skip",
                "--convention",
                "official",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    assert list(json.loads((report / "scores.json").read_text())["per_case"]) == [train_case["case"]]


def test_msd_without_modality_map_is_refused(phantom_cohort, tmp_path):
    json_path = write_msd_task01(phantom_cohort, tmp_path / "Task01", modality=None)
    with pytest.raises(DataError, match=r"no 'modality' map.*add e\.g\."):
        discover(json_path)
    assert main(["train", "--data", str(json_path), "--out", str(tmp_path / "run")]) == 2
    # inference on a 4-D image needs the channel names too
    with pytest.raises(DataError, match="no 'channel_names' or 'modality' map"):
        from e2pa.data import find_cases

        find_cases([json_path.parent / "imagesTs"])


def test_brats2024_post_treatment_labels(phantom_cohort, tmp_path):
    json_path = write_brats2024(phantom_cohort, tmp_path / "gli2024")
    cohort = discover(json_path)
    assert cohort.label_convention.name == "brats2024"
    checkpoint = _train(json_path, tmp_path / "run")
    case = cohort.validation[0]
    folder = Path(case["image"][0]).parent
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(folder),
                "--layout",
                "flat",
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    assert (tmp_path / "pred" / f"{case['case']}.nii.gz").is_file()  # the official evaluator's <ID>.nii.gz
    assert (
        main(
            [
                "score",
                "--pred",
                str(tmp_path / "pred"),
                "--data",
                str(json_path),
                "--split",
                "validation",
                "--out",
                str(tmp_path / "scores"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    regions = scores["per_case"][case["case"]]
    assert list(regions) == ["TC", "WT", "ET", "NETC", "SNFH", "RC"]
    assert regions["RC"]["ref_voxels"] > 0 and regions["RC"]["pred_voxels"] == 0  # the network predicts no RC


def test_nnunet_channel_files_need_channel_names(nnunet, tmp_path):
    from e2pa.data import find_cases

    loose = tmp_path / "loose"
    shutil.copytree(nnunet.parent / "imagesTs", loose)
    with pytest.raises(DataError, match="pass --data with the dataset.json"):
        find_cases([loose])
    cases = find_cases([loose], dataset_json=nnunet)
    assert set(cases[0].files) == {"flair", "t1", "t1ce", "t2"}
    flair_channel = int(next(k for k, v in NNUNET_BRATS_CHANNELS.items() if v == "Flair"))
    assert cases[0].files["flair"].name.endswith(f"_{flair_channel:04d}.nii.gz")
