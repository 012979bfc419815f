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
        pad = _explicit_padding(padding, weight.shape[2:], dilation)[0]  # symmetric
        route = _cpu_route(x, weight, groups, pad, stride[0], dilation[0])
        if route is not None:
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
#: part by part: forward, input gradient, weight gradient, each on the folded view, on
#: the grouped view with ``groups`` temporary copies of the bank, and (small banks) as
#: matrix products over the unfolded windows (``python -m sharedconv.bench --suite
#: input_grad``, ``--suite unfold`` and the chapter "Performance").
#:
#: A bank of at most this many weights (``F * D * k``), with no more taps per filter than
#: filters (``D * k <= F``), runs every part as a batched matrix product over the
#: unfolded windows of each group (``im2col``): the forward is
#: ``bmm(bank (F, D*k), windows (D*k, L_out))`` per group, the weight gradient
#: ``bmm(grad, windows^T)`` summed over the groups, the input gradient
#: ``bmm(bank^T, grad)`` added back window by window. Such a convolution does a few
#: multiply-adds per output element and is bound by memory traffic; oneDNN pads its
#: ``D`` channels and its ``F`` filters to blocks of :data:`BLOCK` and reorders in and out
#: of that layout, while the product writes each output once. The windows are a
#: temporary of ``D * k`` times the input, no larger than the output (``D * k <= F``),
#: made in the forward and again in the backward, never saved.
UNFOLD_WEIGHTS = 64

#: The unfolded parts run over the samples (``B * G`` of them) in chunks whose windows
#: take about this many bytes, so that the windows are still in cache (2 MiB of L2 here)
#: when the product reads them. Unchunked, at (B, G, L, F, k) = (8, 256, 256, 8, 7), the
#: forward over 15 MB of windows took 2.9 ms, against 1.6 ms in 2 MiB chunks.
UNFOLD_CHUNK_BYTES = 2**21

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


#: How one part of the convolution is computed: on the folded view, as PyTorch's grouped
#: convolution on bank copies, or as matrix products over the unfolded windows.
FOLD, GROUPED, UNFOLD = "fold", "grouped", "unfold"

_Route = tuple[str, str, str]


def _cpu_route(
    x: Tensor, weight: Tensor, groups: int, padding: int = 0, stride: int = 1,
    dilation: int = 1, *, unfold: bool = True,
) -> _Route | None:
    """How each part of a 1-d shared convolution of ``x`` ``(B, G * D, L)`` is computed.

    Returns ``(forward, input gradient, weight gradient)``, each :data:`FOLD`,
    :data:`GROUPED` or :data:`UNFOLD`, or ``None`` when every part runs folded: on other
    devices, under autocast, with one group, or when neither the windows nor the bank
    copies are worth their memory. A small bank (:data:`UNFOLD_WEIGHTS`) runs every part
    unfolded; otherwise the parts are chosen by :data:`GROUPED_FORWARD_WEIGHTS`,
    :data:`GROUPED_INPUT_GRAD` and :data:`GROUPED_WEIGHT_GRAD`, a gradient part only when
    that gradient is needed. ``padding``, ``stride`` and ``dilation`` only tell whether
    the input holds one window at all (if not, the folded convolution raises its error).
    ``unfold=False`` gives the route the layer would take without :data:`UNFOLD` (the
    benchmark's comparison).
    The thresholds were measured in float32; other dtypes follow the same routes (the
    results are the same, float64 included, which is what the tests compare in).
    """
    if x.device.type != "cpu" or groups == 1 or torch.is_autocast_enabled("cpu"):
        return None
    f_out, d, k = weight.shape
    if x.shape[-1] + 2 * padding < dilation * (k - 1) + 1:
        return None
    if unfold and weight.numel() <= UNFOLD_WEIGHTS and d * k <= f_out:
        return (UNFOLD, UNFOLD, UNFOLD)
    copies = groups * weight.numel()
    if copies > x.numel():
        return None
    grad = torch.is_grad_enabled()
    route = (
        GROUPED if f_out < BLOCK and copies <= GROUPED_FORWARD_WEIGHTS else FOLD,
        GROUPED if grad and x.requires_grad and d in GROUPED_INPUT_GRAD else FOLD,
        GROUPED if grad and weight.requires_grad and d in GROUPED_WEIGHT_GRAD else FOLD,
    )
    return None if route == (FOLD, FOLD, FOLD) else route


