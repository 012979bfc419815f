"""Layers: ``SharedConv1d``, ``SharedConv2d`` and ``SharedConv3d``.

Each is a drop-in replacement for the ``nn.ConvNd`` with the same arguments, except that
the ``groups`` filter banks of the grouped convolution are one tensor: every group of
input channels goes through the same filters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .functional import (
    _as_tuple,
    _check_channels,
    _check_groups,
    _check_input,
    _check_padding_mode,
    _fold_conv,
    _groups_in,
    _IntOrTuple,
    _normalize_padding,
    _Padding,
    _reset_like_conv,
)

__all__ = ["SharedConv1d", "SharedConv2d", "SharedConv3d"]


def _layer_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: str | tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int | None,
    padding_mode: str,
    who: str,
) -> Tensor:
    """A layer's forward: check the input against the layer, then fold and convolve.

    ``groups=None`` (a :meth:`~_SharedConvNd.per_group` layer) reads the number of groups
    from the input's channels.
    """
    if groups is None:
        groups = _groups_in(input, weight.shape[1], weight.dim() - 2, who)
    batched = _check_input(input, weight, groups, who)
    return _fold_conv(input, weight, bias, stride, padding, dilation, groups, padding_mode,
                      batched)


# torch.fx.symbolic_trace records the layer's forward as one call of _layer_conv instead
# of tracing into checks that read sizes a Proxy does not have.
torch.fx.wrap("_layer_conv")

_REDUCTIONS = ("check", "mean")


def _check_banks(banks: Tensor, what: str, who: str) -> None:
    """Refuse ``banks`` (``(G, ...)``) unless all ``G`` equal bank 0 exactly (NaN equals NaN)."""
    first = banks[:1]
    same = torch.isclose(banks, first, rtol=0, atol=0, equal_nan=True)
    if bool(same.all()):
        return
    diff = torch.where(same, 0, (banks - first).abs()).flatten(1).amax(1)
    worst = int(diff.nan_to_num(nan=math.inf).argmax())
    differ = int((~same).flatten(1).any(1).sum())
    g, largest = banks.shape[0], diff[worst].item()
    how = f"{largest:.6g}" + (" (a NaN against a number)" if math.isnan(largest) else "")
    raise ValueError(
        f"{who}: the conv's {g} {what} banks (one per group) are not all equal: group "
        f"{worst}'s differs most from group 0's, largest absolute difference {how}, and "
        f"{differ} of the {g} banks differ from bank 0. A shared layer holds one bank: pass "
        f"reduce='mean' to take the mean of the {g} banks"
    )


class _SharedConvNd(nn.Module):
    """Common base of the shared convolutions; ``_dim`` is set by the subclasses."""

    _dim: int
    in_channels: int | None
    out_channels: int | None
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int | None
    padding_mode: str
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
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self._dim
        name = type(self).__name__
        in_channels, out_channels, groups = _check_channels(in_channels, out_channels, groups,
                                                            name)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _as_tuple(kernel_size, n, "kernel_size", minimum=1)
        self.stride = _as_tuple(stride, n, "stride", minimum=1)
        self.padding = _normalize_padding(padding, n, self.stride)
        self.dilation = _as_tuple(dilation, n, "dilation", minimum=1)
        self.groups = groups
        self._in_per_group = in_channels // groups
        self._out_per_group = out_channels // groups
        self.padding_mode = _check_padding_mode(padding_mode)
        factory = {"device": device, "dtype": dtype}
        shape = (out_channels // groups, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels // groups, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def per_group(
        cls,
        in_per_group: int,
        out_per_group: int,
        kernel_size: _IntOrTuple,
        stride: _IntOrTuple = 1,
        padding: _Padding = 0,
        dilation: _IntOrTuple = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        """A layer for any number of groups, read from each input: ``G = C_in / D``.

        For inputs whose group count is only known at run time (sets of streams of varying
        size): the layer holds one bank of ``out_per_group`` filters over ``in_per_group``
        channels, and an input with ``C_in = G * in_per_group`` channels gives
        ``G * out_per_group`` output channels. The weight, its initialisation and the
        errors are those of a layer built with ``groups=G``; an input whose channel count is
        not a multiple of ``in_per_group`` is refused. ``groups``, ``in_channels`` and
        ``out_channels`` are ``None``.

        Args:
            in_per_group (int): :math:`D`, the input channels of one group.
            out_per_group (int): :math:`F`, the filters of the shared bank.
            kernel_size, stride, padding, dilation, bias, padding_mode, device, dtype: as
                for the class itself.

        Example::

            >>> conv = SharedConv1d.per_group(1, 16, 5, padding=2)  # one stream -> 16 maps
            >>> conv(torch.randn(8, 3, 100)).shape                 # 3 streams
            torch.Size([8, 48, 100])
            >>> conv(torch.randn(8, 7, 100)).shape                 # 7 streams, same weight
            torch.Size([8, 112, 100])
        """
        layer = cls(in_per_group, out_per_group, kernel_size, stride, padding, dilation, 1,
                    bias, padding_mode, device, dtype)
        layer.groups = layer.in_channels = layer.out_channels = None
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, reduce: str = "check"):
        r"""The shared layer of a grouped ``nn.ConvNd``, the inverse of :meth:`to_conv`.

        The layer has the conv's ``in_channels``, ``out_channels``, ``kernel_size``,
        ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``, bias presence,
        device and dtype. Its bank is read from the conv's ``G = groups`` banks, the weight
        viewed as :math:`(G, F, D, *\mathrm{kernel\_size})` and the bias as :math:`(G, F)`.
        With ``reduce="check"`` the banks (and the bias chunks) must all be exactly equal,
        as they are in ``layer.to_conv()``: then ``SharedConv1d.from_conv(layer.to_conv())``
        equals ``layer``, same parameters and same outputs. Banks that differ are refused
        (the error says which group is furthest from bank 0, and by how much) unless
        ``reduce="mean"``, which takes their mean: the layer then computes the grouped
        convolution whose banks are all replaced by that mean.

        The parameters are new tensors (copies, not views of the conv's), ordinary
        trainable parameters; building the layer draws no random numbers.

        To load a grouped convolution's ``state_dict`` ``sd`` (saved from an
        ``nn.Conv1d(G * D, G * F, k, groups=G)``), load it into that conv and convert it,
        ``conv.load_state_dict(sd)`` then ``SharedConv1d.from_conv(conv)``; or reduce the
        tensors directly: ``sd["weight"].view(G, F, D, *k)[0]`` (or ``.mean(0)``) is the
        shared layer's ``weight`` and ``sd["bias"].view(G, F)[0]`` its ``bias``.

        Args:
            conv (torch.nn.Module): an ``nn.Conv1d`` for :class:`~sharedconv.SharedConv1d`
                (``nn.Conv2d``, ``nn.Conv3d`` for the others), any ``groups``.
            reduce (str, optional): ``"check"``: the banks must be equal, bank 0 is taken;
                ``"mean"``: the mean of the banks is taken. Default: ``"check"``.

        Returns:
            The shared layer, on the conv's device and in its dtype.

        Raises:
            TypeError: ``conv`` is not an ``nn.ConvNd`` of the layer's dimension (a
                transposed convolution is not one either).
            ValueError: ``reduce`` is not ``"check"`` or ``"mean"``, or ``reduce="check"``
                and the banks differ; ``conv`` has uninitialised (lazy) parameters.

        Example::

            >>> layer = SharedConv1d(6, 12, 3, groups=3, padding=1)
            >>> back = SharedConv1d.from_conv(layer.to_conv())
            >>> torch.equal(back.weight, layer.weight)
            True
            >>> conv = nn.Conv1d(6, 12, 3, groups=3)      # three different banks
            >>> SharedConv1d.from_conv(conv, reduce="mean").weight.shape
            torch.Size([4, 2, 3])
        """
        n = cls._dim
        who = f"{cls.__name__}.from_conv"
        conv_cls: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        if not isinstance(conv, conv_cls):
            got = type(conv)
            got_name = got.__name__ if isinstance(conv, nn.Module) else f"{got.__name__} object"
            raise TypeError(
                f"{who}: expected an nn.{conv_cls.__name__} (a {n}-d convolution), "
                f"got {got_name}"
            )
        if not isinstance(reduce, str) or reduce not in _REDUCTIONS:
            raise ValueError(f"{who}: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        if nn.parameter.is_lazy(conv.weight):
            raise ValueError(
                f"{who}: the {type(conv).__name__} has uninitialised parameters; run it on "
                "an input first"
            )
        groups = conv.groups
        # bias=False: building on "meta" allocates nothing and draws no random numbers
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    groups=groups, bias=False, padding_mode=conv.padding_mode,
                    device="meta", dtype=conv.weight.dtype)
        with torch.no_grad():
            tensors = {"weight": conv.weight.detach().unflatten(0, (groups, -1))}
            if conv.bias is not None:
                tensors["bias"] = conv.bias.detach().unflatten(0, (groups, -1))
            for name, banks in tensors.items():
                if reduce == "mean":
                    bank = banks.mean(0)
                else:
                    if not banks.is_meta:  # a meta conv has no values to compare
                        _check_banks(banks, name, who)
                    bank = banks[0]
                bank = bank.clone(memory_format=torch.contiguous_format)
                setattr(layer, name, nn.Parameter(bank))
        return layer

    @property
    def in_per_group(self) -> int:
        """Input channels each group has, :math:`D` (``in_channels // groups``)."""
        return self._in_per_group

    @property
    def out_per_group(self) -> int:
        """Filters in the shared bank, :math:`F` (``out_channels // groups``)."""
        return self._out_per_group

    def reset_parameters(self) -> None:
        """Initialise as ``nn.ConvNd`` does, with the same fan-in.

        The fan-in of a grouped convolution is ``in_channels // groups * prod(kernel_size)``,
        which is also the fan-in of the shared bank, so both layers draw their weights from
        :math:`U(-1/\\sqrt{\\mathrm{fan\\_in}}, 1/\\sqrt{\\mathrm{fan\\_in}})` and their biases
        from the same interval.
        """
        _reset_like_conv(self.weight, self.bias)

    def forward(self, input: Tensor) -> Tensor:
        """The shared convolution of ``input``, of shape ``(N, C_in, *S)`` or ``(C_in, *S)``.

        Returns ``(N, C_out, *S_out)`` (or ``(C_out, *S_out)``), output channels group-major.
        """
        return _layer_conv(input, self.weight, self.bias, self.stride, self.padding,
                           self.dilation, self.groups, self.padding_mode, type(self).__name__)

    def to_conv(self, groups: int | None = None) -> nn.Module:
        """The equivalent plain grouped ``nn.ConvNd``, with the shared bank copied ``groups`` times.

        The result holds its own parameters (a snapshot: training it does not keep the
        copies tied). Use it to export to tools that only know ``nn.ConvNd``, or to check
        this layer against PyTorch's grouped convolution. ``groups`` is needed for a
        :meth:`~sharedconv.SharedConv1d.per_group` layer only (otherwise it must be
        omitted or equal ``self.groups``).
        """
        if self.groups is None:
            if groups is None:
                raise ValueError(
                    f"{type(self).__name__}.to_conv: this layer reads groups from its input; "
                    "pass the number of groups, e.g. to_conv(groups=4)"
                )
            groups = _check_groups(groups)
        elif groups is not None and groups != self.groups:
            raise ValueError(
                f"{type(self).__name__}.to_conv: the layer has groups={self.groups}, "
                f"got groups={groups}"
            )
        else:
            groups = self.groups
        conv_cls: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self._dim - 1]
        conv = conv_cls(
            groups * self._in_per_group,
            groups * self._out_per_group,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight.repeat(groups, *([1] * (self._dim + 1))))
            if self.bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(self.bias.repeat(groups))
        return conv

    def extra_repr(self) -> str:
        if self.groups is None:
            s = "in_per_group={_in_per_group}, out_per_group={_out_per_group}, "
            s += "kernel_size={kernel_size}, stride={stride}"
        else:
            s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * self._dim:
            s += ", padding={padding}"
        if self.dilation != (1,) * self._dim:
            s += ", dilation={dilation}"
        if self.groups is None:
            s += ", groups=read from the input"
        elif self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        s += ", shared_weight={shared}"
        return s.format(shared=tuple(self.weight.shape), **self.__dict__)


