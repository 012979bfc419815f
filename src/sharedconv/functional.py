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
    if padding_mode != "zeros" or (padding == "same" and _uneven_same(weight, dilation)):
        # Pad explicitly: the non-zero modes always, and an uneven 'same' too (ATen would
        # make the same zero-padded copy, with a warning). Padding acts on the spatial
        # dimensions only, so it is the same before and after the fold.
        pads = _explicit_padding(padding, weight.shape[2:], dilation)
        if any(pads):
            mode = "constant" if padding_mode == "zeros" else padding_mode
            x = F.pad(x, pads, mode=mode)
        padding = (0,) * n
    if n == 1:
        route = _cpu_route(x, weight, groups)
        if route is not None:
            pad = _explicit_padding(padding, weight.shape[2:], dilation)[0]  # symmetric
            options = (groups, stride[0], pad, dilation[0], route)
            if _needs_grad(x, weight, bias):
                out = _Conv1dSharedCPU.apply(x, weight, bias, options)
            else:  # nothing to save: skip the autograd.Function's overhead
                out = _Conv1dSharedCPU.forward(x, weight, bias, options)
            return out if batched else out.squeeze(0)
    batch, spatial = x.shape[0], x.shape[2:]
    # (B, G*D, *S) -> (B*G, D, *S): a view for contiguous inputs, a copy otherwise.
    folded = x.reshape(batch * groups, weight.shape[1], *spatial)
    out = _CONV[n](folded, weight, bias, stride, padding, dilation)
    # (B*G, F, *S_out) -> (B, G*F, *S_out): a view, unless the convolution returned a
    # channels_last output (channels_last weight), which this reshape has to copy.
    out = out.reshape(batch, groups * weight.shape[0], *out.shape[2:])
    return out if batched else out.squeeze(0)


#: oneDNN's channel block on this kind of CPU (16 floats with AVX-512). A folded
#: convolution pads its channels to whole blocks; PyTorch's grouped convolution picks
#: kernels and blocks that fit one group's channels instead.
BLOCK = 16

#: The CPU routes below were measured on an AMD EPYC with 2 threads (torch 2.13, oneDNN),
#: part by part: forward, input gradient, weight gradient, each on the folded view and
#: on the grouped view with ``groups`` temporary copies of the bank (``python -m
#: sharedconv.bench --suite input_grad`` and the chapter "Performance").
#:
#: Up to this many weights in the ``groups`` bank copies, a bank of fewer than
#: :data:`BLOCK` filters runs its forward as PyTorch's grouped convolution: the folded
#: one fills a fraction of its output block with so few filters, and with many groups
#: the grouped one is slower again.
GROUPED_FORWARD_WEIGHTS = 512

#: Input channels per group for which the input gradient is computed by the grouped
#: convolution: at both measured shapes, 1.7-3x faster than the folded one at one or two
#: channels and ahead at 3, 4 and 8; at other counts behind at one shape at least, or
#: (at 5) ahead by less than the timing noise. oneDNN computes the folded one in blocks
#: of 16 channels however few there are; its grouped kernels use blocks of 4 or 8
#: channels, or a matrix product per group, none padded.
GROUPED_INPUT_GRAD = (1, 2, 3, 4, 8)

#: Input channels per group for which the weight gradient is computed by the grouped
#: convolution (summing the ``groups`` gradients of the copies): only at 8 channels is it
#: ahead at both measured shapes; at one or two channels it is slower, by up to 8x.
GROUPED_WEIGHT_GRAD = (8,)


def _needs_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether autograd will record this convolution."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


_Route = tuple[bool, bool, bool]


def _cpu_route(x: Tensor, weight: Tensor, groups: int) -> _Route | None:
    """Which parts of a 1-d shared convolution of ``x`` ``(B, G * D, L)`` run grouped.

    Returns ``(forward, input gradient, weight gradient)``, ``True`` for a part computed
    by PyTorch's grouped convolution on temporary copies of the bank, or ``None`` when
    every part runs folded: on other devices, under autocast, with one group, or when the
    bank copies would hold more elements than the input. The parts are chosen by
    :data:`GROUPED_FORWARD_WEIGHTS`, :data:`GROUPED_INPUT_GRAD` and
    :data:`GROUPED_WEIGHT_GRAD`; a gradient part only when that gradient is needed.
    The thresholds were measured in float32; other dtypes follow the same routes (the
    results are the same, float64 included, which is what the tests compare in).
    """
    if x.device.type != "cpu" or groups == 1 or torch.is_autocast_enabled("cpu"):
        return None
    copies = groups * weight.numel()
    if copies > x.numel():
        return None
    f_out, d = weight.shape[:2]
    grad = torch.is_grad_enabled()
    route = (
        f_out < BLOCK and copies <= GROUPED_FORWARD_WEIGHTS,
        grad and x.requires_grad and d in GROUPED_INPUT_GRAD,
        grad and weight.requires_grad and d in GROUPED_WEIGHT_GRAD,
    )
    return route if any(route) else None


