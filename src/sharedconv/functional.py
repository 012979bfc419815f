"""Functional form of the shared convolution: fold the groups into the batch.

A grouped convolution with ``groups=G`` splits the ``G * D`` input channels into ``G``
groups of ``D`` channels and applies bank ``g`` of ``F`` filters to group ``g``. When all
``G`` banks are *one* tensor of shape ``(F, D, *kernel_size)``, the groups need not be
told apart at all: a view turns ``(B, G * D, *S)`` into ``(B * G, D, *S)``, one ordinary
convolution with the shared bank runs over that batch of ``B * G`` samples, and a second
view turns ``(B * G, F, *S_out)`` back into ``(B, G * F, *S_out)``. The result is exactly the
grouped convolution with ``G`` tied banks, with one convolution call and no loop.

That is all :func:`shared_conv` and the layers do, on every device and in every dtype:
check the arguments, pad where ``nn.ConvNd`` would pad, fold, convolve once, unfold. There
is no custom autograd function on this path and no constant tuned to a machine, so
``torch.export``, ``torch.fx``, ``torch.compile``, ``torch.func`` (``vmap``, ``jvp``,
``jacfwd``) and forward-mode AD see an ordinary convolution. Inside
``with sharedconv.autotune():`` (opt-in, like ``torch.backends.cudnn.benchmark``) an
eager call may instead run a strategy that was timed faster on this machine for its exact
shape; see :mod:`sharedconv.tuning`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tuning

__all__ = ["shared_conv", "PADDING_MODES"]

#: The padding modes accepted by the layers, as in :class:`torch.nn.Conv2d`.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_IntOrTuple = int | Sequence[int]
_Padding = str | int | Sequence[int]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _as_int(value: object, what: str) -> int:
    """``value`` as a Python int: ints and integer scalars such as ``numpy.int64``, not bools."""
    if type(value) is int:  # the common case, first (a bool's type is bool, not int)
        return value
    if isinstance(value, bool):
        raise TypeError(f"{what}, got a bool ({value})")
    # numpy's bools (numpy.bool_, named "bool" from numpy 2 on) are no ints either; before
    # numpy 2.3 they still have a deprecated __index__, so they are refused by name
    # (after the int test: torch.compile traces a plain int through this, not a type's name)
    if type(value) is not int and type(value).__name__ in ("bool", "bool_"):
        raise TypeError(f"{what}, got a bool ({value})")
    try:
        return operator.index(value)  # type: ignore[arg-type]  # any __index__ will do
    except TypeError:
        raise TypeError(f"{what}, got {type(value).__name__} ({value!r})") from None


def _as_tuple(value: _IntOrTuple, n: int, name: str, minimum: int) -> tuple[int, ...]:
    """``value`` as a tuple of ``n`` ints, each at least ``minimum``; clear errors otherwise."""
    # the common cases, first and cheap: every call of shared_conv checks three options
    if type(value) is int:
        if value >= minimum:
            return (value,) * n
    elif type(value) is tuple and len(value) == n and all(
            type(item) is int and item >= minimum for item in value):
        return value
    what = f"{name} must be an int or a tuple of {n} ints"
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != n:
            raise ValueError(
                f"{name} must have {n} value{'s' if n > 1 else ''} for a {n}-d convolution, "
                f"got {len(items)}: {value!r}"
            )
        ints = tuple(_as_int(item, f"{name} must contain ints (got {value!r})") for item in items)
    elif isinstance(value, str):
        raise TypeError(f"{what}, got str ({value!r})")
    else:
        ints = (_as_int(value, what),) * n
    if any(item < minimum for item in ints):
        raise ValueError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return ints


def _check_groups(groups: int) -> int:
    groups = _as_int(groups, "groups must be a positive int")
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups}")
    return groups


def _check_channels(in_channels: int, out_channels: int, groups: int, who: str
                    ) -> tuple[int, int, int]:
    """A layer's channel counts and groups, validated: positive ints, groups dividing both."""
    in_channels = _as_int(in_channels, f"{who}: in_channels must be an int")
    out_channels = _as_int(out_channels, f"{who}: out_channels must be an int")
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value < 1:
            raise ValueError(f"{who}: {arg} must be positive, got {value}")
    groups = _check_groups(groups)
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value % groups:
            raise ValueError(
                f"{who}: {arg} must be divisible by groups, got {arg}={value} and "
                f"groups={groups}"
            )
    return in_channels, out_channels, groups


