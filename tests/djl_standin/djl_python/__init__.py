"""Stand-in for DJL Serving's ``djl_python`` package (see ../README.md): Input, Output, PairList."""

from .inputs import Input
from .outputs import Output
from .pair_list import PairList

__all__ = ["Input", "Output", "PairList"]
__version__ = "0.36.0-standin"