_DOC_ARGS = r"""
    Args:
        in_channels (int): channels of the input, :math:`G \cdot D`.
        out_channels (int): channels of the output, :math:`G \cdot F`.
        kernel_size (int or tuple): size of each shared filter.
        stride (int or tuple, optional): stride of the convolution. Default: 1.
        padding (int, tuple or str, optional): padding added to all sides of the input,
            or ``'valid'`` (none) or ``'same'`` (output as long as the input, stride 1
            only). Default: 0.
        dilation (int or tuple, optional): spacing between kernel elements. Default: 1.
        groups (int, optional): :math:`G`, the number of channel groups; all of them share
            one bank of filters. Default: 1 (then the layer equals ``nn.Conv{n}d``).
        bias (bool, optional): if ``True``, adds a learnable bias of shape :math:`(F,)`,
            shared by the groups. Default: ``True``.
        padding_mode (str, optional): ``'zeros'``, ``'reflect'``, ``'replicate'`` or
            ``'circular'``. Default: ``'zeros'``.
        device (torch.device, optional): where to create the parameters. Default: the
            current default device.
        dtype (torch.dtype, optional): the floating-point type of the parameters.
            Default: ``torch.get_default_dtype()``.

    Attributes:
        weight (Tensor): the shared bank, of shape
            :math:`(F, D, {kernel})` with :math:`F` = ``out_channels // groups`` and
            :math:`D` = ``in_channels // groups``, initialised from
            :math:`U(-\sqrt{{k}}, \sqrt{{k}})` with
            :math:`k = 1 / (D \cdot \prod \mathrm{{kernel\_size}})`, as ``nn.Conv{n}d``.
        bias (Tensor): the shared bias, of shape :math:`(F,)`, initialised likewise.
"""


