"""presam-kernels: sharpness-aware optimizers (SAM, ASAM, infoSAM, VaSSO,
FisherSAM) on the preSAM framework, with fused multi-tensor backends."""
from ._extension import extension_available
from .batchnorm import disable_running_stats, enable_running_stats
from .optim import ASAM, SAM, FisherSAM, InfoSAM, PreSAM, VaSSO

__version__ = "0.1.0"
__all__ = [
    "SAM",
    "ASAM",
    "InfoSAM",
    "VaSSO",
    "FisherSAM",
    "PreSAM",
    "disable_running_stats",
    "enable_running_stats",
    "extension_available",
]
