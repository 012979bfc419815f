"""sharedconv: convolutions whose filters are shared across channel groups.

``SharedConv1d/2d/3d`` take the arguments of ``nn.Conv1d/2d/3d`` and compute the grouped
convolution whose ``groups`` filter banks are one tensor; ``functional.shared_conv`` is the
same operation as a function; ``masked_shared_conv1d`` applies one bank to many masked
copies of one sequence without making the copies.
"""

from . import functional
from .functional import shared_conv
from .masked import masked_shared_conv1d
from .modules import SharedConv1d, SharedConv2d, SharedConv3d

__all__ = [
    "SharedConv1d",
    "SharedConv2d",
    "SharedConv3d",
    "functional",
    "masked_shared_conv1d",
    "shared_conv",
]
__version__ = "0.1.0"
