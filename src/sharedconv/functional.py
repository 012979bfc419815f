"""Functional form of the shared convolution: fold the groups into the batch.

A grouped convolution with ``groups=G`` splits the ``G * D`` input channels into ``G``
groups of ``D`` channels and applies bank ``g`` of ``F`` filters to group ``g``. When all
``G`` banks are *one* tensor of shape ``(F, D, *kernel_size)``, the groups need not be
told apart at all: a view turns ``(B, G * D, *S)`` into ``(B * G, D, *S)``, one ordinary
convolution with the shared bank runs over that batch of ``B * G`` samples, and a second
view turns ``(B * G, F, *S_out)`` back into ``(B, G * F, *S_out)``. The result is exactly the
grouped convolution with ``G`` tied banks, with one convolution call and no loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shared_conv", "PADDING_MODES"]

#: The padding modes accepted by the layers, as in :class:`torch.nn.Conv2d`.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_IntOrTuple = int | Sequence[int]
_Padding = str | int | Sequence[int]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _as_tuple(value: _IntOrTuple, n: int, name: str, minimum: int) -> tuple[int, ...]:
    """``value`` as a tuple of ``n`` ints, each at least ``minimum``; clear errors otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got a bool ({value})")
    if isinstance(value, int):
        items: tuple = (value,) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != n:
            raise ValueError(
                f"{name} must have {n} value{'s' if n > 1 else ''} for a {n}-d convolution, "
                f"got {len(items)}: {value!r}"
            )
    else:
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {type(value).__name__}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        if item < minimum:
            raise ValueError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return items


def _check_groups(groups: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be a positive int, got {type(groups).__name__} ({groups!r})")
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups}")
    return groups


def _check_padding_mode(padding_mode: str) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return padding_mode


def _normalize_padding(
    padding: _Padding, n: int, stride: tuple[int, ...]
) -> str | tuple[int, ...]:
    """Validate ``padding``: ``'same'``, ``'valid'``, an int or a tuple of ``n`` ints."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"padding must be 'same', 'valid', an int or a tuple of ints, got {padding!r}"
            )
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is only defined for stride 1 (the output keeps the input's "
                f"length), got stride={stride}"
            )
        return padding
    return _as_tuple(padding, n, "padding", minimum=0)


def _explicit_padding(
    padding: str | tuple[int, ...], kernel_size: Sequence[int], dilation: tuple[int, ...]
) -> tuple[int, ...]:
    """Padding as the ``F.pad`` argument (last dimension first, ``(left, right)`` pairs).

    ``'same'`` pads ``dilation * (kernel - 1)`` in total per dimension, the extra element
    on the right when that total is odd, exactly as :class:`torch.nn.Conv2d` does.
    """
    pads: list[int] = []
    for i in reversed(range(len(kernel_size))):
        if padding == "valid":
            left = right = 0
        elif padding == "same":
            total = dilation[i] * (kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            assert isinstance(padding, tuple)
            left = right = padding[i]
        pads += [left, right]
    return tuple(pads)


def _uneven_same(weight: Tensor, dilation: tuple[int, ...]) -> bool:
    """Whether ``'same'`` padding needs one more element on the right in some dimension."""
    return any(d * (k - 1) % 2 for d, k in zip(dilation, weight.shape[2:], strict=True))


def _check_weight(weight: Tensor, bias: Tensor | None) -> int:
    """Validate the shared bank and its bias; return the spatial dimension ``n``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (3, 4, 5):
        raise ValueError(
            "weight must have shape (out_per_group, in_per_group, *kernel_size) with 1 to 3 "
            f"kernel dimensions (3-D to 5-D), got a {weight.dim()}-D tensor of shape "
            f"{tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one value per filter of the "
                f"shared bank, got shape {tuple(bias.shape)}"
            )
    return weight.dim() - 2


