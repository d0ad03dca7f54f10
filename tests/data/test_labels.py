"""Label conventions: label map ↔ TC/WT/ET regions, recoding, value checks, recognising json names."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from e2pa.data import (
    CONVENTIONS,
    DataError,
    check_label_values,
    convention_from_label_names,
    convert_labels,
    get_convention,
    label_to_regions,
    regions_to_label,
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CONVENTIONS)), data=st.data())
def test_label_map_regions_round_trip(name, data):
    convention = CONVENTIONS[name]
    shape = st.tuples(*[st.integers(1, 6)] * 3)
    tumour_values = [v for v in convention.values if v != convention.resection_cavity]  # RC is in no region
    label = data.draw(arrays(np.uint8, shape, elements=st.sampled_from(tumour_values)))
    regions = label_to_regions(label, convention)
    assert regions.shape == (3, *label.shape) and regions.dtype == bool
    assert np.array_equal(regions_to_label(regions, convention), label)
    assert np.array_equal(regions_to_label(regions.astype(np.float32) * 0.9, convention), label)  # probabilities


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_regions_are_tc_wt_et_in_monai_order(name):
    convention = CONVENTIONS[name]
    label = np.array([0, convention.necrotic, convention.edema, convention.enhancing], dtype=np.uint8)
    tc, wt, et = label_to_regions(label[None, None], convention)[:, 0, 0]
    assert tc.tolist() == [False, True, False, True]  # NCR ∪ ET
    assert wt.tolist() == [False, True, True, True]  # every tumour label
    assert et.tolist() == [False, False, False, True]


def test_brats2021_matches_monai_converter():
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    label = np.random.default_rng(0).choice([0, 1, 2, 4], size=(6, 7, 8))
    monai_regions = np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(label))
    assert np.array_equal(label_to_regions(label, "brats2021"), monai_regions)


def test_a_leading_channel_axis_is_accepted():
    label = np.zeros((1, 4, 4, 4), dtype=np.uint8)
    label[0, 1, 1, 1] = 4
    assert label_to_regions(label).shape == (3, 4, 4, 4)


def test_inner_regions_overwrite_outer_ones():
    regions = np.ones((3, 2, 2, 2), dtype=bool)  # every voxel in TC, WT and ET
    assert np.all(regions_to_label(regions, "brats2023") == 3)
    regions[2] = False  # TC and WT only → necrosis
    assert np.all(regions_to_label(regions, "msd") == 2)
    regions[0] = False  # WT only → edema
    assert np.all(regions_to_label(regions, "brats2021") == 2)


@pytest.mark.parametrize("source, target", [("brats2021", "brats2023"), ("brats2023", "msd"), ("msd", "brats2021")])
def test_convert_between_conventions_keeps_the_regions(source, target):
    label = np.random.default_rng(1).choice(CONVENTIONS[source].values, size=(5, 5, 5))
    converted = convert_labels(label, source, target)
    assert np.array_equal(label_to_regions(converted, target), label_to_regions(label, source))
    assert np.array_equal(convert_labels(converted, target, source), label)


def test_values_outside_the_convention_are_named_with_the_source_and_a_hint():
    label = np.array([0, 1, 2, 4])
    with pytest.raises(
        DataError,
        match=r"case_seg\.nii\.gz: label values \[4\] are not in the brats2023"
        r".*fit the brats2021",
    ):
        label_to_regions(label, "brats2023", source="case_seg.nii.gz")
    with pytest.raises(DataError, match=r"label values \[5, 9\]"):
        check_label_values(np.array([0, 5, 9]), "msd")
    with pytest.raises(DataError, match="non-integer"):
        check_label_values(np.array([0.0, 1.5]), "brats2021")


def test_convention_names_and_aliases():
    assert get_convention("BraTS2020") is CONVENTIONS["brats2021"]
    assert get_convention("msd_task01") is CONVENTIONS["msd"]
    with pytest.raises(ValueError, match="unknown label convention"):
        get_convention("brats1999")


def test_conventions_are_recognised_from_dataset_json_label_names():
    msd = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert convention_from_label_names(msd) is CONVENTIONS["msd"]
    for convention in CONVENTIONS.values():
        assert convention_from_label_names({str(k): v for k, v in convention.label_names.items()}) is convention
    custom = convention_from_label_names({"0": "background", "5": "NCR", "6": "ED", "7": "ET"})
    assert (custom.necrotic, custom.edema, custom.enhancing) == (5, 6, 7)
    with pytest.raises(DataError, match="no label recognised as"):
        convention_from_label_names({"0": "background", "1": "tumour"})


def test_brats2024_resection_cavity_is_in_no_tumour_region():
    """Official BraTS 2024 GLI (brats-evaluation configs/config_gli.yaml): TC = 1+3, WT = 1+2+3, RC = 4 alone."""
    convention = get_convention("brats2024")
    label = np.array([0, 1, 2, 3, 4], dtype=np.uint8)[None, None]
    tc, wt, et = label_to_regions(label, convention)[:, 0, 0]
    assert tc.tolist() == [False, True, False, True, False]
    assert wt.tolist() == [False, True, True, True, False]
    assert et.tolist() == [False, False, False, True, False]
    assert convention.scored_regions() == {
        "TC": (1, 3),
        "WT": (1, 2, 3),
        "ET": (3,),
        "NETC": (1,),
        "SNFH": (2,),
        "RC": (4,),
    }
    with pytest.raises(DataError, match="resection-cavity"):
        convert_labels(label, "brats2024", "brats2021")
    assert convert_labels(np.array([1, 2, 3, 0], np.uint8), "brats2024", "brats2021").tolist() == [1, 2, 4, 0]


def test_conventions_from_nnunet_labels():
    from e2pa.data.labels import convention_from_nnunet_labels

    # nnU-Net's BraTS region datasets (Dataset137): 1 edema, 2 necrosis, 3 ET, trained as regions
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert convention_from_nnunet_labels(regions).name == "msd"
    assert convention_from_nnunet_labels({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}).name == "brats2024"
    custom = convention_from_nnunet_labels({"background": 0, "edema": 5, "necrosis": 6, "enhancing tumour": 7})
    assert (custom.edema, custom.necrotic, custom.enhancing) == (5, 6, 7)
    assert get_convention(custom.to_dict()) == custom
    with pytest.raises(DataError, match="enhancing"):
        convention_from_nnunet_labels({"background": 0, "whole tumor": [1, 2], "tumor core": [2]})
    with pytest.raises(DataError, match="edema"):
        convention_from_nnunet_labels({"background": 0, "liver": 1, "necrosis": 2, "enhancing": 3})


def test_nested_regions_are_what_the_written_label_map_holds():
    """Raw channels need not be nested (ET outside TC, TC outside WT); the label map infer writes is,
    and nested_regions gives its regions."""
    from e2pa.data import nested_regions

    raw = np.zeros((3, 4, 1, 1), dtype=np.float32)
    raw[:, 0, 0, 0] = [0.9, 0.2, 0.1]  # TC without WT
    raw[:, 1, 0, 0] = [0.1, 0.1, 0.8]  # ET alone
    raw[:, 2, 0, 0] = [0.1, 0.9, 0.1]  # edema
    for name in ("brats2021", "msd"):
        regions = nested_regions(raw, name)
        assert regions.dtype == bool
        assert np.array_equal(regions, label_to_regions(regions_to_label(raw, name), name))
        tc, wt, et = regions
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        assert wt[:3].all() and tc[:2].all() and et[1].all() and not et[0].any() and not wt[3].any()
