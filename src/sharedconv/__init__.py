"""sharedconv: convolutions whose filters are shared across channel groups.

``SharedConv1d/2d/3d`` take the arguments of ``nn.Conv1d/2d/3d`` and compute the grouped
convolution whose ``groups`` filter banks are one tensor; ``functional.shared_conv`` is the
same operation as a function.
"""

from . import functional
from .functional import shared_conv
from .modules import SharedConv1d, SharedConv2d, SharedConv3d

__all__ = ["SharedConv1d", "SharedConv2d", "SharedConv3d", "functional", "shared_conv"]
__version__ = "0.1.0"
