"""e2pa: energy-guided multi-modality MRI fusion — layers, network, data, training, inference."""
__version__ = "0.1.0"

from .layers import EHF, ESA, EHFEnergies, ESADetails  # noqa: E402
from .losses import CohortEnergyLoss, E2PALoss, regions_to_classes  # noqa: E402
from .network import E2PAEnergies, E2PANet  # noqa: E402

__all__ = [
    "CohortEnergyLoss", "E2PAEnergies", "E2PALoss", "E2PANet", "EHF", "EHFEnergies", "ESA", "ESADetails",
    "__version__", "regions_to_classes",
]