def _check_rank(x: Tensor, n: int, who: str) -> bool:
    """``x`` is a tensor of an ``n``-d convolution's rank; return whether it is batched."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() not in (n + 1, n + 2):
        raise ValueError(
            f"{who} expected a {n + 1}-D (unbatched) or {n + 2}-D (batched) input, got a "
            f"{x.dim()}-D input of shape {tuple(x.shape)}"
        )
    return x.dim() == n + 2


def _check_input(x: Tensor, weight: Tensor, groups: int, who: str) -> bool:
    """Validate the input of a shared convolution with ``weight``; return whether batched."""
    n, in_per_group = weight.dim() - 2, weight.shape[1]
    if isinstance(x, Tensor) and not x.is_floating_point():
        raise TypeError(f"{who} expected a floating-point input, got dtype {x.dtype}")
    batched = _check_rank(x, n, who)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{who} expected an input of the weight's dtype {weight.dtype}, got {x.dtype} "
            "(convert one of them, or run under torch.autocast)"
        )
    if x.device != weight.device:
        raise ValueError(
            f"{who} expected an input on the weight's device {weight.device}, got {x.device}"
        )
    channels = x.shape[1 if batched else 0]
    expected = groups * in_per_group
    if channels != expected:
        raise ValueError(
            f"{who} expected {expected} input channels (groups={groups} x {in_per_group} "
            f"channels per group), got {channels} in an input of shape {tuple(x.shape)}"
        )
    return batched


def _fold_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: str | tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str,
    batched: bool,
) -> Tensor:
    """The computation, on validated arguments: views around one ``F.convNd`` call."""
    n = weight.dim() - 2
    if not batched:
        x = x.unsqueeze(0)
    batch, spatial = x.shape[0], x.shape[2:]
    # (B, G*D, *S) -> (B*G, D, *S): a view for contiguous inputs, a copy otherwise.
    folded = x.reshape(batch * groups, weight.shape[1], *spatial)
    if padding_mode != "zeros" or (padding == "same" and _uneven_same(weight, dilation)):
        # Pad explicitly: the non-zero modes always, and an uneven 'same' too (ATen would
        # make the same zero-padded copy, with a warning).
        pads = _explicit_padding(padding, weight.shape[2:], dilation)
        if any(pads):
            mode = "constant" if padding_mode == "zeros" else padding_mode
            folded = F.pad(folded, pads, mode=mode)
        padding = (0,) * n
    if n == 1 and _grouped_path(folded, weight, groups):
        pad = _explicit_padding(padding, weight.shape[2:], dilation)[0]  # symmetric here
        grouped = folded.reshape(batch, groups * weight.shape[1], folded.shape[2])
        options = (groups, stride[0], pad, dilation[0])
        if _needs_grad(folded, weight, bias):
            out = _Conv1dGroupedBank.apply(grouped, weight, bias, *options)
        else:  # nothing to save: skip the autograd.Function's overhead
            out = _Conv1dGroupedBank.forward(grouped, weight, bias, *options)
        out = out.view(batch * groups, weight.shape[0], -1)
    elif n == 1 and _few_channels_path(folded, weight, bias):
        pad = _explicit_padding(padding, weight.shape[2:], dilation)[0]  # symmetric here
        out = _Conv1dFewChannels.apply(folded, weight, bias, stride[0], pad, dilation[0])
    else:
        out = _CONV[n](folded, weight, bias, stride, padding, dilation)
    # (B*G, F, *S_out) -> (B, G*F, *S_out): a view, unless the convolution returned a
    # channels_last output (channels_last weight), which this reshape has to copy.
    out = out.reshape(batch, groups * weight.shape[0], *out.shape[2:])
    return out if batched else out.squeeze(0)


#: Up to this many input channels per group, the 1-d layer on the CPU computes its input
#: gradient as a matrix product instead of oneDNN's backward-data convolution. oneDNN
#: pads channels to its vector block (16 floats with AVX-512), so for one or two channels
#: that convolution costs about as much as for 16; the matrix product costs what the
#: channels need. Measured on an AMD EPYC (2 threads), backward of weight, bias and input
#: together: the matrix product wins by 1.2-2.5x at 1 and 2 channels, is mixed at 4
#: (from 1.3x faster to 1.1x slower) and loses at 8 and above. The chapter
#: "Performance" shows the measurements (``python -m sharedconv.bench --suite
#: input_grad``).
FEW_CHANNELS = 2


def _needs_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether autograd will record this convolution."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _few_channels_path(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the 1-d convolution should use :class:`_Conv1dFewChannels`."""
    return (
        x.device.type == "cpu"
        and weight.shape[1] <= FEW_CHANNELS
        and not torch.is_autocast_enabled("cpu")
        and _needs_grad(x, weight, bias)
    )


