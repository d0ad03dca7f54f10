"""Up-front data set validation (all problems at once, cached), scanner-rounding affines through the
MONAI loaders, and dataset.json entries that must stay inside the dataset folder."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from _data_factories import TINY_AFFINE

from e2pa.data import DataError, infer_transforms, load_datalist, val_transforms
from e2pa.data import validation as validation_module
from e2pa.data.validation import validate_cases


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("E2PA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _move_affine(path: str, delta: float) -> None:
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += delta
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)


def test_every_bad_case_is_reported_at_once_headers_first(make_case, own_cache, monkeypatch):
    cases = [make_case(f"Case_{i:03d}", seed=i) for i in range(4)]
    _move_affine(cases[1]["image"][2], 0.5)  # header problem: a different grid
    label = nib.load(cases[3]["label"])
    values = np.asanyarray(label.dataobj).copy()
    values[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(values, label.affine, label.header), cases[3]["label"])
    reads = []
    real = validation_module.check_case
    monkeypatch.setattr(validation_module, "check_case", lambda *a, **k: reads.append(a) or real(*a, **k))
    with pytest.raises(DataError, match=r"1 of 4 case\(s\) failed the header check: case Case_001: t1ce .*affine"):
        validate_cases(cases, progress=False)
    assert not reads, "voxels were read before every header was checked"
    _move_affine(cases[1]["image"][2], -0.5)
    with pytest.raises(DataError, match=r"1 of 4 case\(s\) failed the check: case Case_003: label: .*9"):
        validate_cases(cases, progress=False)


def test_a_second_pass_over_unchanged_data_reads_nothing(make_case, own_cache, monkeypatch):
    cases = [make_case(f"Case_{i:03d}", seed=i) for i in range(3)]
    assert validate_cases(cases, progress=False) == {"cases": 3, "cached": 0, "checked": 3}
    validation_module._CACHE.clear()  # as a new process would: only the file on disk remains
    assert (own_cache / "validated-cases.json").is_file()
    with monkeypatch.context() as patched:
        patched.setattr(validation_module, "check_case", lambda *a, **k: pytest.fail("read a cached case"))
        assert validate_cases(cases, progress=False) == {"cases": 3, "cached": 3, "checked": 0}
    label = nib.load(cases[0]["label"])  # an edited file (new size or mtime) is checked again
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), cases[0]["label"])
    os.utime(cases[0]["label"], ns=(1, 1))
    assert validate_cases(cases, progress=False)["checked"] == 1
    # another label convention is another question
    with pytest.raises(DataError, match="Case_001"):
        validate_cases(cases[1:], label_convention="brats2023", progress=False)


def test_scanner_rounding_of_affines_loads_in_every_chain(make_case, own_cache):
    case = make_case()
    _move_affine(case["image"][2], 1e-4)
    _move_affine(case["label"], -1e-4)
    validate_cases([case], progress=False)
    item = val_transforms()(dict(case))
    assert tuple(item["image"].shape) == (4, 10, 12, 8) and tuple(item["label"].shape) == (3, 10, 12, 8)
    np.testing.assert_allclose(np.asarray(item["image"].affine), TINY_AFFINE)
    item = infer_transforms()({"image": case["image"], "case": "Case_000"})
    assert tuple(item["image"].shape) == (4, 10, 12, 8)
    _move_affine(case["image"][1], 0.1)  # beyond the tolerance: a clear error, not a MONAI traceback
    with pytest.raises(DataError, match="t1 .* different affine"):
        val_transforms()(dict(case))


def test_dataset_json_entries_stay_inside_the_dataset_folder(make_case, tmp_path):
    inside = make_case("Case_000", root=tmp_path / "data")
    outside = make_case("Case_001", root=tmp_path / "elsewhere")
    relative = lambda p: os.path.relpath(p, tmp_path / "data")  # noqa: E731
    spec = {
        "labels": {"0": "background", "1": "NCR", "2": "ED", "4": "ET"},
        "label_convention": "brats2021",
        "training": [
            {"image": [relative(p) for p in c["image"]], "label": relative(c["label"])} for c in (inside, outside)
        ],
    }
    path = tmp_path / "data" / "dataset.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"entry 1: .*Case_001.* outside the dataset folder .*--allow-outside-paths"):
        load_datalist(path)
    assert len(load_datalist(path, allow_outside_paths=True).training) == 2
    # a symbolic link inside that leads outside is outside too
    shutil.rmtree(tmp_path / "data" / "Case_000")
    os.symlink(tmp_path / "elsewhere" / "Case_001", tmp_path / "data" / "Case_000")
    spec["training"] = [
        {
            "image": [f"Case_000/{os.path.basename(p)}" for p in outside["image"]],
            "label": f"Case_000/{os.path.basename(outside['label'])}",
        }
    ]
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_datalist(path)
