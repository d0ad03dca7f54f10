"""e2pa.engine — training, inference, evaluation, ablation, checkpoints and metrics."""
