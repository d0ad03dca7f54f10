import pickle
import random

import numpy as np
import pytest
import torch

from e2pa.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_round_trip_and_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "epoch": 3, "config": {"a": [1, 2]}})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["config"] == {"a": [1, 2]}
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    assert not list(tmp_path.glob("*.partial"))


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model": torch.nn.Linear(30, 20).state_dict()})
    data = path.read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"torn.pt cannot be read safely"):
        load_checkpoint(tmp_path / "torn.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an e2pa checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"epoch": 1})

    class Unsaveable:
        pass

    with pytest.raises((pickle.PicklingError, AttributeError)):  # local classes and lambdas do not pickle
        save_checkpoint(path, {"epoch": 2, "bad": Unsaveable(), "lambda": lambda: 0})
    assert load_checkpoint(path)["epoch"] == 1
    assert not list(tmp_path.glob("*.partial"))


def test_rng_state_resumes_every_generator(tmp_path):
    state = capture_rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    from e2pa.io import atomic_write_text

    path = atomic_write_text(tmp_path / "a.txt", "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
