"""The other ways to apply one filter bank to every channel group, for checking and measuring.

Every function here computes exactly what :func:`sharedconv.functional.shared_conv`
computes (the grouped convolution whose ``groups`` banks are one tensor), each in a way
people write or might write it. They share one signature::

    fn(x, weight, bias=None, *, groups, stride=1, padding=0, dilation=1) -> Tensor

with ``x`` of shape :math:`(B, G \\cdot D, *S)` (or unbatched :math:`(G \\cdot D, *S)`),
``weight`` of shape :math:`(F, D, *k)`, ``bias`` of shape :math:`(F,)` and an output of
shape :math:`(B, G \\cdot F, *S_{out})`, group-major (channel ``g * F + f`` is filter ``f``
on group ``g``). ``padding`` is ``'valid'``, ``'same'`` (stride 1), an int or a tuple, and
always pads with zeros. The inputs are validated with the package's own checks, so bad
input gets the same clear errors as :func:`sharedconv.functional.shared_conv`.

=================== ======= =====================================================
name                dims    how
=================== ======= =====================================================
``loop``            1, 2, 3 one convolution per group, then ``torch.cat``
``lift``            1       ``Conv2d`` with a ``(1, k)`` kernel, groups as the height
``grouped_expand``  1, 2, 3 grouped convolution, bank ``expand``-ed to ``G`` banks
``grouped_repeat``  1, 2, 3 grouped convolution, bank ``repeat``-ed to ``G`` banks
``vmap``            1, 2, 3 :func:`torch.vmap` over the groups, unbatched weight
``fold``            1, 2, 3 groups folded into the batch, one convolution
=================== ======= =====================================================

:data:`BASELINES` maps these names to the functions, for code that compares them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import (
    _as_tuple,
    _check_groups,
    _check_input,
    _check_weight,
    _explicit_padding,
    _IntOrTuple,
    _normalize_padding,
    _Padding,
    _uneven_same,
)

__all__ = [
    "BASELINES",
    "DIMS",
    "Baseline",
    "fold",
    "grouped_expand",
    "grouped_repeat",
    "lift",
    "loop",
    "vmap",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: The signature every baseline has.
Baseline = Callable[..., Tensor]

_Options = tuple[int, tuple[int, ...], str | tuple[int, ...], tuple[int, ...], bool]


def _prepare(
    who: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
) -> tuple[Tensor, _Options]:
    """Validate the arguments as :func:`sharedconv.functional.shared_conv` does.

    Returns the input (batched, and zero-padded already when ``'same'`` needs one more
    element on one side than the other, which ``F.convNd`` would warn about) and the
    normalised options ``(n, stride, padding, dilation, batched)``.
    """
    n = _check_weight(weight, bias)
    groups = _check_groups(groups)
    stride_t = _as_tuple(stride, n, "stride", minimum=1)
    dilation_t = _as_tuple(dilation, n, "dilation", minimum=1)
    padding_n = _normalize_padding(padding, n, stride_t)
    batched = _check_input(x, weight, groups, who)
    if not batched:
        x = x.unsqueeze(0)
    if padding_n == "same" and _uneven_same(weight, dilation_t):
        x = F.pad(x, _explicit_padding(padding_n, weight.shape[2:], dilation_t))
        padding_n = (0,) * n
    return x, (n, stride_t, padding_n, dilation_t, batched)


def _finish(out: Tensor, batched: bool) -> Tensor:
    return out if batched else out.squeeze(0)


def loop(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """One convolution per group of channels, concatenated: the first thing people write.

    Slices the ``D`` channels of group ``g`` (a view), convolves them with the shared bank,
    and concatenates the ``G`` results along the channels. Autograd sees the bank used
    ``G`` times and adds the ``G`` gradient contributions. ``G`` convolution calls in the
    forward pass and ``G`` in the backward pass, where each slice's gradient also becomes
    a zero-filled tensor the size of the whole input before the ``G`` of them are added
    (slicing with ``x.split(D, dim=1)`` instead would concatenate them once).

    Args:
        x: input of shape :math:`(B, G \\cdot D, *S)` or :math:`(G \\cdot D, *S)`.
        weight: the shared bank, :math:`(F, D, *k)` with 1 to 3 kernel dimensions.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or one int per spatial dimension.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a tuple of ints (zeros).
        dilation: dilation, an int or one int per spatial dimension.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, *S_{out})`, group-major.

    Raises:
        TypeError: non-tensor or non-floating input or weight, non-int options.
        ValueError: wrong input rank, channel count not ``groups * D``, bad bias shape,
            bad padding, ``'same'`` with a stride above 1.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> loop(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    x, (n, stride_t, padding_n, dilation_t, batched) = _prepare(
        "loop", x, weight, bias, groups, stride, padding, dilation
    )
    d = weight.shape[1]
    outs = [
        # narrow, not x[:, a:b]: torch 2.4 also records the full slice of dim 0, and its
        # backward would allocate a second input-sized zero tensor per group
        _CONV[n](x.narrow(1, g * d, d), weight, bias, stride_t, padding_n, dilation_t)
        for g in range(groups)
    ]
    return _finish(torch.cat(outs, dim=1), batched)


def lift(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """1-d only: lift to ``Conv2d`` with a ``(1, k)`` kernel, the groups as the image height.

    The input ``(B, G * D, L)`` is viewed as ``(B, G, D, L)`` and permuted to
    ``(B, D, G, L)``: a ``D``-channel image of height ``G``. A ``Conv2d`` with the bank
    viewed as ``(F, D, 1, k)`` never mixes rows, so row ``g`` of its output
    ``(B, F, G, L_out)`` is the bank applied to group ``g``. Permuting to
    ``(B, G, F, L_out)`` and flattening gives the group-major output; that flattening
    copies the whole output, and for ``D > 1`` the permuted input is copied as well
    (in the forward and again, transposed, in the backward).

    Args:
        x: input of shape :math:`(B, G \\cdot D, L)` or :math:`(G \\cdot D, L)`.
        weight: the shared bank, :math:`(F, D, k)`; 1-d only.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or a 1-tuple.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a 1-tuple (zeros).
        dilation: dilation, an int or a 1-tuple.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, L_{out})`, group-major.

    Raises:
        ValueError: a weight with more than one kernel dimension (a ``d``-dimensional
            lift needs a ``(d + 1)``-dimensional convolution), and the errors of
            :func:`loop`.
        TypeError: as :func:`loop`.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> lift(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    if _check_weight(weight, bias) != 1:
        raise ValueError(
            "lift is defined for 1-d convolutions only: it needs a weight of shape "
            f"(F, D, k), got a {weight.dim()}-D weight of shape {tuple(weight.shape)} "
            "(use loop, grouped_expand, grouped_repeat, vmap or fold for 2-d and 3-d)"
        )
    x, (_, stride_t, padding_n, dilation_t, batched) = _prepare(
        "lift", x, weight, bias, groups, stride, padding, dilation
    )
    batch, length = x.shape[0], x.shape[-1]
    f, d = weight.shape[0], weight.shape[1]
    image = x.view(batch, groups, d, length).permute(0, 2, 1, 3)  # (B, D, G, L)
    pad2d = padding_n if isinstance(padding_n, str) else (0, padding_n[0])
    out = F.conv2d(
        image,
        weight.unsqueeze(2),  # (F, D, 1, k)
        bias,
        (1, stride_t[0]),
        pad2d,
        (1, dilation_t[0]),
    )  # (B, F, G, L_out)
    out = out.permute(0, 2, 1, 3).reshape(batch, groups * f, out.shape[-1])
    return _finish(out, batched)


def _grouped(
    who: str,
    expand: bool,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
    stride: _IntOrTuple,
    padding: _Padding,
    dilation: _IntOrTuple,
) -> Tensor:
    x, (n, stride_t, padding_n, dilation_t, batched) = _prepare(
        who, x, weight, bias, groups, stride, padding, dilation
    )
    f = weight.shape[0]
    if expand:
        banks = weight.expand(groups, *weight.shape).reshape(groups * f, *weight.shape[1:])
        biases = None if bias is None else bias.expand(groups, f).reshape(groups * f)
    else:
        banks = weight.repeat(groups, *([1] * (n + 1)))
        biases = None if bias is None else bias.repeat(groups)
    out = _CONV[n](x, banks, biases, stride_t, padding_n, dilation_t, groups)
    return _finish(out, batched)


def grouped_expand(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """PyTorch's grouped convolution, the bank ``expand``-ed to ``G`` banks in the graph.

    ``weight.expand(G, F, D, *k)`` is a view, but the grouped convolution needs a
    ``(G * F, D, *k)`` weight and flattening the expanded dimension cannot be a view, so
    ``reshape`` copies: ``G`` copies of the bank exist during the call and autograd saves
    them for the backward. The gradient flows back through the copy and the ``expand``,
    which sums the ``G`` banks' gradients into the shared one. One convolution call.

    Args:
        x: input of shape :math:`(B, G \\cdot D, *S)` or :math:`(G \\cdot D, *S)`.
        weight: the shared bank, :math:`(F, D, *k)` with 1 to 3 kernel dimensions.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or one int per spatial dimension.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a tuple of ints (zeros).
        dilation: dilation, an int or one int per spatial dimension.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, *S_{out})`, group-major.

    Raises:
        TypeError: as :func:`loop`.
        ValueError: as :func:`loop`.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> grouped_expand(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    return _grouped("grouped_expand", True, x, weight, bias, groups, stride, padding, dilation)


def grouped_repeat(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """PyTorch's grouped convolution, the bank ``repeat``-ed to ``G`` banks in the graph.

    ``weight.repeat(G, 1, ...)`` materialises the ``(G * F, D, *k)`` weight of a grouped
    convolution; its backward sums the ``G`` banks' gradients into the shared one. The
    costs are those of :func:`grouped_expand`. One convolution call.

    Args:
        x: input of shape :math:`(B, G \\cdot D, *S)` or :math:`(G \\cdot D, *S)`.
        weight: the shared bank, :math:`(F, D, *k)` with 1 to 3 kernel dimensions.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or one int per spatial dimension.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a tuple of ints (zeros).
        dilation: dilation, an int or one int per spatial dimension.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, *S_{out})`, group-major.

    Raises:
        TypeError: as :func:`loop`.
        ValueError: as :func:`loop`.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> grouped_repeat(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    return _grouped("grouped_repeat", False, x, weight, bias, groups, stride, padding, dilation)


def vmap(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """:func:`torch.vmap` of an ordinary convolution over the groups, weight not batched.

    The input is viewed as ``(B, G, D, *S)`` and the convolution of one group,
    ``(B, D, *S) -> (B, F, *S_out)``, is vectorised over dimension 1. PyTorch's batching
    rule for a batched input and an unbatched weight folds the vmapped dimension into the
    convolution's batch, so this runs one convolution call; it moves the vmapped
    dimension to the front to do so, and moves it back afterwards, which copies the input
    and the output.

    Args:
        x: input of shape :math:`(B, G \\cdot D, *S)` or :math:`(G \\cdot D, *S)`.
        weight: the shared bank, :math:`(F, D, *k)` with 1 to 3 kernel dimensions.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or one int per spatial dimension.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a tuple of ints (zeros).
        dilation: dilation, an int or one int per spatial dimension.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, *S_{out})`, group-major.

    Raises:
        TypeError: as :func:`loop`.
        ValueError: as :func:`loop`.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> vmap(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    x, (n, stride_t, padding_n, dilation_t, batched) = _prepare(
        "vmap", x, weight, bias, groups, stride, padding, dilation
    )
    batch, f, d = x.shape[0], weight.shape[0], weight.shape[1]
    conv = _CONV[n]

    def one_group(xg: Tensor) -> Tensor:  # (B, D, *S) -> (B, F, *S_out)
        return conv(xg, weight, bias, stride_t, padding_n, dilation_t)

    per_group = torch.vmap(one_group, in_dims=1, out_dims=1)(
        x.view(batch, groups, d, *x.shape[2:])
    )  # (B, G, F, *S_out)
    out = per_group.reshape(batch, groups * f, *per_group.shape[3:])
    return _finish(out, batched)


def fold(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    groups: int,
    stride: _IntOrTuple = 1,
    padding: _Padding = 0,
    dilation: _IntOrTuple = 1,
) -> Tensor:
    """The layer's way: fold the groups into the batch with views, one convolution.

    ``(B, G * D, *S) -> (B * G, D, *S)`` is a view of a contiguous input, the bank runs
    once over the ``B * G`` samples, and ``(B * G, F, *S_out) -> (B, G * F, *S_out)`` is a
    view again. This is the computation of :func:`sharedconv.functional.shared_conv`
    (zero padding only), written out. One convolution call, no copies.

    Args:
        x: input of shape :math:`(B, G \\cdot D, *S)` or :math:`(G \\cdot D, *S)`.
        weight: the shared bank, :math:`(F, D, *k)` with 1 to 3 kernel dimensions.
        bias: optional shared bias of shape :math:`(F,)`.
        groups: :math:`G`, the number of channel groups.
        stride: stride, an int or one int per spatial dimension.
        padding: ``'valid'``, ``'same'`` (stride 1), an int or a tuple of ints (zeros).
        dilation: dilation, an int or one int per spatial dimension.

    Returns:
        Tensor of shape :math:`(B, G \\cdot F, *S_{out})`, group-major.

    Raises:
        TypeError: as :func:`loop`.
        ValueError: as :func:`loop`.

    Example::

        >>> x, w = torch.randn(2, 3, 10), torch.randn(4, 1, 3)
        >>> fold(x, w, groups=3).shape
        torch.Size([2, 12, 8])
    """
    x, (n, stride_t, padding_n, dilation_t, batched) = _prepare(
        "fold", x, weight, bias, groups, stride, padding, dilation
    )
    batch, f, d = x.shape[0], weight.shape[0], weight.shape[1]
    folded = x.reshape(batch * groups, d, *x.shape[2:])
    out = _CONV[n](folded, weight, bias, stride_t, padding_n, dilation_t)
    return _finish(out.reshape(batch, groups * f, *out.shape[2:]), batched)


#: Every baseline by name, in the order the book builds them up.
BASELINES: dict[str, Baseline] = {
    "loop": loop,
    "lift": lift,
    "grouped_expand": grouped_expand,
    "grouped_repeat": grouped_repeat,
    "vmap": vmap,
    "fold": fold,
}

#: Spatial dimensions each baseline supports.
DIMS: dict[str, tuple[int, ...]] = {
    "loop": (1, 2, 3),
    "lift": (1,),
    "grouped_expand": (1, 2, 3),
    "grouped_repeat": (1, 2, 3),
    "vmap": (1, 2, 3),
    "fold": (1, 2, 3),
}