def _repeat_bank(weight: Tensor, groups: int) -> Tensor:
    """``groups`` copies of the bank, ``(groups * F, D, k)``: ``expand``, then one copy.

    Cheaper than ``weight.repeat(groups, 1, 1)`` for the small banks it serves (about
    4 µs against 8 µs a call here, where a whole step can take under a millisecond).
    """
    return weight.expand(groups, *weight.shape).reshape(groups * weight.shape[0],
                                                        *weight.shape[1:])


def _chunks(n: int, bytes_per_sample: int) -> list[tuple[int, int]]:
    """Ranges of samples whose windows take about :data:`UNFOLD_CHUNK_BYTES` together.

    One range (no loop) under ``torch.compile`` and functorch transforms: the forward
    writes its chunks with ``out=`` into slices of one output, which those do not
    support, and the compiler would unroll the loop into its graph.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return [(0, n)]
    step = max(1, UNFOLD_CHUNK_BYTES // max(1, bytes_per_sample))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _padded_samples(x: Tensor, groups: int, padding: int) -> Tensor:
    """``x`` ``(B, G * D, L)`` as ``(B * G, D, L + 2 * padding)``, zero-padded."""
    batch, channels, length = x.shape
    folded = x.reshape(batch * groups, channels // groups, length)
    return F.pad(folded, (padding, padding)) if padding else folded


def _windows(samples: Tensor, k: int, stride: int, dilation: int) -> Tensor:
    """The unfolded windows of ``samples`` ``(n, D, L)``: ``(n, D * k, L_out)``, a copy.

    Row ``c * k + j`` of sample ``n`` holds tap ``j`` of channel ``c`` at every output
    position, the order of the bank's ``(F, D, k)`` weights flattened to ``(F, D * k)``.
    """
    windows = samples.unfold(2, dilation * (k - 1) + 1, stride)  # (n, D, L_out, span)
    if dilation > 1:
        windows = windows[..., ::dilation]
    n, d = samples.shape[:2]
    return windows.transpose(2, 3).contiguous().view(n, d * k, -1)


def _unfolded_forward(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                      stride: int, padding: int, dilation: int) -> Tensor:
    """``bank (F, D*k) @ windows (D*k, L_out)`` for every sample, chunk by chunk."""
    f_out, d, k = weight.shape
    samples = _padded_samples(x, groups, padding)
    n, span = samples.shape[0], dilation * (k - 1) + 1
    out_len = (samples.shape[2] - span) // stride + 1
    bank = weight.reshape(1, f_out, d * k)
    bias_col = None if bias is None else bias.view(1, f_out, 1)

    def product(part: Tensor, out: Tensor | None = None) -> Tensor:
        windows = _windows(part, k, stride, dilation)
        banks = bank.expand(part.shape[0], f_out, d * k)
        if bias_col is None:
            return torch.bmm(banks, windows, out=out)
        return torch.baddbmm(bias_col, banks, windows, out=out)

    chunks = _chunks(n, d * k * out_len * x.element_size())
    if len(chunks) == 1:
        out = product(samples)
    else:  # each chunk's windows stay in cache between their copy and their product
        out = samples.new_empty(n, f_out, out_len)
        for i, j in chunks:
            product(samples[i:j], out[i:j])
    return out.view(x.shape[0], groups * f_out, out_len)


def _unfolded_backward(grad: Tensor, x: Tensor, weight: Tensor, groups: int, stride: int,
                       padding: int, dilation: int, need: tuple[bool, bool, bool]
                       ) -> list[Tensor | None]:
    """Input, weight and bias gradients of :func:`_unfolded_forward`, those ``need``-ed.

    The weight gradient is ``grad @ windows^T`` summed over the samples (the windows made
    again, chunk by chunk). The input gradient is ``bank^T @ grad``, the gradient of every
    window, whose ``k`` taps are added back at their offsets: ``k`` strided additions
    (``F.fold`` does the same in one call but was several times slower here).
    """
    f_out, d, k = weight.shape
    batch, _, length = x.shape
    n = batch * groups
    per_sample = grad.reshape(n, f_out, -1)
    out_len = per_sample.shape[2]
    need_x, need_w, need_b = need
    chunks = _chunks(n, d * k * out_len * x.element_size())
    gx = gw = gb = None
    if need_x:
        bank_t = weight.reshape(1, f_out, d * k).transpose(1, 2)
        gx = per_sample.new_zeros(n, d, length + 2 * padding)
        for i, j in chunks:
            per_tap = torch.bmm(bank_t.expand(j - i, d * k, f_out), per_sample[i:j])
            per_tap = per_tap.view(j - i, d, k, out_len)
            for tap in range(k):
                start = tap * dilation
                gx[i:j, :, start:start + stride * (out_len - 1) + 1:stride] += per_tap[:, :, tap]
        gx = gx[:, :, padding:padding + length].reshape(x.shape)
    if need_w:
        samples = _padded_samples(x, groups, padding)
        for i, j in chunks:
            windows = _windows(samples[i:j], k, stride, dilation)
            part = torch.bmm(per_sample[i:j], windows.transpose(1, 2)).sum(0)
            gw = part if gw is None else gw + part
        gw = gw.view(weight.shape)
    if need_b:
        gb = per_sample.sum((0, 2))
    return [gx, gw, gb]


class _Conv1dSharedCPU(torch.autograd.Function):
    """The shared 1-d convolution of ``x`` ``(B, G * D, L)``, part by part.

    ``options = (groups, stride, padding, dilation, route)`` with ``route`` from
    :func:`_cpu_route`: the forward, the input gradient and the weight (and bias)
    gradient each run on the folded view (one bank, a batch of ``B * G``), as PyTorch's
    grouped convolution on ``groups`` copies of the bank, or as batched matrix products
    over the unfolded windows. Copies and windows are made where they are used and
    dropped there: autograd keeps the input and the one bank, as for the folded
    convolution.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, bias: Tensor | None, options: tuple
    ) -> Tensor:
        groups, stride, padding, dilation, (how, _, _) = options
        batch = x.shape[0]
        f_out, d = weight.shape[:2]
        if how == UNFOLD:
            return _unfolded_forward(x, weight, bias, groups, stride, padding, dilation)
        if how == GROUPED:
            bias_copies = None if bias is None else bias.expand(groups, -1).reshape(-1)
            return _CONV[1](x, _repeat_bank(weight, groups), bias_copies, stride, padding,
                            dilation, groups)
        folded = x.reshape(batch * groups, d, x.shape[2])
        out = _CONV[1](folded, weight, bias, stride, padding, dilation)
        return out.view(batch, groups * f_out, out.shape[2])

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, options = inputs
        ctx.save_for_backward(x, weight)
        ctx.options = options
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        groups, stride, padding, dilation, (_, how_x, how_w) = ctx.options
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        # the bias gradient goes with the weight gradient (the same kernel computes both)
        f_out, d = weight.shape[:2]
        conv = ([stride], [padding], [dilation], False, [0])
        grads: list[Tensor | None] = [None, None, None]  # input, weight, bias
        unfolded = (need_x and how_x == UNFOLD, need_w and how_w == UNFOLD,
                    need_b and how_w == UNFOLD)
        if any(unfolded):
            grads = _unfolded_backward(grad, x, weight, groups, stride, padding, dilation,
                                       unfolded)
        for how in (GROUPED, FOLD):
            mask = [need_x and how_x == how, need_w and how_w == how,
                    need_b and how_w == how]
            if not any(mask):
                continue
            if how == GROUPED:
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
    convolution computes its parts (forward, input gradient, weight gradient) another way
    where that was measured faster: with a small bank (:data:`UNFOLD_WEIGHTS`), as
    batched matrix products over the unfolded windows; with few channels or few filters
    per group, some parts as PyTorch's grouped convolution on temporary copies of the
    bank (:data:`GROUPED_FORWARD_WEIGHTS`, :data:`GROUPED_INPUT_GRAD`,
    :data:`GROUPED_WEIGHT_GRAD`). The result is the same, and autograd still keeps only
    the input and the one bank (the chapter "Performance" has the measurements). The
    dimension (1-d, 2-d or 3-d) is taken from ``weight``.

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