def _repeat_bank(weight: Tensor, groups: int) -> Tensor:
    """``groups`` copies of the bank, ``(groups * F, D, k)``: ``expand``, then one copy.

    Cheaper than ``weight.repeat(groups, 1, 1)`` for the small banks it serves (about
    4 µs against 8 µs a call here, where a whole step can take under a millisecond).
    """
    return weight.expand(groups, *weight.shape).reshape(groups * weight.shape[0],
                                                        *weight.shape[1:])


class _Conv1dSharedCPU(torch.autograd.Function):
    """The shared 1-d convolution of ``x`` ``(B, G * D, L)``, part by part.

    ``options = (groups, stride, padding, dilation, route)`` with ``route`` from
    :func:`_cpu_route`: the forward, the input gradient and the weight (and bias)
    gradient each run either on the folded view (one bank, a batch of ``B * G``) or as
    PyTorch's grouped convolution on ``groups`` copies of the bank. The copies are made
    where they are used and dropped there: autograd keeps the input and the one bank, as
    for the folded convolution.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, bias: Tensor | None, options: tuple
    ) -> Tensor:
        groups, stride, padding, dilation, (grouped_forward, _, _) = options
        if grouped_forward:
            bias_copies = None if bias is None else bias.expand(groups, -1).reshape(-1)
            return _CONV[1](x, _repeat_bank(weight, groups), bias_copies, stride, padding,
                            dilation, groups)
        batch, length = x.shape[0], x.shape[2]
        folded = x.reshape(batch * groups, weight.shape[1], length)
        out = _CONV[1](folded, weight, bias, stride, padding, dilation)
        return out.view(batch, groups * weight.shape[0], out.shape[2])

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, options = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = options
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        groups, stride, padding, dilation, (_, grouped_x, grouped_w) = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        # the bias gradient goes with the weight gradient (the same kernel computes both)
        f_out, d = weight.shape[:2]
        conv = ([stride], [padding], [dilation], False, [0])
        grads: list[Tensor | None] = [None, None, None]  # input, weight, bias
        for grouped in (True, False):
            mask = [need_x and grouped_x == grouped, need_w and grouped_w == grouped,
                    need_b and grouped_w == grouped]
            if not any(mask):
                continue
            if grouped:
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    grad, x, _repeat_bank(weight, groups),
                    [groups * f_out] if mask[2] else None, *conv, groups, mask,
                )
                if mask[1]:
                    gw = gw.view(groups, *weight.shape).sum(0)
                if mask[2]:
                    gb = gb.view(groups, f_out).sum(0)
            else:
                batch = x.shape[0] * groups
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    grad.reshape(batch, f_out, grad.shape[2]),
                    x.reshape(batch, d, x.shape[2]), weight,
                    [f_out] if mask[2] else None, *conv, 1, mask,
                )
                if mask[0]:
                    gx = gx.view(x.shape)
            for i, part in enumerate((gx, gw, gb)):
                if mask[i]:
                    grads[i] = part
        return grads[0], grads[1], grads[2], None

    @classmethod
    def apply(cls, *args):  # type: ignore[override]
        """:meth:`torch.autograd.Function.apply`, without its per-call argument binding.

        For a Function that defines ``setup_context``, ``apply`` first binds its
        arguments to ``forward``'s signature with :func:`inspect.signature` (to fill in
        defaults), about 20 µs a call here: several percent of a small step. This
        ``forward`` has no defaults and is always called with every argument, so outside
        functorch transforms and compilation the binding is skipped and autograd's own
        ``apply`` (the C++ one every Function ends in) is called directly.
        """
        if (
            _SINGLE_LEVEL is None
            or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()
        ):
            return super().apply(*args)
        return super(_SINGLE_LEVEL, cls).apply(*args)


#: The class whose ``apply`` does the binding; the next one up is autograd's C++ base.
_SINGLE_LEVEL = getattr(torch.autograd.function, "_SingleLevelFunction", None)


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
    batch and a single ``F.convNd`` call applies the shared bank. On the CPU, a 1-d
    convolution with few channels or few filters per group computes some of its parts
    (forward, input gradient, weight gradient) with PyTorch's grouped convolution on
    temporary copies of the bank instead, where that was measured faster
    (:data:`GROUPED_FORWARD_WEIGHTS`, :data:`GROUPED_INPUT_GRAD`,
    :data:`GROUPED_WEIGHT_GRAD`); the result is the same, and autograd still keeps only
    the input and the one bank (the chapter "Performance" has the
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

