"""Run by torchrun in the distributed test: train from a TrainConfig JSON, then save this rank's
weights, cohort prototypes and metrics history so the test can compare ranks."""

import json
import os
import sys

import torch

from e2pa.engine.training import TrainConfig, Trainer


def use_plain_sgd(trainer: Trainer) -> Trainer:
    """Swap the trainer's AdamW (and its warm-up schedule) for plain SGD (lr 0.1, so that two steps
    move the weights by more than the test's 1e-3 floor).

    The comparison of DDP with one process is about gradients: DDP's average over ranks must equal
    the gradient of the whole batch, up to rounding. AdamW turns rounding into full-size updates
    wherever a gradient is analytically zero and only rounding is left (the weight directions a
    following normalisation removes): its first step is lr·g/|g|, whatever the size of g. SGD keeps
    an update proportional to its gradient, so the comparison measures what it is meant to."""
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    return trainer


if __name__ == "__main__":
    config_path, dump_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    trainer = use_plain_sgd(Trainer(TrainConfig(**json.load(open(config_path)))))
    trainer.run()
    torch.save(
        {
            "model": trainer.model.state_dict(),
            "loss": trainer.loss_fn.state_dict(),
            "history": trainer.history,
            "best_dice": trainer.best_dice,
        },
        os.path.join(dump_dir, f"rank{trainer.dist.rank}.pt"),
    )
    torch.distributed.destroy_process_group()