def _conv1d_input_grad(
    grad: Tensor, weight: Tensor, length: int, stride: int, padding: int, dilation: int
) -> Tensor:
    """Gradient of ``F.conv1d`` with respect to its input, as a matrix product.

    ``cols[n, (d, j), l] = sum_f w[f, d, j] grad[n, f, l]`` is one matrix product; tap ``j``
    of output ``l`` read input position ``l * stride + j * dilation - padding``, so each
    column goes back there: the ``col2im`` of :func:`torch.nn.functional.fold`, on a
    signal seen as an image of height 1.
    """
    batch, f_out, l_out = grad.shape
    _, channels, k = weight.shape
    cols = torch.matmul(weight.reshape(f_out, channels * k).t(), grad)  # (N, D*k, L_out)
    padded = length + 2 * padding
    # the positions a strided kernel never reaches at the end are not part of fold's image
    reach = (l_out - 1) * stride + dilation * (k - 1) + 1
    image = F.fold(cols, (1, reach), (1, k), dilation=(1, dilation), stride=(1, stride))
    out = image.view(batch, channels, reach)
    if reach < padded:
        out = F.pad(out, (0, padded - reach))
    return out[:, :, padding : padding + length]


class _Conv1dFewChannels(torch.autograd.Function):
    """``F.conv1d`` whose input gradient is computed by :func:`_conv1d_input_grad`.

    Forward, weight and bias gradients are PyTorch's own; autograd keeps the same tensors
    as for ``F.conv1d`` (the input and the weight).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, dilation: int
    ) -> Tensor:
        return _CONV[1](x, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = (stride, padding, dilation, bias is not None)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        grad_x = grad_w = grad_b = None
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if has_bias else None, [stride],
                [padding], [dilation], False, [0], 1, [False, need_w, need_b],
            )
        if need_x:
            # Outside double backward, a detached weight: ATen's matmul will not fold the
            # batch into one matrix product for an operand that requires grad (a 6x slower
            # path here), even under no_grad.
            w = weight if torch.is_grad_enabled() else weight.detach()
            grad_x = _conv1d_input_grad(grad, w, x.shape[2], stride, padding, dilation)
        return grad_x, grad_w, grad_b, None, None, None


#: oneDNN's channel block on this kind of CPU (16 floats with AVX-512). A folded
#: convolution with fewer filters than this pads its output channels to a block; PyTorch's
#: grouped convolution blocks across the ``G * F`` channels of all groups instead.
BLOCK = 16


def _grouped_path(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether the 1-d convolution should run grouped, with a temporary copy of the bank.

    On the CPU, for a bank of fewer than :data:`BLOCK` filters over few groups
    (``groups * F <= 128``): there the folded convolution fills a fraction of its output
    channel block and PyTorch's grouped convolution is faster, forward and backward. With
    more groups, the fold's forward is faster again (measured on an AMD EPYC, 2 threads;
    see the chapter "Performance"). The ``groups`` copies of the bank are made in the
    forward and again in the backward, never saved.
    """
    f_out = weight.shape[0]
    return (
        x.device.type == "cpu"
        and 1 < groups
        and f_out < BLOCK
        and groups * f_out <= 128
        and not torch.is_autocast_enabled("cpu")
    )


