r"""Masked shared convolution: one filter bank over ``T`` masked copies of one sequence.

The second forum thread's model masks a text embedding ``x`` of shape ``(B, D, L)`` once per
label, ``z_t = x * m_t`` with a mask ``m`` of shape ``(B, T, L)`` (one number per label and
position, the same for all ``D`` embedding channels), and runs the same convolution
``(F, D, k)`` over each of the ``T`` masked copies. Done literally, that materialises
``B * T * D * L`` numbers before the convolution even starts.

Because the mask is one scalar per position, it comes out of the sum over channels:

.. math::

    y_{b,t,f,l} = \beta_f + \sum_{j<k} m_{b,t,q} \sum_{d<D} w_{f,d,j}\, x_{b,d,q},
    \qquad q = l s + j r - \text{padding},

with stride :math:`s` and dilation :math:`r`, so it is enough to apply each kernel tap to
``x`` once (``F * k`` channels, :math:`h_{b,f,j,q} = \sum_d w_{f,d,j} x_{b,d,q}`, the tap
responses), and to combine those responses with the shifted masks: for every batch element
and output position, a ``(T, k) @ (k, F)`` matrix
product. That is about ``D`` times fewer FLOPs, and nothing of size ``B * T * D * L`` is
ever allocated. The backward pass recomputes the tap responses and mask windows from the
inputs instead of saving them, so autograd keeps only ``x``, the mask and the weight.

:class:`MaskedSharedConv1d` is the layer that holds the bank and its bias. The operation
composes with :mod:`torch.func`: ``vmap`` (over any of the inputs), ``grad``, ``jvp`` and
their compositions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    _as_tuple,
    _check_channels,
    _check_weight,
    _explicit_padding,
    _IntOrTuple,
    _normalize_padding,
    _Padding,
    _reset_like_conv,
)

__all__ = ["MaskedSharedConv1d", "masked_shared_conv1d", "naive_masked_shared_conv1d"]


def _check_masked_args(
    x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """Validate shapes and dtypes; return the mask in ``x``'s dtype."""
    if not isinstance(x, Tensor) or not isinstance(mask, Tensor):
        raise TypeError(
            f"x and mask must be tensors, got {type(x).__name__} and {type(mask).__name__}"
        )
    if _check_weight(weight, bias) != 1:
        raise ValueError(
            f"weight must have shape (F, D, k) for a 1-d convolution, got {tuple(weight.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must have one dtype, got {x.dtype} and {weight.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, D, L), got a {x.dim()}-D tensor {tuple(x.shape)}")
    if mask.dim() != 3:
        raise ValueError(
            f"mask must have shape (B, T, L), got a {mask.dim()}-D tensor {tuple(mask.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects D={weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if mask.shape[0] != x.shape[0] or mask.shape[2] != x.shape[2]:
        raise ValueError(
            f"mask must have shape (B, T, L) = ({x.shape[0]}, T, {x.shape[2]}) to match x "
            f"{tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask.to(x.dtype)
    if not mask.is_floating_point():
        raise TypeError(f"mask must be floating point or bool, got {mask.dtype}")
    if mask.dtype != x.dtype:
        raise TypeError(f"mask and x must have one dtype, got {mask.dtype} and {x.dtype}")
    return mask


def _resolve_options(
    weight: Tensor, stride: int, padding: int | str, dilation: int
) -> tuple[int, int, int, int]:
    """``(stride, dilation, left_pad, right_pad)`` from the 1-d options."""
    (s,) = _as_tuple(stride, 1, "stride", minimum=1)
    (d,) = _as_tuple(dilation, 1, "dilation", minimum=1)
    pad = _normalize_padding(padding, 1, (s,))
    left, right = _explicit_padding(pad, weight.shape[2:], (d,))
    return s, d, left, right


def _unwindow(g: Tensor, length: int, s: int, d: int, keep_taps: bool = False) -> Tensor:
    """The adjoint of taking windows: put ``g[..., j, l]`` back at position ``j * d + l * s``.

    With ``keep_taps=False`` the taps land in one row and add up, ``(..., length)``; with
    ``keep_taps=True`` each tap keeps its own row, ``(..., k, length)``.
    """
    k, l_out = g.shape[-2], g.shape[-1]
    span = s * (l_out - 1) + 1
    if keep_taps:
        out = g.new_zeros(*g.shape[:-1], length)
        for j in range(k):
            out[..., j, j * d : j * d + span : s] = g[..., j, :]
        return out
    out = g.new_zeros(*g.shape[:-2], length)
    for j in range(k):
        out[..., j * d : j * d + span : s] += g[..., j, :]
    return out


def _forward_parts(x_pad: Tensor, m_pad: Tensor, weight: Tensor, s: int, d: int, l_out: int):
    """Tap responses ``U (B, L_out, k, F)`` and mask windows ``M (B, L_out, T, k)``."""
    f_out, dim, k = weight.shape
    # u[b, (f, j), p] = sum_d w[f, d, j] x[b, d, p]: one matrix product over channels
    w_taps = _unrecorded(weight).permute(0, 2, 1).reshape(f_out * k, dim)
    u = torch.matmul(w_taps, x_pad)
    u = u.view(u.shape[0], f_out, k, u.shape[2])  # (B, F, k, L_pad)
    span = s * (l_out - 1) + 1
    # U[b, l, j, f] = u[b, f, j, j*d + l*s]: k strided slices of a small tensor
    taps = torch.stack([u[:, :, j, j * d : j * d + span : s] for j in range(k)], dim=2)
    U = taps.permute(0, 3, 2, 1)  # (B, L_out, k, F)
    # M[b, l, t, j] = m[b, t, l*s + j*d]: a strided view of the mask's windows, no copy
    M = m_pad.unfold(2, d * (k - 1) + 1, s)[..., ::d].permute(0, 2, 1, 3)
    return U, M


def _unrecorded(t: Tensor) -> Tensor:
    """``t`` detached where autograd records nothing (a forward or backward without
    ``create_graph``): ``torch.matmul`` of a matrix by a batch is one product, but not
    when the matrix requires a gradient (it is expanded to a batch then, several times
    slower)."""
    return t if torch.is_grad_enabled() else t.detach()


def _pad(t: Tensor, left: int, right: int) -> Tensor:
    return F.pad(t, (left, right)) if left or right else t


def _out_length(length: int, k: int, s: int, d: int) -> int:
    return (length - d * (k - 1) - 1) // s + 1


def _masked_forward(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    s: int,
    d: int,
    left: int,
    right: int,
) -> Tensor:
    """The output as ``(B, L_out, T, F)``: trilinear in ``(x, mask, weight)``, plus ``bias``."""
    x_pad, m_pad = _pad(x, left, right), _pad(mask, left, right)
    l_out = _out_length(x_pad.shape[2], weight.shape[2], s, d)
    if l_out < 1:
        raise ValueError(
            f"the padded input of length {x_pad.shape[2]} is shorter than the dilated "
            f"kernel ({d * (weight.shape[2] - 1) + 1})"
        )
    U, M = _forward_parts(x_pad, m_pad, weight, s, d, l_out)
    # (B, L_out, T, F): position-major, so that each output position is one product
    y = torch.matmul(M, U)
    if bias is not None:
        try:  # in place: the output is the largest tensor, so no second one
            y.add_(bias)
        except RuntimeError:  # vmap refuses it when the bias is batched and y is not
            y = y + bias
    return y


def _as_output(y: Tensor) -> Tensor:
    """``(B, L_out, T, F)`` to ``(B, T * F, L_out)`` as a view: channels have stride 1."""
    batch, l_out, labels, f_out = y.shape
    return y.permute(0, 2, 3, 1).reshape(batch, labels * f_out, l_out)


class _MaskedSharedConv1d(torch.autograd.Function):
    """Forward and backward of the masked shared convolution, saving only the inputs.

    Written in the ``setup_context`` style, with every part made of PyTorch operations
    that have batching rules, so that ``torch.func.vmap`` (``generate_vmap_rule``) and
    ``torch.func.grad`` apply to it, and ``torch.compile`` traces it in one graph. Forward
    mode is :class:`_MaskedSharedConv1dJvp`, which adds the tangent.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mask, weight, bias, s, d, left, right):  # type: ignore[override]
        return _as_output(_masked_forward(x, mask, weight, bias, s, d, left, right))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, mask, weight, bias, s, d, left, right = inputs
        # the same three tensors serve the backward and the forward-mode tangent
        ctx.save_for_backward(x, mask, weight)
        ctx.save_for_forward(x, mask, weight)
        l_out = _out_length(x.shape[2] + left + right, weight.shape[2], s, d)
        ctx.options = (s, d, left, right, l_out, bias is not None)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mask, weight = ctx.saved_tensors
        s, d, left, right, l_out, has_bias = ctx.options
        f_out, dim, k = weight.shape
        batch, labels = mask.shape[0], mask.shape[1]
        x_pad, m_pad = _pad(x, left, right), _pad(mask, left, right)
        U, M = _forward_parts(x_pad, m_pad, weight, s, d, l_out)
        g4 = grad_out.reshape(batch, labels, f_out, l_out)
        g = g4.permute(0, 3, 1, 2)  # (B, L_out, T, F)
        grad_x = grad_mask = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            g_M = torch.matmul(g, U.transpose(-1, -2))  # (B, L_out, T, k)
            grad_m_pad = _unwindow(g_M.permute(0, 2, 3, 1), m_pad.shape[2], s, d)
            grad_mask = grad_m_pad[:, :, left : left + mask.shape[2]]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            g_U = torch.matmul(M.transpose(-1, -2), g)  # (B, L_out, k, F)
            # back to every padded position: g_u[b, f, j, p], zero where no output reads p
            g_u = _unwindow(g_U.permute(0, 3, 2, 1), x_pad.shape[2], s, d, keep_taps=True)
            g_u = g_u.reshape(batch, f_out * k, x_pad.shape[2])  # (B, F*k, L_pad)
            w_taps = _unrecorded(weight).permute(0, 2, 1).reshape(f_out * k, dim)
            if ctx.needs_input_grad[0]:
                grad_x_pad = torch.matmul(w_taps.t(), g_u)  # (B, D, L_pad)
                grad_x = grad_x_pad[:, :, left : left + x.shape[2]]
            if ctx.needs_input_grad[2]:
                g_w = torch.matmul(g_u, x_pad.transpose(1, 2)).sum(0)  # (F*k, D)
                grad_w = g_w.view(f_out, k, dim).permute(0, 2, 1)
        if has_bias and ctx.needs_input_grad[3]:
            grad_b = g4.sum((0, 1, 3))
        return grad_x, grad_mask, grad_w, grad_b, None, None, None, None


class _MaskedSharedConv1dJvp(_MaskedSharedConv1d):
    """:class:`_MaskedSharedConv1d` with forward-mode AD (``torch.func.jvp``, ``jacfwd``).

    A class of its own because Dynamo does not trace an ``autograd.Function`` that defines
    ``jvp``: eager calls use this one, compiled code the parent.
    """

    @staticmethod
    def jvp(ctx, dx, dmask, dweight, dbias, *_):  # type: ignore[override]
        """Forward-mode tangent: the output is linear in each of ``x``, ``mask``, ``weight``.

        So its tangent is the sum of the forward with one input replaced by its tangent,
        for each input that has one, plus the bias tangent.
        """
        x, mask, weight = ctx.saved_tensors
        s, d, left, right, l_out, _ = ctx.options
        terms = []
        if dx is not None:
            terms.append(_masked_forward(dx, mask, weight, None, s, d, left, right))
        if dmask is not None:
            terms.append(_masked_forward(x, dmask, weight, None, s, d, left, right))
        if dweight is not None:
            terms.append(_masked_forward(x, mask, dweight, None, s, d, left, right))
        if terms:
            y = terms[0]
            for term in terms[1:]:
                y = y + term
        else:
            y = x.new_zeros(x.shape[0], l_out, mask.shape[1], weight.shape[0])
        if dbias is not None:
            y = y + dbias
        return _as_output(y)


def masked_shared_conv1d(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
) -> Tensor:
    r"""One shared 1-d convolution over ``T`` masked copies of ``x``, without making them.

    Returns what :func:`~sharedconv.masked.naive_masked_shared_conv1d` returns: the
    convolution with the shared bank ``weight`` of each ``x * mask[:, t]`` for ``t < T``,
    computed from the tap responses of ``x`` and the shifted masks (see the module
    documentation), in about
    ``D`` times fewer FLOPs and with no tensor of size ``B * T * D * L``. Zero padding.
    Differentiable in ``x``, ``mask``, ``weight`` and ``bias`` (saving only the first three),
    to any order; works under ``torch.func.vmap``, ``grad``, ``jvp`` (forward-mode AD, in
    eager mode: not inside ``torch.compile``, which traces it in one graph) and their
    compositions. :class:`MaskedSharedConv1d` is the layer.

    Args:
        x: ``(B, D, L)``, for example a text embedding with channels first.
        mask: ``(B, T, L)``, one number per label and position (float, or bool).
        weight: the shared bank, ``(F, D, k)``.
        bias: optional ``(F,)``.
        stride, dilation: as in :func:`torch.nn.functional.conv1d` (ints).
        padding: an int, ``'valid'`` or ``'same'`` (stride 1).

    Returns:
        ``(B, T * F, L_out)``, label-major: channel ``t * F + f`` is filter ``f`` on label
        ``t``'s masked input, exactly the layout of
        ``SharedConv1d(T * D, T * F, k, groups=T)`` on the masked tensor.

    Raises:
        TypeError: non-tensor or non-floating inputs, dtypes that differ.
        ValueError: shapes that do not fit together, bad options.

    Example::

        >>> x = torch.randn(2, 64, 100)             # (B, D, L)
        >>> mask = torch.rand(2, 500, 100) < 0.1    # (B, T, L)
        >>> w = torch.randn(32, 64, 5)               # (F, D, k)
        >>> masked_shared_conv1d(x, mask, w, padding=2).shape
        torch.Size([2, 16000, 100])
    """
    mask = _check_masked_args(x, mask, weight, bias)
    s, d, left, right = _resolve_options(weight, stride, padding, dilation)
    # torch.compile cannot trace a custom jvp (forward AD is then unavailable, as for any
    # autograd.Function without one); eager calls get the class that has it
    fn = _MaskedSharedConv1d if torch.compiler.is_compiling() else _MaskedSharedConv1dJvp
    return fn.apply(x, mask, weight, bias, s, d, left, right)


# torch.fx.symbolic_trace records a call of masked_shared_conv1d (the layer's forward) as
# one node instead of tracing into checks that read sizes a Proxy does not have.
torch.fx.wrap("masked_shared_conv1d")


def naive_masked_shared_conv1d(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
) -> Tensor:
    """The literal computation that :func:`~sharedconv.masked.masked_shared_conv1d` replaces.

    Builds the masked tensor ``(B, T, D, L)``, lays it out as ``(B, T * D, L)`` and runs the
    shared convolution with ``groups=T``. Same arguments, same result.
    """
    mask = _check_masked_args(x, mask, weight, bias)
    from .functional import shared_conv

    batch, dim, length = x.shape
    labels = mask.shape[1]
    if labels == 0:  # no labels: (B, 0, L_out), still a function of x and the bank
        return shared_conv(x, weight, bias, stride=stride, padding=padding,
                           dilation=dilation)[:, :0]
    masked = x[:, None, :, :] * mask[:, :, None, :]  # (B, T, D, L)
    return shared_conv(
        masked.reshape(batch, labels * dim, length),
        weight,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=labels,
    )


class MaskedSharedConv1d(nn.Module):
    r"""One bank of ``F`` filters over ``T`` masked copies of a sequence, without the copies.

    The layer form of :func:`masked_shared_conv1d`: for ``x`` of shape ``(B, D, L)`` and a
    mask ``(B, T, L)``, it returns the convolution of every ``x * mask[:, t]`` with the same
    ``(F, D, k)`` bank, ``T * F`` channels label-major, what
    ``SharedConv1d(T * D, T * F, k, groups=T)`` gives on the masked tensor
    ``(B, T * D, L)``, but without ever making that tensor. ``T`` is read from each mask,
    so one layer serves any number of labels.

    Args:
        in_channels (int): :math:`D`, the channels of ``x``.
        out_channels (int): :math:`F`, the filters of the shared bank (output channels per
            label).
        kernel_size (int): :math:`k`, the length of each filter.
        stride (int, optional): stride of the convolution. Default: 1.
        padding (int or str, optional): zero padding on both sides, or ``'valid'`` (none)
            or ``'same'`` (output as long as the input, stride 1 only). Default: 0.
        dilation (int, optional): spacing between kernel elements. Default: 1.
        bias (bool, optional): if ``True``, adds a learnable bias of shape :math:`(F,)`,
            shared by the labels. Default: ``True``.
        device (torch.device, optional): where to create the parameters.
        dtype (torch.dtype, optional): the floating-point type of the parameters (real:
            a complex dtype is refused).

    Attributes:
        weight (Tensor): the shared bank, :math:`(F, D, k)`, initialised from
            :math:`U(-\sqrt{c}, \sqrt{c})` with :math:`c = 1 / (D k)`, as
            ``nn.Conv1d(D, F, k)``.
        bias (Tensor): the shared bias, :math:`(F,)`, initialised likewise.

    Shape:
        - ``x``: :math:`(B, D, L)`; ``mask``: :math:`(B, T, L)`, in ``x``'s dtype or bool.
        - Output: :math:`(B, T \cdot F, L_{out})`, channel ``t * F + f`` being filter ``f``
          on label ``t``, with

          .. math::
              L_{out} = \left\lfloor \frac{L + 2 \cdot \text{padding}
                  - \text{dilation} \cdot (k - 1) - 1}{\text{stride}} + 1 \right\rfloor

    Example::

        >>> layer = MaskedSharedConv1d(64, 32, 5, padding=2)
        >>> x = torch.randn(2, 64, 100)               # (B, D, L)
        >>> mask = torch.rand(2, 500, 100) < 0.1      # (B, T, L)
        >>> layer(x, mask).shape                      # (B, T * F, L)
        torch.Size([2, 16000, 100])
        >>> layer(x, mask).unflatten(1, (500, 32)).shape
        torch.Size([2, 500, 32, 100])
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrTuple,
        stride: _IntOrTuple = 1,
        padding: _Padding = 0,
        dilation: _IntOrTuple = 1,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if dtype is not None and dtype.is_complex:
            # the masked path's own backward and forward-mode rules are written for real
            # tensors; nn.Conv1d takes complex dtypes, this layer (no nn.ConvNd) does not
            raise TypeError(f"{name} takes real floating-point dtypes, got {dtype}")
        in_channels, out_channels, _ = _check_channels(in_channels, out_channels, 1, name)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_tuple(kernel_size, 1, "kernel_size", minimum=1)
        self.stride = _as_tuple(stride, 1, "stride", minimum=1)
        self.padding = _normalize_padding(padding, 1, self.stride)
        self.dilation = _as_tuple(dilation, 1, "dilation", minimum=1)
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Initialise as ``nn.Conv1d(in_channels, out_channels, kernel_size)`` does.

        The fan-in is ``in_channels * kernel_size``: weights and biases are drawn from
        :math:`U(-1/\sqrt{\mathrm{fan\_in}}, 1/\sqrt{\mathrm{fan\_in}})`.
        """
        _reset_like_conv(self.weight, self.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """The shared convolution of each ``x * mask[:, t]``: ``(B, T * F, L_out)``.

        Args:
            x: ``(B, D, L)``, in the parameters' dtype.
            mask: ``(B, T, L)``, in that dtype too, or bool.
        """
        padding = self.padding if isinstance(self.padding, str) else self.padding[0]
        return masked_shared_conv1d(x, mask, self.weight, self.bias, stride=self.stride[0],
                                    padding=padding, dilation=self.dilation[0])

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        if self.padding != (0,):
            s += f", padding={self.padding}"
        if self.dilation != (1,):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s
