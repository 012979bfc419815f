"""sharedconv: convolutions whose filters are shared across channel groups.

``SharedConv1d/2d/3d`` take the arguments of ``nn.Conv1d/2d/3d`` and compute the grouped
convolution whose ``groups`` filter banks are one tensor, as one convolution on a view that
folds the groups into the batch (``SharedConvTranspose1d/2d/3d``: the same for
``nn.ConvTranspose1d/2d/3d``); ``functional.shared_conv`` is the same operation as a
function; ``autotune()`` (opt-in) times the other correct ways of computing it on this
machine and keeps the fastest per shape; ``masked_shared_conv1d`` (and its layer,
``MaskedSharedConv1d``) applies one bank to many masked copies of one sequence without making
the copies.
"""

import torch as _torch

from . import functional, tuning
from .functional import shared_conv
from .masked import MaskedSharedConv1d, masked_shared_conv1d
from .modules import SharedConv1d, SharedConv2d, SharedConv3d
from .transposed import SharedConvTranspose1d, SharedConvTranspose2d, SharedConvTranspose3d
from .tuning import autotune

# sharedconv.shared_conv is a name of its own for torch.fx: record it as one call too
_torch.fx.wrap("shared_conv")

__all__ = [
    "MaskedSharedConv1d",
    "SharedConv1d",
    "SharedConv2d",
    "SharedConv3d",
    "SharedConvTranspose1d",
    "SharedConvTranspose2d",
    "SharedConvTranspose3d",
    "autotune",
    "functional",
    "masked_shared_conv1d",
    "shared_conv",
    "tuning",
]
__version__ = "0.1.0"