class _Conv1dGroupedBank(torch.autograd.Function):
    """PyTorch's grouped ``F.conv1d`` with the bank repeated ``groups`` times, saving only
    the input and the one bank: the copies are made again in the backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        groups: int,
        stride: int,
        padding: int,
        dilation: int,
    ) -> Tensor:
        repeated = weight.repeat(groups, 1, 1)
        bias_rep = None if bias is None else bias.repeat(groups)
        return _CONV[1](x, repeated, bias_rep, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, groups, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = (groups, stride, padding, dilation, bias is not None)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        groups, stride, padding, dilation, has_bias = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and has_bias
        w = weight if torch.is_grad_enabled() else weight.detach()
        f_out = weight.shape[0]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, w.repeat(groups, 1, 1), [groups * f_out] if has_bias else None,
            [stride], [padding], [dilation], False, [0], groups, [need_x, need_w, need_b],
        )
        if need_w:
            grad_w = grad_w.view(groups, *weight.shape).sum(0)
        if need_b:
            grad_b = grad_b.view(groups, f_out).sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def shared_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    r"""Grouped convolution whose ``groups`` filter banks are one shared tensor.

    Equal to ``F.convNd(input, weight.repeat(groups, 1, ...), bias.repeat(groups),
    groups=groups)``, computed without saving the copies: the groups are folded into the
    batch and a single ``F.convNd`` call applies the shared bank. On the CPU, two 1-d
    shapes take a faster route with the same result and the same saved tensors: one or
    two channels per group (:data:`FEW_CHANNELS`) compute the input gradient as a matrix
    product, and banks of fewer than :data:`BLOCK` filters over few groups run PyTorch's
    grouped convolution on a temporary copy of the bank (the chapter "Performance" has the
    measurements). The dimension (1-d, 2-d or 3-d) is taken from ``weight``.

    Args:
        input: Tensor of shape :math:`(N, G \cdot D, *S)` or, unbatched, :math:`(G \cdot D, *S)`.
        weight: the shared bank, of shape :math:`(F, D, *\text{kernel\_size})`.
        bias: optional, of shape :math:`(F,)`, shared by the groups like ``weight``.
        stride: stride of the convolution, an int or a tuple with one value per dimension.
        padding: ``'valid'``, ``'same'`` (stride 1 only), an int or a tuple of ints.
        dilation: spacing between kernel elements, an int or a tuple.
        groups: :math:`G`, the number of channel groups that share the bank.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        Tensor of shape :math:`(N, G \cdot F, *S_{out})` (or :math:`(G \cdot F, *S_{out})`),
        group-major: channel ``g * F + f`` is filter ``f`` applied to group ``g``.

    Raises:
        TypeError: non-tensor or non-floating input, non-int options.
        ValueError: wrong input rank, channel count not ``groups * D``, bad bias shape,
            unknown padding or padding mode, ``padding='same'`` with a stride above 1.

    Example::

        >>> x = torch.randn(8, 5, 100)            # 5 streams of length 100
        >>> w = torch.randn(16, 1, 7)             # one bank of 16 filters
        >>> shared_conv(x, w, groups=5).shape     # 16 features per stream
        torch.Size([8, 80, 94])
    """
    n = _check_weight(weight, bias)
    groups = _check_groups(groups)
    stride_t = _as_tuple(stride, n, "stride", minimum=1)
    dilation_t = _as_tuple(dilation, n, "dilation", minimum=1)
    padding_n = _normalize_padding(padding, n, stride_t)
    padding_mode = _check_padding_mode(padding_mode)
    batched = _check_input(input, weight, groups, "shared_conv")
    return _fold_conv(
        input, weight, bias, stride_t, padding_n, dilation_t, groups, padding_mode, batched
    )