class SharedConv1d(_SharedConvNd):
    __doc__ = (
        r"""1-d convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.Conv1d(in_channels, out_channels, kernel_size, ..., groups=G)``
    computes when its ``G`` banks of ``F = out_channels // G`` filters are all equal, but
    stores that bank once and trains it once: its gradient is the sum of what every group
    contributes. Implemented with one ``F.conv1d`` call on a view that folds the groups
    into the batch, on every device; inside :func:`~sharedconv.tuning.autotune`, an eager call may
    run another strategy measured faster on this machine for its shape.

    Two common uses:

    * *N streams, one filter bank*: ``SharedConv1d(N, N * F, k, groups=N)`` applies the
      same ``F`` filters to each of ``N`` single-channel streams and keeps ``F`` output
      channels per stream.
    * *groups sharing one bank*: ``SharedConv1d(T * D, T * F, k, groups=T)`` is the
      grouped convolution over ``T`` groups of ``D`` channels with a single
      ``(F, D, k)`` bank, however large ``T`` is.
"""
        + _DOC_ARGS.format(n=1, kernel=r"\mathrm{kernel\_size}")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, L_{in})` or :math:`(C_{in}, L_{in})`
        - Output: :math:`(N, C_{out}, L_{out})` or :math:`(C_{out}, L_{out})`, with

          .. math::
              L_{out} = \left\lfloor \frac{L_{in} + 2 \cdot \text{padding}
                  - \text{dilation} \cdot (\mathrm{kernel\_size} - 1) - 1}{\text{stride}}
                  + 1 \right\rfloor

          Output channels are group-major: ``output.unflatten(1, (G, F))`` has shape
          :math:`(N, G, F, L_{out})`.

    Examples::

        >>> streams = torch.randn(32, 6, 128)         # 6 streams per sample
        >>> conv = SharedConv1d(6, 6 * 16, 5, groups=6, padding="same")
        >>> conv.weight.shape                         # one bank of 16 filters
        torch.Size([16, 1, 5])
        >>> conv(streams).unflatten(1, (6, 16)).shape
        torch.Size([32, 6, 16, 128])
"""
    )
    _dim = 1


class SharedConv2d(_SharedConvNd):
    __doc__ = (
        r"""2-d convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.Conv2d(in_channels, out_channels, kernel_size, ..., groups=G)``
    computes when its ``G`` banks are all equal, with one ``(F, D, kH, kW)`` bank stored
    and trained once, and one ``F.conv2d`` call on a view that folds the groups into the
    batch. For example, ``SharedConv2d(3 * N, 8 * N, 3, groups=N)`` applies the same
    8 filters to each of ``N`` RGB images stacked along the channels.
"""
        + _DOC_ARGS.format(n=2, kernel=r"k_H, k_W")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or
          :math:`(C_{out}, H_{out}, W_{out})`, each spatial size given by the formula of
          ``nn.Conv2d``. Output channels are group-major.

    Examples::

        >>> images = torch.randn(4, 3 * 5, 32, 32)    # 5 RGB images per sample
        >>> conv = SharedConv2d(15, 40, 3, groups=5, padding=1)
        >>> conv.weight.shape
        torch.Size([8, 3, 3, 3])
        >>> conv(images).shape
        torch.Size([4, 40, 32, 32])
"""
    )
    _dim = 2


class SharedConv3d(_SharedConvNd):
    __doc__ = (
        r"""3-d convolution whose ``groups`` filter banks are one shared tensor.

    Computes what ``nn.Conv3d(in_channels, out_channels, kernel_size, ..., groups=G)``
    computes when its ``G`` banks are all equal, with one ``(F, D, kD, kH, kW)`` bank and
    one ``F.conv3d`` call on a view that folds the groups into the batch.
"""
        + _DOC_ARGS.format(n=3, kernel=r"k_D, k_H, k_W")
        + r"""
    Shape:
        - Input: :math:`(N, C_{in}, D_{in}, H_{in}, W_{in})` or
          :math:`(C_{in}, D_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, D_{out}, H_{out}, W_{out})` or
          :math:`(C_{out}, D_{out}, H_{out}, W_{out})`, each spatial size given by the
          formula of ``nn.Conv3d``. Output channels are group-major.

    Examples::

        >>> volumes = torch.randn(2, 4, 8, 16, 16)    # 4 single-channel volumes
        >>> conv = SharedConv3d(4, 4 * 6, 3, groups=4)
        >>> conv(volumes).shape
        torch.Size([2, 24, 6, 14, 14])
"""
    )
    _dim = 3
