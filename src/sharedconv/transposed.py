"""Transposed shared layers: ``SharedConvTranspose1d``, ``...2d`` and ``...3d``.

Each is a drop-in replacement for the ``nn.ConvTransposeNd`` with the same arguments,
except that the ``groups`` filter banks of the grouped transposed convolution are one
tensor: every group of input channels goes through the same filters.

The computation is the fold of :mod:`sharedconv.functional` with a transposed convolution
inside: the input ``(B, G * D, *S)`` is viewed as ``(B * G, D, *S)``, one
``F.conv_transposeNd`` with the shared ``(D, F, *kernel_size)`` bank runs over that batch,
and ``(B * G, F, *S_out)`` is viewed back as ``(B, G * F, *S_out)``. A transposed
convolution keeps PyTorch's transposed weight layout: input channels first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    _as_int,
    _as_tuple,
    _check_channels,
    _check_input,
    _IntOrTuple,
    _output_format,
    _reset_like_conv,
)

__all__ = ["SharedConvTranspose1d", "SharedConvTranspose2d", "SharedConvTranspose3d"]

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_output_padding(
    output_padding: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    who: str,
) -> None:
    """Refuse what ATen refuses: an output padding as large as both stride and dilation."""
    for i, (op, s, d) in enumerate(zip(output_padding, stride, dilation, strict=True)):
        if op >= s and op >= d:
            raise ValueError(
                f"{who}: output_padding must be smaller than the stride or the dilation in "
                f"every dimension, got output_padding={output_padding} with stride={stride} "
                f"and dilation={dilation} (dimension {i})"
            )


def _min_output_sizes(
    spatial: Sequence[int],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> list[int]:
    """The output sizes without output padding: ``(L - 1) s - 2 p + d (k - 1) + 1``."""
    return [
        (size - 1) * s - 2 * p + d * (k - 1) + 1
        for size, k, s, p, d in zip(spatial, kernel_size, stride, padding, dilation, strict=True)
    ]


def _resolve_output_padding(
    x: Tensor,
    output_size: Sequence[int] | None,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    output_padding: tuple[int, ...],
    dilation: tuple[int, ...],
    batched: bool,
    who: str,
) -> tuple[int, ...]:
    """The output padding of this call: the layer's, or the one ``output_size`` asks for.

    As ``nn.ConvTransposeNd``: ``output_size`` gives the spatial sizes, optionally preceded
    by the batch and channel sizes (which are ignored, so ``output_size=skip.shape`` works
    in a U-Net whatever ``skip``'s channels), and each size must lie between the output
    size without output padding and that plus ``stride - 1``.
    """
    n = len(kernel_size)
    spatial = x.shape[2:] if batched else x.shape[1:]
    min_sizes = _min_output_sizes(spatial, kernel_size, stride, padding, dilation)
    if output_size is None:
        sizes = [m + op for m, op in zip(min_sizes, output_padding, strict=True)]
        if any(size < 1 for size in sizes):
            raise ValueError(
                f"{who}: the input of shape {tuple(x.shape)} gives an output of spatial size "
                f"{tuple(sizes)}, expected every size to be at least 1 (padding={padding} "
                "is too large for this input)"
            )
        return output_padding
    if isinstance(output_size, (str, bytes)) or not isinstance(output_size, Sequence):
        raise TypeError(
            f"{who}: output_size must be a list or tuple of ints (or a torch.Size), got "
            f"{type(output_size).__name__} ({output_size!r})"
        )
    requested = [_as_int(v, f"{who}: output_size must contain ints (got {output_size!r})")
                 for v in output_size]
    non_spatial = 2 if batched else 1
    if len(requested) == n + non_spatial:
        requested = requested[non_spatial:]
    if len(requested) != n:
        raise ValueError(
            f"{who}: for a {x.dim()}-D input, output_size must have {n} or {n + non_spatial} "
            f"elements, got {len(output_size)}: {output_size!r}"
        )
    max_sizes = [m + s - 1 for m, s in zip(min_sizes, stride, strict=True)]
    for size, low, high in zip(requested, min_sizes, max_sizes, strict=True):
        if size < max(low, 1) or size > high:
            raise ValueError(
                f"{who}: requested an output size of {tuple(requested)}, expected sizes from "
                f"{tuple(min_sizes)} to {tuple(max_sizes)} for an input of spatial size "
                f"{tuple(spatial)}"
            )
    return tuple(size - low for size, low in zip(requested, min_sizes, strict=True))


def _layer_conv_transpose(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    output_padding: tuple[int, ...],
    groups: int,
    dilation: tuple[int, ...],
    output_size: Sequence[int] | None,
    who: str,
) -> Tensor:
    """A transposed layer's forward: check the input, then fold and convolve once.

    ``weight`` is the shared bank ``(D, F, *kernel_size)``, in PyTorch's transposed layout.
    """
    n = weight.dim() - 2
    # _check_input reads the input channels per group from dim 1 of a forward bank
    # (F, D, *k): give it the transposed bank's view of that layout.
    batched = _check_input(input, weight.transpose(0, 1), groups, who)
    output_padding = _resolve_output_padding(
        input, output_size, tuple(weight.shape[2:]), stride, padding, output_padding,
        dilation, batched, who,
    )
    x = input if batched else input.unsqueeze(0)
    out_format = _output_format(x, weight, groups, stride, padding, dilation, output_padding)
    batch, spatial = x.shape[0], x.shape[2:]
    # (B, G*D, *S) -> (B*G, D, *S): a view for contiguous inputs, a copy otherwise.
    folded = x.reshape(batch * groups, weight.shape[0], *spatial)
    out = _CONV_TRANSPOSE[n](folded, weight, bias, stride, padding, output_padding, 1, dilation)
    # (B*G, F, *S_out) -> (B, G*F, *S_out): a view of a contiguous output.
    out = out.reshape(batch, groups * weight.shape[1], *out.shape[2:])
    if out_format is not None:  # as nn.ConvTransposeNd returns for channels_last operands
        out = out.contiguous(memory_format=out_format)
    return out if batched else out.squeeze(0)


# torch.fx.symbolic_trace records the layer's forward as one call instead of tracing into
# checks that read sizes a Proxy does not have.
torch.fx.wrap("_layer_conv_transpose")


class _SharedConvTransposeNd(nn.Module):
    """Common base of the shared transposed convolutions; ``_dim`` is set by the subclasses."""

    _dim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrTuple,
        stride: _IntOrTuple = 1,
        padding: _IntOrTuple = 0,
        output_padding: _IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: _IntOrTuple = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self._dim
        name = type(self).__name__
        in_channels, out_channels, groups = _check_channels(in_channels, out_channels, groups,
                                                            name)
        if padding_mode != "zeros":
            raise ValueError(
                f"{name}: padding_mode must be 'zeros', the only mode nn.ConvTranspose{n}d "
                f"supports, got {padding_mode!r}"
            )
        if isinstance(padding, str):
            raise TypeError(
                f"{name}: padding must be an int or a tuple of {n} ints (a transposed "
                f"convolution has no 'same' or 'valid'), got str ({padding!r})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_tuple(kernel_size, n, "kernel_size", minimum=1)
        self.stride = _as_tuple(stride, n, "stride", minimum=1)
        self.padding = _as_tuple(padding, n, "padding", minimum=0)
        self.output_padding = _as_tuple(output_padding, n, "output_padding", minimum=0)
        self.dilation = _as_tuple(dilation, n, "dilation", minimum=1)
        _check_output_padding(self.output_padding, self.stride, self.dilation, name)
        self.groups = groups
        self._in_per_group = in_channels // groups
        self._out_per_group = out_channels // groups
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        shape = (in_channels // groups, out_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels // groups, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def in_per_group(self) -> int:
        """Input channels each group has, :math:`D` (``in_channels // groups``)."""
        return self._in_per_group

    @property
    def out_per_group(self) -> int:
        """Filters in the shared bank, :math:`F` (``out_channels // groups``)."""
        return self._out_per_group

    def reset_parameters(self) -> None:
        """Initialise as ``nn.ConvTransposeNd`` does, with the same fan-in.

        ``nn.ConvTransposeNd`` computes the fan-in from its weight of shape
        ``(in_channels, out_channels // groups, *kernel_size)`` as
        ``size(1) * prod(kernel_size) = F * prod(kernel_size)``; the shared bank
        ``(D, F, *kernel_size)`` has the same ``size(1)`` and kernel, so both layers draw
        their weights from :math:`U(-1/\\sqrt{\\mathrm{fan\\_in}}, 1/\\sqrt{\\mathrm{fan\\_in}})`
        and their biases from the same interval.
        """
        _reset_like_conv(self.weight, self.bias)

    def forward(self, input: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """The shared transposed convolution of ``input``, ``(N, C_in, *S)`` or ``(C_in, *S)``.

        ``output_size`` (optional, as for ``nn.ConvTransposeNd``) picks the output's spatial
        size among those the stride allows, in place of ``output_padding``; it may also
        start with the batch and channel sizes, which are ignored. Returns
        ``(N, C_out, *S_out)`` (or ``(C_out, *S_out)``), output channels group-major.
        """
        return _layer_conv_transpose(
            input, self.weight, self.bias, self.stride, self.padding, self.output_padding,
            self.groups, self.dilation, output_size, type(self).__name__,
        )

    def to_conv(self) -> nn.Module:
        """The equivalent plain grouped ``nn.ConvTransposeNd``, the bank copied ``groups`` times.

        Its weight, of shape ``(in_channels, out_channels // groups, *kernel_size)``, is the
        shared bank repeated ``groups`` times along dim 0, its bias the shared bias repeated
        ``groups`` times. The result holds its own parameters (a snapshot: training it does
        not keep the copies tied).
        """
        conv_cls: Any = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[
            self._dim - 1
        ]
        conv = conv_cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            bias=self.bias is not None,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight.repeat(self.groups, *([1] * (self._dim + 1))))
            if self.bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(self.bias.repeat(self.groups))
        return conv

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * self._dim:
            s += ", padding={padding}"
        if self.dilation != (1,) * self._dim:
            s += ", dilation={dilation}"
        if self.output_padding != (0,) * self._dim:
            s += ", output_padding={output_padding}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        s += ", shared_weight={shared}"
        return s.format(shared=tuple(self.weight.shape), **self.__dict__)


_DOC_ARGS = r"""
    Args:
        in_channels (int): channels of the input, :math:`G \cdot D`.
        out_channels (int): channels of the output, :math:`G \cdot F`.
        kernel_size (int or tuple): size of each shared filter.
        stride (int or tuple, optional): stride of the transposed convolution. Default: 1.
        padding (int or tuple, optional): ``dilation * (kernel_size - 1) - padding`` zeros
            are added to both sides of the input (as ``nn.ConvTranspose{n}d``). Default: 0.
        output_padding (int or tuple, optional): size added to one side of the output; it
            must be smaller than the stride or the dilation. Default: 0.
        groups (int, optional): :math:`G`, the number of channel groups; all of them share
            one bank of filters. Default: 1 (then the layer equals ``nn.ConvTranspose{n}d``).
        bias (bool, optional): if ``True``, adds a learnable bias of shape :math:`(F,)`,
            shared by the groups. Default: ``True``.
        dilation (int or tuple, optional): spacing between kernel elements. Default: 1.
        padding_mode (str, optional): ``'zeros'``, the only mode ``nn.ConvTranspose{n}d``
            supports. Default: ``'zeros'``.
        device (torch.device, optional): where to create the parameters. Default: the
            current default device.
        dtype (torch.dtype, optional): the floating-point type of the parameters.
            Default: ``torch.get_default_dtype()``.

    Attributes:
        weight (Tensor): the shared bank, in PyTorch's transposed layout, of shape
            :math:`(D, F, {kernel})` with :math:`D` = ``in_channels // groups`` and
            :math:`F` = ``out_channels // groups``, initialised from
            :math:`U(-\sqrt{{k}}, \sqrt{{k}})` with
            :math:`k = 1 / (F \cdot \prod \mathrm{{kernel\_size}})`, as
            ``nn.ConvTranspose{n}d``.
        bias (Tensor): the shared bias, of shape :math:`(F,)`, initialised likewise.
"""

_OUT_SIZE = r"""
          .. math::
              {o}_{{out}} = ({o}_{{in}} - 1) \cdot \text{{stride}} - 2 \cdot \text{{padding}}
                  + \text{{dilation}} \cdot (\mathrm{{kernel\_size}} - 1)
                  + \mathrm{{output\_padding}} + 1
"""


class SharedConvTranspose1d(_SharedConvTransposeNd):
    __doc__ = (
        r"""1-d transposed convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.ConvTranspose1d(in_channels, out_channels, kernel_size, ...,
    groups=G)`` computes when its ``G`` banks of shape ``(D, F, k)`` (the blocks of its
    ``(G * D, F, k)`` weight) are all equal, but stores that bank once and trains it once:
    its gradient is the sum of what every group contributes. Implemented with one
    ``F.conv_transpose1d`` call on a view that folds the groups into the batch.

    The typical use is the decoder of a shared encoder: ``SharedConvTranspose1d(N * D,
    N * F, k, stride=2, groups=N)`` upsamples each of ``N`` streams of ``D`` channels
    with the same ``F`` filters.
"""
        + _DOC_ARGS.format(n=1, kernel=r"\mathrm{kernel\_size}")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, L_{in})` or :math:`(C_{in}, L_{in})`
        - Output: :math:`(N, C_{out}, L_{out})` or :math:`(C_{out}, L_{out})`, with
"""
        + _OUT_SIZE.format(o="L")
        + r"""
          Output channels are group-major: ``output.unflatten(1, (G, F))`` has shape
          :math:`(N, G, F, L_{out})`.

    Examples::

        >>> streams = torch.randn(32, 6 * 16, 64)     # 6 streams of 16 channels
        >>> up = SharedConvTranspose1d(6 * 16, 6 * 4, 4, stride=2, padding=1, groups=6)
        >>> up.weight.shape                           # one (D, F, k) bank
        torch.Size([16, 4, 4])
        >>> up(streams).shape
        torch.Size([32, 24, 128])
"""
    )
    _dim = 1


class SharedConvTranspose2d(_SharedConvTransposeNd):
    __doc__ = (
        r"""2-d transposed convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.ConvTranspose2d(in_channels, out_channels, kernel_size, ...,
    groups=G)`` computes when its ``G`` banks are all equal, with one ``(D, F, kH, kW)``
    bank and one ``F.conv_transpose2d`` call on a view that folds the groups into the
    batch.
"""
        + _DOC_ARGS.format(n=2, kernel=r"k_H, k_W")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          each spatial size given by
"""
        + _OUT_SIZE.format(o="H")
        + r"""
          with the values of its dimension. Output channels are group-major.

    Examples::

        >>> maps = torch.randn(4, 3 * 8, 16, 16)     # 3 images of 8 feature maps each
        >>> up = SharedConvTranspose2d(3 * 8, 3 * 2, 3, stride=2, padding=1, groups=3)
        >>> up(maps).shape
        torch.Size([4, 6, 31, 31])
        >>> up(maps, output_size=(32, 32)).shape     # or output_padding=1
        torch.Size([4, 6, 32, 32])
"""
    )
    _dim = 2


class SharedConvTranspose3d(_SharedConvTransposeNd):
    __doc__ = (
        r"""3-d transposed convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.ConvTranspose3d(in_channels, out_channels, kernel_size, ...,
    groups=G)`` computes when its ``G`` banks are all equal, with one
    ``(D, F, kD, kH, kW)`` bank and one ``F.conv_transpose3d`` call on a view that folds
    the groups into the batch.
"""
        + _DOC_ARGS.format(n=3, kernel=r"k_D, k_H, k_W")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, D_{in}, H_{in}, W_{in})` or
          :math:`(C_{in}, D_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, D_{out}, H_{out}, W_{out})` or
          :math:`(C_{out}, D_{out}, H_{out}, W_{out})`, each spatial size given by the
          formula of ``nn.ConvTranspose3d``. Output channels are group-major.

    Examples::

        >>> volumes = torch.randn(2, 4, 4, 8, 8)      # 4 single-channel volumes
        >>> up = SharedConvTranspose3d(4, 4 * 6, 2, stride=2, groups=4)
        >>> up(volumes).shape
        torch.Size([2, 24, 8, 16, 16])
"""
    )
    _dim = 3
