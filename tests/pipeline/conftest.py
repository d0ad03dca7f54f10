"""Fixtures of the pipeline tests: one small phantom cohort written once per session, and a tiny
training configuration that runs in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_json(tmp_path_factory) -> Path:
    """dataset.json of a 4-case 32³ phantom cohort (3 training, 1 validation)."""
    from e2pa.data import write_phantom_cohort

    return write_phantom_cohort(tmp_path_factory.mktemp("cohort"), cases=4, seed=11, shape=32, validation_fraction=0.25)


@pytest.fixture
def tiny_config(phantom_json, tmp_path):
    """``tiny_config(**overrides)`` → a TrainConfig of a 2-level, 4/8-channel network on 16³ patches."""
    from e2pa.engine.training import TrainConfig

    def make(**overrides):
        base = dict(
            data=str(phantom_json),
            out=str(tmp_path / "run"),
            epochs=2,
            batch_size=2,
            roi_size=(16, 16, 16),
            lr=3e-3,
            max_steps_per_epoch=2,
            sw_batch_size=4,
            progress=False,
            seed=3,
            model=dict(features=(4, 8), esa_rank=2),
            loss=dict(),
        )
        base.update(overrides)
        return TrainConfig(**base)

    return make
