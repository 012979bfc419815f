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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import _as_tuple, _check_weight, _explicit_padding, _normalize_padding

__all__ = ["masked_shared_conv1d", "naive_masked_shared_conv1d"]


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
    w_taps = weight.permute(0, 2, 1).reshape(f_out * k, dim)
    u = torch.matmul(w_taps, x_pad).unflatten(1, (f_out, k))  # (B, F, k, L_pad)
    span = s * (l_out - 1) + 1
    # U[b, l, j, f] = u[b, f, j, j*d + l*s]: k strided slices of a small tensor
    taps = torch.stack([u[:, :, j, j * d : j * d + span : s] for j in range(k)], dim=2)
    U = taps.permute(0, 3, 2, 1)  # (B, L_out, k, F)
    # M[b, l, t, j] = m[b, t, l*s + j*d]: a strided view of the mask's windows, no copy
    M = m_pad.unfold(2, d * (k - 1) + 1, s)[..., ::d].permute(0, 2, 1, 3)
    return U, M


class _MaskedSharedConv1d(torch.autograd.Function):
    """Forward and backward of the masked shared convolution, saving only the inputs."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, s, d, left, right):  # type: ignore[override]
        x_pad = F.pad(x, (left, right)) if left or right else x
        m_pad = F.pad(mask, (left, right)) if left or right else mask
        k = weight.shape[2]
        l_out = (x_pad.shape[2] - d * (k - 1) - 1) // s + 1
        if l_out < 1:
            raise ValueError(
                f"the padded input of length {x_pad.shape[2]} is shorter than the dilated "
                f"kernel ({d * (k - 1) + 1})"
            )
        U, M = _forward_parts(x_pad, m_pad, weight, s, d, l_out)
        # (B, L_out, T, F): position-major, so that each output position is one product
        y = torch.matmul(M, U)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, mask, weight)
        ctx.options = (s, d, left, right, l_out, bias is not None)
        # (B, T * F, L_out) as a view: channels have stride 1 (a channels-last layout)
        return y.permute(0, 2, 3, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mask, weight = ctx.saved_tensors
        s, d, left, right, l_out, has_bias = ctx.options
        f_out, dim, k = weight.shape
        batch, labels = mask.shape[0], mask.shape[1]
        x_pad = F.pad(x, (left, right)) if left or right else x
        m_pad = F.pad(mask, (left, right)) if left or right else mask
        U, M = _forward_parts(x_pad, m_pad, weight, s, d, l_out)
        g = grad_out.view(batch, labels, f_out, l_out).permute(0, 3, 1, 2)  # (B, L_out, T, F)
        grad_x = grad_mask = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            g_M = torch.matmul(g, U.transpose(-1, -2))  # (B, L_out, T, k)
            grad_m_pad = _unwindow(g_M.permute(0, 2, 3, 1), m_pad.shape[2], s, d)
            grad_mask = grad_m_pad[:, :, left : left + mask.shape[2]]
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            g_U = torch.matmul(M.transpose(-1, -2), g)  # (B, L_out, k, F)
            # back to every padded position: g_u[b, f, j, p], zero where no output reads p
            g_u = _unwindow(g_U.permute(0, 3, 2, 1), x_pad.shape[2], s, d, keep_taps=True)
            g_u = g_u.flatten(1, 2)  # (B, F*k, L_pad)
            w_taps = weight.permute(0, 2, 1).reshape(f_out * k, dim)
            if ctx.needs_input_grad[0]:
                grad_x_pad = torch.matmul(w_taps.t(), g_u)  # (B, D, L_pad)
                grad_x = grad_x_pad[:, :, left : left + x.shape[2]]
            if ctx.needs_input_grad[2]:
                g_w = torch.matmul(g_u, x_pad.transpose(1, 2)).sum(0)  # (F*k, D)
                grad_w = g_w.view(f_out, k, dim).permute(0, 2, 1)
        if has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_out.view(batch, labels, f_out, l_out).sum((0, 1, 3))
        return grad_x, grad_mask, grad_w, grad_b, None, None, None, None


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
    return _MaskedSharedConv1d.apply(x, mask, weight, bias, s, d, left, right)


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
