"""Per-modality acquisition faults and per-case anatomy of the phantom: fault maps are exactly the
voxels a fault changed (per kind), the clean modalities and the clean version of a case are
untouched, everything is deterministic per seed, and the cohort writer stores the maps."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from e2pa.data import MODALITIES, make_phantom_case, write_phantom_cohort
from e2pa.data.faults import FAULT_CODES, FAULT_KINDS, parse_fault_kinds

SHAPE = 32


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_fault_map_is_exactly_the_changed_voxels_of_the_faulted_modality(kind):
    seen = 0
    for seed in range(3):
        faulted = make_phantom_case([7, seed], SHAPE, vary_anatomy=True, faults=(kind,), fault_rate=1.0, max_faulted=2)
        clean = make_phantom_case([7, seed], SHAPE, vary_anatomy=True)
        assert len(faulted.faults) == 2 and all(f.kind == kind for f in faulted.faults)
        assert np.array_equal(faulted.label, clean.label), "faults must not move the tumour"
        fault_map = faulted.fault_map()
        assert fault_map.shape == (*faulted.shape, len(MODALITIES)) and fault_map.dtype == np.uint8
        for m, modality in enumerate(MODALITIES):
            changed = faulted.images[modality] != clean.images[modality]
            assert np.array_equal(changed, fault_map[..., m] > 0), f"{kind}/{modality}: map != changed voxels"
            assert set(np.unique(fault_map[..., m]).tolist()) <= {0, FAULT_CODES[kind]}
            assert np.all(faulted.images[modality][~faulted.brain_mask] == 0), "background must stay 0"
            assert np.isfinite(faulted.images[modality]).all()
        for fault in faulted.faults:
            assert fault.region.any(), f"{kind}: a fault that changes nothing"
            assert np.array_equal(fault.region, fault_map[..., MODALITIES.index(fault.modality)] > 0)
            json.dumps(fault.params)  # JSON-serialisable parameters
            seen += 1
    assert seen == 6


def test_fault_kinds_change_the_image_the_way_they_say():
    def faulted(kind, seed=1):
        case = make_phantom_case([3, seed], SHAPE, faults=(kind,), fault_rate=1.0, max_faulted=1)
        clean = make_phantom_case([3, seed], SHAPE)
        fault = case.faults[0]
        return case.images[fault.modality][fault.region], clean.images[fault.modality][fault.region]

    after, before = faulted("coverage")
    assert np.all(after == 0) and np.all(before > 0), "a missing slab holds no signal"
    after, before = faulted("void")
    assert after.mean() < 0.8 * before.mean() and (after < 0.3 * before).mean() > 0.2, "a void loses signal"
    after, before = faulted("ghosting")
    assert np.all(after > before), "ghosts add signal"
    after, before = faulted("low_snr")
    assert np.abs(after - before).mean() > 0.1 * before.mean(), "low SNR: noise of the order of the signal"


def test_faults_and_anatomy_are_deterministic_per_seed_and_vary_between_cases():
    a = make_phantom_case([5, 0], SHAPE, vary_anatomy=True, faults=FAULT_KINDS, fault_rate=0.7)
    b = make_phantom_case([5, 0], SHAPE, vary_anatomy=True, faults=FAULT_KINDS, fault_rate=0.7)
    c = make_phantom_case([5, 1], SHAPE, vary_anatomy=True, faults=FAULT_KINDS, fault_rate=0.7)
    assert np.array_equal(a.fault_map(), b.fault_map())
    assert all(np.array_equal(a.images[m], b.images[m]) for m in MODALITIES)
    assert [(f.modality, f.kind) for f in a.faults] == [(f.modality, f.kind) for f in b.faults]
    assert not np.array_equal(a.brain_mask, c.brain_mask), "anatomy must differ between cases"
    plain = make_phantom_case([5, 0], SHAPE)
    assert not np.array_equal(a.brain_mask, plain.brain_mask), "vary_anatomy must deform the template"


def test_fault_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown kind"):
        make_phantom_case(0, 24, faults=("blur",), fault_rate=0.5)
    with pytest.raises(ValueError, match="fault_rate"):
        make_phantom_case(0, 24, faults=("void",), fault_rate=1.5)
    assert parse_fault_kinds("all") == FAULT_KINDS
    assert parse_fault_kinds("void, drift") == ("void", "drift")
    with pytest.raises(ValueError, match="fault kinds"):
        parse_fault_kinds("void,wobble")


def test_cohort_writer_stores_fault_maps_and_descriptions(tmp_path):
    dataset = write_phantom_cohort(
        tmp_path / "c", 2, seed=4, shape=24, vary_anatomy=True, faults=FAULT_KINDS, fault_rate=1.0, max_faulted=1
    )
    spec = json.loads(dataset.read_text())
    assert spec["phantom"]["fault_codes"] == FAULT_CODES and spec["phantom"]["vary_anatomy"]
    for index, entry in enumerate(spec["training"] + spec["validation"]):
        stored = np.asarray(nib.load(tmp_path / "c" / entry["faultmap"]).dataobj)
        described = json.loads((tmp_path / "c" / entry["faults"]).read_text())
        case = make_phantom_case([4, index], 24, vary_anatomy=True, faults=FAULT_KINDS, fault_rate=1.0, max_faulted=1)
        assert np.array_equal(stored, case.fault_map())
        assert [(f["modality"], f["kind"], f["voxels"]) for f in described["faults"]] == [
            (f.modality, f.kind, int(f.region.sum())) for f in case.faults
        ]
