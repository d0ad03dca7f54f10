"""DistributedDataParallel on CPU (Gloo, two processes under torchrun): ranks stay identical and
match a single process on the same global batch (both trained with plain SGD, see use_plain_sgd);
validation Dice is the mean over all validation cases, whichever rank scored them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_worker import use_plain_sgd

from e2pa.engine.checkpoint import load_checkpoint
from e2pa.engine.training import Trainer

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.mark.slow
def test_two_gloo_ranks_match_each_other_and_one_process(tiny_config, tmp_path):
    # one step per epoch: the global batch of 2 is the same two cases in both set-ups
    per_rank = tiny_config(
        out=str(tmp_path / "ddp"),
        epochs=2,
        batch_size=1,
        max_steps_per_epoch=1,
        modality_dropout=0.0,
        val_every=1,
        loss=dict(lambda_ehf=0.01),
    )
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(per_rank.to_json()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(WORKER),
            str(config),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0["model"]:
        assert torch.equal(rank0["model"][key], rank1["model"][key]), f"ranks differ in {key}"
    for key in rank0["loss"]:
        assert torch.equal(rank0["loss"][key], rank1["loss"][key]), f"cohort prototypes differ in {key}"
    assert rank0["loss"]["cohort.initialized"].any()

    torch.set_num_threads(1)
    single = use_plain_sgd(Trainer(dataclasses.replace(per_rank, out=str(tmp_path / "single"), batch_size=2)))
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.run()
    moved = max(
        (single.model.state_dict()[k] - initial[k]).abs().max().item()
        for k in initial
        if initial[k].is_floating_point()
    )
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    # Plain SGD on both sides (use_plain_sgd): the weights then differ by float32 rounding only (the
    # batch of 2 and the two ranks of 1 sum in other orders; measured ~6e-6 of the move). A DDP that
    # summed instead of averaging would be off by the whole move.
    for key, value in single.model.state_dict().items():
        if value.is_floating_point():
            diff = (rank0["model"][key] - value).abs().max().item()
            assert diff <= 1e-4 * moved, f"{key}: {diff} vs moved {moved}"
    torch.testing.assert_close(
        rank0["loss"]["cohort.prototypes"], single.loss_fn.state_dict()["cohort.prototypes"], rtol=1e-3, atol=1e-3
    )

    # Validation: the cohort has one validation case, so rank 1 scores none. The reported Dice must
    # be that case's Dice (a mean of per-rank means would halve it), the same on both ranks, and
    # best.pt must follow it.
    assert len(single.cohort.validation) == 1

    def validation(history):
        return [{k: v for k, v in row.items() if k.startswith("val_")} for row in history]

    assert validation(rank0["history"]) == validation(rank1["history"])
    single.model.load_state_dict(rank0["model"])
    expected = single.validate()
    assert expected["val_dice_mean"] > 0  # a halved Dice would be told apart
    reported = rank0["history"][-1]
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    best = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "best.pt")
    assert best["best_dice"] == rank0["best_dice"] == max(row["val_dice_mean"] for row in rank0["history"])
