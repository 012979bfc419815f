"""TF32 arithmetic on any device: float32 convolutions and matrix products computed as an
NVIDIA GPU computes them with TF32 allowed.

TF32 keeps float32's 8-bit exponent but only 10 of its 23 mantissa bits. A GPU that runs a
float32 convolution in TF32 rounds each operand to those 10 bits, multiplies the rounded
values exactly and adds the products in float32. :func:`round_tf32` is that rounding and
:class:`emulate_tf32` applies it, below autograd, to the operands of every float32
convolution (forward and both gradients) and, where matrix products are allowed TF32, of
every matrix product. So a model trained under ``emulate_tf32()`` on a CPU sees the same
operand rounding as on a GPU with PyTorch's TF32 settings, and a check that holds only in
full float32 fails there too.

The mode reads PyTorch's own switches at every call, as the GPU does:
``torch.backends.cudnn.allow_tf32`` (default ``True``) for convolutions, and
``torch.backends.cuda.matmul.allow_tf32`` (default ``False``) for matrix products. Code
that turns TF32 off for a comparison, ``with torch.backends.cudnn.flags(...,
allow_tf32=False)``, is computed in full float32 under the mode as on the GPU.

What it does not reproduce: the order in which a GPU kernel adds its products (float32
additions in another order differ in their last bits, as between any two kernels), and
which kernels a GPU library runs without TF32 for a given shape. It is a model of the
rounding, the part of TF32 that changes results by about a thousandth.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ROUNDINGS", "emulate_tf32", "round_tf32"]

#: The ways a float32 becomes a TF32 value. ``"nearest"`` rounds to the nearest value
#: with 10 mantissa bits, ties away from zero (CUDA's ``cvt.rna.tf32.f32``); ``"truncate"``
#: drops the 13 low bits, which doubles the largest error and biases it towards zero.
ROUNDINGS = ("nearest", "truncate")

_LOW = (1 << 13) - 1  # the 13 mantissa bits that TF32 drops
_HALF = 1 << 12

_aten = torch.ops.aten
#: For each operator: the positions of the arguments rounded, and which switch allows it.
_CONVOLUTIONS = {
    _aten.convolution.default: (0, 1),  # input, weight (the bias is added, not multiplied)
    _aten.convolution_backward.default: (0, 1, 2),  # output's gradient, input, weight
}
_PRODUCTS = {
    _aten.mm.default: (0, 1),
    _aten.bmm.default: (0, 1),
    _aten.addmm.default: (1, 2),
    _aten.baddbmm.default: (1, 2),
}


def round_tf32(x: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """``x`` (float32) rounded to TF32's 10 mantissa bits, as a new float32 tensor.

    Infinities and NaNs are returned unchanged; a finite value that rounds past the largest
    float32 becomes an infinity. Raises ``TypeError`` for another dtype and
    ``ValueError`` for an unknown ``rounding``.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"round_tf32 expects a float32 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    bits = x.contiguous().view(torch.int32)
    if rounding == "nearest":  # add half a TF32 step to the magnitude, then drop the bits
        bits = bits + _HALF
    rounded = (bits & ~_LOW).view(torch.float32).view_as(x)
    return torch.where(torch.isfinite(x), rounded, x)


class emulate_tf32(TorchDispatchMode):  # noqa: N801 - used like a function: with emulate_tf32():
    """Within ``with emulate_tf32():``, float32 convolutions and (where allowed) matrix
    products round their operands with :func:`round_tf32` first, on any device.

    ``rounding`` is one of :data:`ROUNDINGS`. Tensors of other dtypes pass untouched.
    """

    def __init__(self, rounding: str = "nearest") -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        super().__init__()
        self.rounding = rounding
        self.rounded_calls = 0  # operator calls whose operands were rounded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = None
        if func in _CONVOLUTIONS and torch.backends.cudnn.allow_tf32:
            positions = _CONVOLUTIONS[func]
        elif func in _PRODUCTS and torch.backends.cuda.matmul.allow_tf32:
            positions = _PRODUCTS[func]
        if positions:
            args = list(args)
            for i in positions:
                value = args[i]
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    args[i] = round_tf32(value, self.rounding)
            self.rounded_calls += 1
        return func(*args, **kwargs)
