"""Run by torchrun in the distributed test: train from a TrainConfig JSON, then save this rank's
weights and cohort prototypes so the test can compare ranks."""
import json
import os
import sys

import torch

from e2pa.training import TrainConfig, Trainer

config_path, dump_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
trainer = Trainer(TrainConfig(**json.load(open(config_path))))
trainer.run()
torch.save({"model": trainer.model.state_dict(), "loss": trainer.loss_fn.state_dict()},
           os.path.join(dump_dir, f"rank{trainer.dist.rank}.pt"))
torch.distributed.destroy_process_group()
