"""e2pa.model — the fusion layers (EHF, ESA), E2PANet, the baselines, the losses and the model registry."""
