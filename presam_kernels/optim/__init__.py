from .presam import PreSAM
from .variants import ASAM, SAM, FisherSAM, InfoSAM, VaSSO

__all__ = ["PreSAM", "SAM", "ASAM", "InfoSAM", "VaSSO", "FisherSAM"]