def _reset_like_conv(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.ConvNd``'s initialisation: weight and bias from U(-1/sqrt(fan_in), ...).

    The fan-in is read from ``weight`` as PyTorch reads it (``size(1) * prod(kernel)``),
    which for a shared bank is the fan-in of the layer it replaces.
    """
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(weight)
        if fan_in:
            bound = 1 / math.sqrt(fan_in)
            torch.nn.init.uniform_(bias, -bound, bound)


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
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"weight must be floating point (or complex), got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one value per filter of the "
                f"shared bank, got shape {tuple(bias.shape)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got "
                            f"{bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias must be on the weight's device {weight.device}, got "
                             f"{bias.device}")
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
    if isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{who} expected a floating-point input (or a complex one), got "
                        f"dtype {x.dtype}")
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


def _groups_in(x: Tensor, in_per_group: int, n: int, who: str) -> int:
    """The number of groups an input holds, for a layer that reads it from the input."""
    batched = _check_rank(x, n, who)
    channels = x.shape[1 if batched else 0]
    if channels == 0 or channels % in_per_group:
        raise ValueError(
            f"{who} (groups read from the input) expected a positive multiple of "
            f"{in_per_group} input channels (in_per_group), got {channels} in an "
            f"input of shape {tuple(x.shape)}"
        )
    return channels // in_per_group


def _output_format(x: Tensor, weight: Tensor, groups: int, stride: Sequence[int],
                   padding: str | Sequence[int], dilation: Sequence[int],
                   output_padding: Sequence[int] | None = None,
                   ) -> torch.memory_format | None:
    """The memory format ``nn.ConvNd`` (``nn.ConvTransposeNd``) gives its output where it
    is not the contiguous one; ``None`` where it is. ``output_padding`` (a sequence) says
    the convolution is transposed; ``weight`` is the shared bank in the layer's layout.

    Only an operand stored ``channels_last`` (``channels_last_3d``) can change it, and then
    which kernel PyTorch picks decides (oneDNN and the 2-d CPU kernels keep
    ``channels_last``, the 3-d CPU kernel for float64 does not, cuDNN keeps it except for
    float64, ...). So the choice is left to PyTorch's own selector, asked about the grouped
    convolution that the layer stands for; the ``groups`` copies of the bank are described
    by a ``meta`` tensor, which holds no memory.
    """
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is None:
        return None
    if not any(t.dim() == x.dim() and not t.is_contiguous() and t.is_contiguous(
            memory_format=fmt) for t in (x, weight)):
        return None
    n = x.dim() - 2
    if torch.compiler.is_compiling():  # the selector is no graph op: keep it eager-only
        return fmt
    bank = torch.empty((groups * weight.shape[0], *weight.shape[1:]), dtype=weight.dtype,
                       device="meta")
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=fmt):
        bank = bank.contiguous(memory_format=fmt)
    pad = [0] * n if isinstance(padding, str) else list(padding)
    transposed = output_padding is not None
    backend = torch._C._select_conv_backend(
        x, bank, None, list(stride), pad, list(dilation), transposed,
        [0] * n if output_padding is None else list(output_padding), groups, None)
    chosen = torch._C._conv_determine_backend_memory_format(x, bank, backend)
    return fmt if chosen == fmt else None


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
    out_format = _output_format(x, weight, groups, stride, padding, dilation)
    batch = x.shape[0]
    # (B, G*D, *S) -> (B*G, D, *S): a view for contiguous inputs, a copy otherwise
    # (channels_last memory keeps the channels innermost, not next to the batch).
    folded = x.reshape(batch * groups, weight.shape[1], *x.shape[2:])
    if padding_mode != "zeros" or (padding == "same" and _uneven_same(weight, dilation)):
        # Pad explicitly: the non-zero modes always, and an uneven 'same' too (ATen would
        # make the same zero-padded copy, with a warning). Padding acts on the spatial
        # dimensions only, so it is the same after the fold as before it; padding the
        # folded tensor keeps its sizes plain products (torch.export with a dynamic length
        # needs that).
        pads = _explicit_padding(padding, weight.shape[2:], dilation)
        if any(pads):
            mode = "constant" if padding_mode == "zeros" else padding_mode
            folded = F.pad(folded, pads, mode=mode)
        padding = (0,) * n
    out = None
    if not torch.compiler.is_compiling() and tuning._STATE.enabled:
        if isinstance(padding, str):  # 'valid', or an even 'same': symmetric
            padding = _explicit_padding(padding, weight.shape[2:], dilation)[::2][::-1]
        # None where tuning does not apply (transforms, tracing, autocast, subclasses...)
        out = tuning._conv(folded, weight, bias, stride, padding, dilation, groups)
    if out is None:
        out = _CONV[n](folded, weight, bias, stride, padding, dilation)
    # (B*G, F, *S_out) -> (B, G*F, *S_out): a view of a contiguous output.
    out = out.reshape(batch, groups * weight.shape[0], *out.shape[2:])
    if out_format is not None:  # as nn.ConvNd returns for channels_last operands
        out = out.contiguous(memory_format=out_format)
    return out if batched else out.squeeze(0)


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
    groups=groups)``, computed without any copy of the bank: the groups are folded into
    the batch, ``(N, G D, *S) -> (N G, D, *S)``, a single ``F.convNd`` call applies the
    shared bank, and the output is viewed back. Autograd keeps what that convolution
    keeps, the input and the one bank, and the bank's gradient is the sum over the groups.
    The dimension (1-d, 2-d or 3-d) is taken from ``weight``. Inside
    :func:`~sharedconv.tuning.autotune`, an eager call may run another strategy that was
    measured faster for its shape on this machine (same result, same saved tensors).

    Args:
        input: Tensor of shape :math:`(N, G \cdot D, *S)` or, unbatched, :math:`(G \cdot D, *S)`.
        weight: the shared bank, of shape :math:`(F, D, *\mathrm{kernel\_size})`.
        bias: optional, of shape :math:`(F,)`, shared by the groups like ``weight``.
        stride: stride of the convolution, an int or a tuple with one value per dimension.
        padding: ``'valid'``, ``'same'`` (stride 1 only), an int or a tuple of ints.
        dilation: spacing between kernel elements, an int or a tuple.
        groups: :math:`G`, the number of channel groups that share the bank.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        Tensor of shape :math:`(N, G \cdot F, *S_{out})` (or :math:`(G \cdot F, *S_{out})`),
        group-major: channel ``g * F + f`` is filter ``f`` applied to group ``g``. For a
        ``channels_last`` input or bank the output is ``channels_last``, as ``nn.Conv2d``
        gives it (the fold copies such an input: its channels are not next to the batch).

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


# torch.fx.symbolic_trace records a call of shared_conv as one node instead of tracing into
# its checks, which read sizes that a Proxy does not have (as F.conv1d is one node).
torch.fx.wrap("shared_conv")
