"""Long-run check (``make soak``, not part of ``make test``): many small training steps and
inferences in one process keep memory flat and give the same results for the same seed."""
from __future__ import annotations

import dataclasses
import resource

import pytest
import torch

from e2pa.engine.inference import find_cases, load_model, predict_case
from e2pa.engine.training import TrainConfig, Trainer


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from e2pa.data import write_phantom_cohort
    return write_phantom_cohort(tmp_path_factory.mktemp("soak"), cases=6, seed=1, shape=32)


def test_many_steps_and_inferences_keep_memory_flat_and_results_deterministic(cohort, tmp_path):
    base = TrainConfig(data=str(cohort), out=str(tmp_path / "a"), epochs=30, batch_size=2, roi_size=(16, 16, 16),
                       max_steps_per_epoch=4, val_every=10, progress=False, seed=4, model=dict(features=(4, 8)))
    first = Trainer(base)
    samples = []
    for epoch in range(base.epochs):
        first.run(stop_after_steps=(epoch + 1) * 4)
        samples.append(_rss_mb())
    warm, last = sum(samples[5:10]) / 5, sum(samples[-5:]) / 5
    assert last - warm < 150, f"memory grew from {warm:.0f} MB to {last:.0f} MB over {len(samples)} epochs"

    second = Trainer(dataclasses.replace(base, out=str(tmp_path / "b")))
    second.run()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), f"{key} differs between identical runs"

    loaded = load_model(tmp_path / "b" / "checkpoints" / "last.pt")
    case = find_cases([str(cohort.parent / "Phantom_005")])[0]
    reference = predict_case(loaded, case).label
    before = _rss_mb()
    for _ in range(40):
        assert (predict_case(loaded, case).label == reference).all()
    assert _rss_mb() - before < 100, "inference leaks memory"
