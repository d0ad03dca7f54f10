"""e2pa: energy-guided multi-modality MRI fusion — layers, network, data, training, inference."""
__version__ = "0.1.0"
