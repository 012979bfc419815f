"""Filter diagrams drawn from real layers, and pictures of their weights and feature maps.

A convolution layer with ``C_in`` input channels, ``C_out`` output channels and ``G`` groups
sends each input channel ``i`` to each output channel ``o`` of the same group through one
kernel, and sums what reaches each output channel. :func:`draw_layer` draws that structure
as a *crossbar*: input channels across the top, one row per output channel, a coloured tile
where input ``i`` meets output ``o`` (the kernel that connects them), a summation node at the
end of every row that adds more than one term, and the output channel. Tiles are coloured
by the **identity** of their kernel, so kernels that are one tensor entry share one colour:

- ``nn.ConvNd``: ``weight[o, i]`` (``i`` counted inside the group) is its own kernel, so every
  tile has its own colour;
- ``sharedconv.SharedConvNd``: the bank entry ``weight[f, d]`` is reused by every group, so
  output ``g*F + f`` and input ``g*D + d`` use kernel ``(f, d)`` whatever ``g`` is.

:func:`draw_scheme` draws the two ways of using one kernel for several input channels that
end in a sum: scheme ``"A"`` (the same kernel on every input channel, then a sum) and scheme
``"B"`` (sum the input channels, then convolve). :func:`show_weights` shows the numbers in a
weight tensor and :func:`show_feature_maps` a layer's output, one stream (group) at a time.

Every function returns what it drew (counts of tiles, distinct kernels, ...) so that tests
and the book can check a picture against the layer it claims to show.

matplotlib is imported only when a function here runs: ``import sharedconv`` and
``import sharedconv.lab.diagrams`` do not need it (``pip install 'sharedconv[diagrams]'``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..modules import _SharedConvNd

__all__ = [
    "DiagramInfo",
    "WeightsInfo",
    "FeatureMapsInfo",
    "draw_layer",
    "draw_scheme",
    "show_weights",
    "show_feature_maps",
]

# Layout constants of the diagrams: one data unit is _UNIT inches, text is _FONT points.
# Every text is at least 9 points, and a figure made here is at most _MAX_WIDTH inches
# wide: a book page's figures are 660 pixels wide, 6.6 inches at 100 dpi, and a notebook
# saves a figure with 0.1 inch of padding on each side (and text that overhangs). A
# crossbar that would be wider is laid out again with a smaller unit (down to
# _UNITS[-1]), its texts keeping their size; only a diagram asked to draw many channels
# (max_channels) can be wider.
_UNIT = 0.45
_UNITS = (0.45, 0.42, 0.39, 0.36, 0.33, 0.3, 0.28)
_MAX_WIDTH = 6.4
_FONT = 9
_TITLE_FONT = 11
_EM = 0.62  # average width of one character, in ems
_WIRE = "#b5b5b5"
_EDGE = "#555555"
_BOX = "#f3f3f3"
_GROUP_FILL = "#e9eef6"
_INK = "#222222"
_TILE_H = 0.66
_SUM_R = 0.3


@dataclass
class DiagramInfo:
    """What :func:`draw_layer` or :func:`draw_scheme` drew, to check against the layer.

    Counts named ``*_shown``, ``kernel_glyphs``, ``distinct_kernels`` and ``sum_nodes`` are
    of what is *drawn*; when channels are elided (``elided`` is ``True``) they are smaller
    than the layer's, which the ``total_*`` fields give.

    Attributes:
        kernel_glyphs: kernel tiles drawn (one per connected input/output pair shown).
        distinct_kernels: distinct kernel identities among the tiles drawn.
        sum_nodes: summation nodes drawn (one per output row that adds several terms).
        inputs_shown: input channels drawn (ellipses not counted).
        outputs_shown: output channels drawn (ellipses not counted).
        elided: whether some channels were left out and replaced by an ellipsis.
        weight_shape: shape of the weight tensor the diagram stands for.
        n_params: number of parameters (weight and bias) of the layer.
        fig: the matplotlib Figure drawn into.
        total_kernels: connected input/output pairs in the whole layer.
        total_distinct: distinct kernels in the whole layer.
        total_sum_nodes: summation nodes the whole layer would need.
        colors: distinct tile colours drawn (equals ``distinct_kernels`` up to 60).
        ax: the matplotlib Axes drawn into.
        tiles: for each tile drawn, ``(output channel, input channel)`` mapped to the
            kernel's identity: its index ``(o, i)`` or ``(f, d)`` in ``layer.weight`` (``i``
            and ``d`` counted inside the group), or ``o`` for the kernel ``w_o`` of a scheme
            (whose input is ``None`` in scheme ``"B"``: the kernel acts on the sum).
    """

    kernel_glyphs: int
    distinct_kernels: int
    sum_nodes: int
    inputs_shown: int
    outputs_shown: int
    elided: bool
    weight_shape: tuple[int, ...]
    n_params: int
    fig: Any = field(repr=False)
    total_kernels: int = 0
    total_distinct: int = 0
    total_sum_nodes: int = 0
    colors: int = 0
    ax: Any = field(default=None, repr=False)
    tiles: dict[tuple[int, int | None], Any] = field(default_factory=dict, repr=False)


@dataclass
class WeightsInfo:
    """What :func:`show_weights` drew.

    Attributes:
        kernels_shown: kernels drawn (ellipses not counted).
        total_kernels: kernels in the tensor, ``weight.shape[0] * weight.shape[1]``.
        weight_shape: shape of the weight tensor drawn.
        shared: whether the tensor is a shared bank (from a ``SharedConvNd``).
        groups: number of groups of the layer (1 for a bare tensor without ``groups``).
        elided: whether some kernels were left out.
        vmax: the colour scale runs from ``-vmax`` to ``vmax``.
        fig: the matplotlib Figure.
    """

    kernels_shown: int
    total_kernels: int
    weight_shape: tuple[int, ...]
    shared: bool
    groups: int
    elided: bool
    vmax: float
    fig: Any = field(repr=False)


@dataclass
class FeatureMapsInfo:
    """What :func:`show_feature_maps` drew.

    Attributes:
        streams_shown: streams (groups of output channels) drawn.
        features_shown: feature maps drawn per stream.
        groups: number of streams in the output.
        features_per_stream: output channels per stream, ``channels // groups``.
        elided: whether some streams or features were left out.
        vmax: the colour scale runs from ``-vmax`` to ``vmax``.
        fig: the matplotlib Figure.
    """

    streams_shown: int
    features_shown: int
    groups: int
    features_per_stream: int
    elided: bool
    vmax: float
    fig: Any = field(repr=False)


# --------------------------------------------------------------------------- helpers


def _matplotlib() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is installed for the tests
        raise ImportError(
            "sharedconv.lab.diagrams needs matplotlib: pip install 'sharedconv[diagrams]'"
        ) from exc
    return plt


def _check_int(name: str, value: Any, minimum: int, func: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{func}: {name} must be at least {minimum}, got {value}")
    return value


def _check_ax(ax: Any, func: str) -> None:
    if ax is None:
        return
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(f"{func}: ax must be a matplotlib Axes or None, got {type(ax).__name__}")


def _check_title(title: Any, func: str) -> None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"{func}: title must be a str or None, got {type(title).__name__}")


def _pick(n: int, m: int) -> list[int | None]:
    """Indices ``0..n-1``; when ``n > m``, the first ``m - 1``, an ellipsis, and the last."""
    if n <= m:
        return list(range(n))
    return [*range(m - 1), None, n - 1]


def _select(c_in: int, c_out: int, groups: int, m: int) -> tuple[list, list]:
    """Input and output channels to draw, at most ``m`` of each, whole groups aligned.

    With ``groups > 1`` the same groups are shown on both sides (the first ones and the
    last, with an ellipsis between), and inside a large group its first channels and its
    last, so that the block structure of the layer stays visible.
    """
    if c_in <= m and c_out <= m:
        return list(range(c_in)), list(range(c_out))
    if groups == 1:
        return _pick(c_in, m), _pick(c_out, m)
    n_in, n_out = c_in // groups, c_out // groups
    shown = _pick(groups, max(2, min(m // n_in, m // n_out)))
    per = max(2, m // sum(g is not None for g in shown))
    ins: list[int | None] = []
    outs: list[int | None] = []
    for g in shown:
        if g is None:
            ins.append(None)
            outs.append(None)
            continue
        ins += [None if j is None else g * n_in + j for j in _pick(n_in, per)]
        outs += [None if j is None else g * n_out + j for j in _pick(n_out, per)]
    return ins, outs


def _palette() -> list[tuple[float, float, float]]:
    """60 qualitative colours: tab10, then the light shades of tab20, then tab20b/c."""
    from matplotlib import colormaps

    def listed(name: str) -> list:
        return list(colormaps[name].colors)  # type: ignore[attr-defined]  # ListedColormap

    colors = listed("tab10")
    colors += [c for j, c in enumerate(listed("tab20")) if j % 2]
    colors += listed("tab20b") + listed("tab20c")
    return [(float(c[0]), float(c[1]), float(c[2])) for c in colors]


def _ink_on(color: Sequence[float]) -> str:
    r, g, b = color[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else _INK


def _text_w(text: str, size: float = _FONT, unit: float = _UNIT) -> float:
    """Approximate width of a one-line text, in data units of ``unit`` inches."""
    return len(text) * _EM * size / 72 / unit


def _wrap(text: str, inches: float, size: float = _FONT) -> list[str]:
    """The lines of ``text``, each wrapped to at most ``inches`` at ``size`` points."""
    chars = max(20, int(inches / (_EM * size / 72)))
    return [part for line in text.splitlines() for part in textwrap.wrap(line, chars) or [""]]


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _kernel_arg(kernel_size: Sequence[int]) -> str:
    ks = tuple(kernel_size)
    return str(ks[0]) if len(set(ks)) == 1 else str(ks)


def _list_groups(groups: int) -> str:
    if groups <= 6:
        return ", ".join(str(g) for g in range(groups))
    return f"0, 1, 2, ..., {groups - 1}"


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Spec:
    name: str
    shared: bool
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    n_params: int

    @property
    def n_in(self) -> int:
        return self.in_channels // self.groups

    @property
    def n_out(self) -> int:
        return self.out_channels // self.groups

    def kernel(self, o: int, i: int) -> tuple[int, int] | None:
        """Index of the kernel that sends input ``i`` to output ``o`` (None: not connected)."""
        if i // self.n_in != o // self.n_out:
            return None
        return (o % self.n_out if self.shared else o, i % self.n_in)

    def title(self) -> str:
        prefix = "" if self.shared else "nn."
        s = f"{prefix}{self.name}({self.in_channels}, {self.out_channels}, "
        s += _kernel_arg(self.kernel_size)
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ")"


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _spec(layer: Any, func: str) -> _Spec:
    if isinstance(layer, _SharedConvNd):
        shared = True
    elif isinstance(layer, _CONVS):
        shared = False
    else:
        raise TypeError(
            f"{func}: expected an nn.Conv1d/2d/3d or a sharedconv.SharedConv1d/2d/3d, "
            f"got {type(layer).__name__}"
        )
    bias = getattr(layer, "bias", None)
    # A per_group layer reads its number of groups from each input: draw one group.
    groups = 1 if layer.groups is None else int(layer.groups)
    return _Spec(
        name=type(layer).__name__,
        shared=shared,
        in_channels=groups * int(layer.weight.shape[1]),
        out_channels=int(layer.out_channels) if layer.out_channels is not None
        else int(layer.weight.shape[0]),
        groups=groups,
        kernel_size=tuple(int(k) for k in layer.kernel_size),
        weight_shape=tuple(layer.weight.shape),
        bias_shape=None if bias is None else tuple(bias.shape),
        n_params=sum(p.numel() for p in layer.parameters()),
    )


# --------------------------------------------------------------------------- drawing


@dataclass
class _Grid:
    """A crossbar to draw: columns are input channels, rows output channels."""

    cols: list[int | None]
    rows: list[int | None]
    kernel: Callable[[int, int], Hashable | None]
    label: Callable[[Any], str]
    color_index: Callable[[Any], int] | None = None  # None: by order of first appearance
    sums: bool = True
    group_of_row: Callable[[int], int] | None = None
    group_of_col: Callable[[int], int] | None = None


class _Canvas:
    """Primitive shapes in data units on one Axes, and the extents they need."""

    def __init__(self, ax: Any) -> None:
        from matplotlib import patches

        self.ax = ax
        self.patches = patches

    def box(self, x: float, y: float, text: str, ha: str = "center") -> None:
        self.ax.text(
            x, y, text, ha=ha, va="center", fontsize=_FONT, color=_INK, zorder=5,
            bbox={"boxstyle": "round,pad=0.3", "fc": _BOX, "ec": _EDGE, "lw": 0.8},
        )

    def dots(self, x: float, y: float, vertical: bool, background: bool = False) -> None:
        kw: dict[str, Any] = {}
        if background:
            kw["bbox"] = {"boxstyle": "square,pad=0.05", "fc": "white", "ec": "none"}
        self.ax.text(
            x, y, "\u22ee" if vertical else "\u22ef", ha="center", va="center",
            fontsize=_FONT + 2, color=_EDGE, zorder=5, **kw,
        )

    def tile(self, x: float, y: float, w: float, color: Sequence[float], label: str) -> None:
        edge = tuple(0.65 * c for c in color[:3])
        self.ax.add_patch(
            self.patches.FancyBboxPatch(
                (x - w / 2, y - _TILE_H / 2), w, _TILE_H,
                boxstyle="round,pad=0,rounding_size=0.12",
                fc=color, ec=edge, lw=0.9, zorder=3,
            )
        )
        self.ax.text(x, y, label, ha="center", va="center", fontsize=_FONT,
                     color=_ink_on(color), zorder=4)

    def sum_node(self, x: float, y: float) -> None:
        self.ax.add_patch(
            self.patches.Circle((x, y), _SUM_R, fc="white", ec=_EDGE, lw=1.0, zorder=3)
        )
        self.ax.text(x, y, "\u03a3", ha="center", va="center", fontsize=_FONT + 1,
                     color=_INK, zorder=4)

    def wire(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        self.ax.plot(xs, ys, color=_WIRE, lw=1.3, zorder=1, solid_capstyle="butt")

    def arrow(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.ax.annotate(
            "", xy=(x1, y1), xytext=(x0, y0), zorder=2,
            arrowprops={"arrowstyle": "-|>", "color": _WIRE, "lw": 1.3,
                        "shrinkA": 0, "shrinkB": 0, "mutation_scale": 11},
        )


def _finish(
    ax: Any,
    fig: Any,
    own_figure: bool,
    left: float,
    right: float,
    top: float,
    bottom: float,
    title: str,
    caption: list[str],
    unit: float = _UNIT,
) -> float:
    """Title above, caption below, limits, and (for our own figure) its size in inches.

    Title and caption lines are wrapped to fit ``_MAX_WIDTH``; returns the width the
    diagram needs, in inches.
    """
    titles = _wrap(title, _MAX_WIDTH - 0.8 * unit, _TITLE_FONT)
    caption = [part for line in caption for part in _wrap(line, _MAX_WIDTH - 0.8 * unit)]
    width = max(right - left, max(_text_w(t, _TITLE_FONT, unit) for t in titles) + 0.8,
                max(_text_w(line, unit=unit) for line in caption) + 0.8)
    center = (left + right) / 2
    left, right = center - width / 2, center + width / 2
    ax.text(center, top + 0.35, "\n".join(titles), ha="center", va="bottom",
            fontsize=_TITLE_FONT, fontweight="bold", color=_INK, linespacing=1.3)
    ax.text(center, bottom - 0.15, "\n".join(caption), ha="center", va="top", fontsize=_FONT,
            color=_INK, linespacing=1.45)
    line = _FONT * 1.45 / 72 / unit
    y_max = top + 0.35 + _TITLE_FONT * 1.3 * len(titles) / 72 / unit + 0.2
    y_min = bottom - 0.15 - line * len(caption) - 0.25
    ax.set_xlim(left, right)
    ax.set_ylim(y_min, y_max)
    ax.set_aspect("equal")
    ax.axis("off")
    if own_figure:
        fig.set_size_inches((right - left) * unit, (y_max - y_min) * unit)
        fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    return (right - left) * unit


def _units(own_figure: bool) -> tuple[float, ...]:
    """The units to lay a diagram out with, largest first (only _UNIT in a given Axes)."""
    return _UNITS if own_figure else (_UNIT,)


def _new_axes(ax: Any) -> tuple[Any, Any, bool]:
    plt = _matplotlib()
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=(4, 4))
    return fig, ax, True


def _render_grid(ax: Any, grid: _Grid, unit: float = _UNIT
                 ) -> tuple[dict, dict, int, float, float, float, float]:
    """Draw the crossbar; return tiles, colours, sum nodes drawn and the extents used.

    Lengths are in data units of ``unit`` inches; each tile is as wide as its label
    needs at the diagram's font size.
    """
    canvas = _Canvas(ax)
    palette = _palette()
    cells: dict[tuple[int, int], Hashable] = {}
    order: dict[Hashable, int] = {}
    for r, o in enumerate(grid.rows):
        for c, i in enumerate(grid.cols):
            if o is None or i is None:
                continue
            key = grid.kernel(o, i)
            if key is not None:
                cells[r, c] = key
                order.setdefault(key, len(order))
    colors = {
        key: palette[(grid.color_index(key) if grid.color_index else rank) % len(palette)]
        for key, rank in order.items()
    }
    labels = {key: grid.label(key) for key in order}
    tile_w = max([0.74] + [_text_w(s, unit=unit) + 0.3 for s in labels.values()])
    out_labels = [f"y{o}" for o in grid.rows if o is not None]
    # column widths: room for a tile and for the input's label; ellipsis columns are narrow
    widths = [0.8 if i is None else max(1.0, tile_w + 0.3, _text_w(f"x{i}", unit=unit) + 0.4)
              for i in grid.cols]
    xs = [sum(widths[:c]) + widths[c] / 2 for c in range(len(widths))]
    ys = [-(1.3 + r) for r in range(len(grid.rows))]
    x_edge = xs[-1] + widths[-1] / 2
    x_sum = x_edge + 0.55
    x_out = (x_sum + _SUM_R + 0.75) if grid.sums else x_edge + 0.75
    out_w = max(_text_w(s, unit=unit) for s in out_labels) + 0.3

    # groups: shaded blocks behind the tiles and labels on the left
    left = -0.2
    if grid.group_of_row is not None and grid.group_of_col is not None:
        spans: dict[int, list[list[int]]] = {}
        for r, o in enumerate(grid.rows):
            if o is not None:
                spans.setdefault(grid.group_of_row(o), [[], []])[0].append(r)
        for c, i in enumerate(grid.cols):
            if i is not None:
                spans.setdefault(grid.group_of_col(i), [[], []])[1].append(c)
        label_x = -0.2
        for g, (rs, cs) in spans.items():
            if not rs or not cs:
                continue
            x0 = xs[min(cs)] - widths[min(cs)] / 2 + 0.06
            x1 = xs[max(cs)] + widths[max(cs)] / 2 - 0.06
            y0, y1 = ys[max(rs)] - 0.47, ys[min(rs)] + 0.47
            ax.add_patch(canvas.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fc=_GROUP_FILL,
                                                  ec="none", zorder=0))
            ax.text(label_x, (y0 + y1) / 2, f"group {g}", ha="right", va="center",
                    fontsize=_FONT, color=_EDGE)
            left = min(left, label_x - _text_w(f"group {g}", unit=unit) - 0.2)
        for r, o in enumerate(grid.rows):
            neighbours = grid.rows[r - 1 : r + 2 : 2] if 0 < r < len(grid.rows) - 1 else []
            if o is None and len(neighbours) == 2 and None not in neighbours and (
                grid.group_of_row(neighbours[0])  # type: ignore[arg-type]
                != grid.group_of_row(neighbours[1])  # type: ignore[arg-type]
            ):
                canvas.dots(label_x - _text_w("group 0", unit=unit) / 2, ys[r],
                            vertical=True)

    # inputs and their wires
    for c, i in enumerate(grid.cols):
        if i is None:
            canvas.dots(xs[c], 0.0, vertical=False)
            continue
        canvas.box(xs[c], 0.0, f"x{i}")
        rows_used = [r for (r, cc) in cells if cc == c]
        if rows_used:
            canvas.wire([xs[c], xs[c]], [-0.3, ys[max(rows_used)]])

    # rows: tiles, sums, outputs
    sums = 0
    for r, o in enumerate(grid.rows):
        if o is None:
            canvas.dots(x_out + out_w / 2 - 0.15, ys[r], vertical=True)
            if grid.sums:
                canvas.dots(x_sum, ys[r], vertical=True)
            for c in range(len(grid.cols)):
                if (r - 1, c) in cells and (r + 1, c) in cells:
                    canvas.dots(xs[c], ys[r], vertical=True, background=True)
            continue
        canvas.box(x_out, ys[r], f"y{o}", ha="left")
        cs = sorted(c for (rr, c) in cells if rr == r)
        for c in cs:
            canvas.tile(xs[c], ys[r], tile_w, colors[cells[r, c]], labels[cells[r, c]])
        if not cs:
            continue
        if grid.sums:
            canvas.wire([xs[cs[0]], x_sum - _SUM_R], [ys[r], ys[r]])
            canvas.sum_node(x_sum, ys[r])
            canvas.arrow(x_sum + _SUM_R, ys[r], x_out - 0.22, ys[r])
            sums += 1
        else:
            canvas.arrow(xs[cs[0]], ys[r], x_out - 0.22, ys[r])
    for c, i in enumerate(grid.cols):
        if i is not None:
            continue
        for r in range(len(grid.rows)):
            if (r, c - 1) in cells and (r, c + 1) in cells:
                canvas.dots(xs[c], ys[r], vertical=False, background=True)

    right = x_out + out_w + 0.2
    return cells, colors, sums, left, right, 0.45, ys[-1] - 0.5


def _caption_params(weight_shape: Sequence[int], bias_shape: Sequence[int] | None,
                    n_params: int) -> str:
    bias = "no bias" if bias_shape is None else f"bias {_shape_str(bias_shape)}"
    return f"weight {_shape_str(weight_shape)}, {bias}: {n_params:,} parameters"


def draw_layer(
    layer: nn.Module,
    ax: Any = None,
    max_channels: int = 6,
    title: str | None = None,
) -> DiagramInfo:
    """Draw which kernel connects each input channel to each output channel of a layer.

    Input channels ``x0, x1, ...`` run across the top; each output channel ``y0, y1, ...``
    is a row. Where input ``i`` meets output ``o`` a tile stands for the kernel that
    connects them, labelled with its index in ``layer.weight`` and coloured by identity:
    ``o,i`` for ``nn.ConvNd`` (``i`` counted inside the group: ``weight[o, i]``) and
    ``f,d`` for ``SharedConvNd`` (the bank entry ``weight[f, d]``, the same for every
    group). A ``Σ`` node ends each row that adds more than one term (none when every
    group has a single input channel). Groups are shaded blocks.

    When there are more than ``max_channels`` input (or output) channels, only some are
    drawn, with an ellipsis for the rest: the first channels and the last, and for a
    grouped layer the first groups and the last one, so the block pattern stays visible
    (at least two groups with two channels each, so up to 4 channels when
    ``max_channels`` is 2 or 3).
    The counts in the returned :class:`DiagramInfo` are of what is drawn; its ``total_*``
    fields are the whole layer's.

    Args:
        layer: an ``nn.Conv1d/2d/3d`` or a ``sharedconv.SharedConv1d/2d/3d`` (any groups;
            parameters may be on any device, including ``meta``: only shapes are read).
        ax: matplotlib Axes to draw into; by default a new figure sized to the diagram,
            at most 6.4 inches wide with the default ``max_channels`` (a wide layout is
            drawn with less space between its parts; texts stay at 9 points or more).
            Pass an Axes only if it is large enough for the diagram.
        max_channels: most input channels, and most output channels, drawn (at least 2).
        title: title above the diagram; by default the layer's constructor call.

    Returns:
        DiagramInfo: tiles, distinct kernels, sum nodes and channels drawn, the weight shape,
        the parameter count, whole-layer totals, and the Figure.

    Raises:
        TypeError: ``layer`` is not one of the layers above, or an argument has the
            wrong type.
        ValueError: ``max_channels`` is smaller than 2.

    Example::

        >>> info = draw_layer(sharedconv.SharedConv2d(3, 12, 3, groups=3), max_channels=12)
        >>> info.kernel_glyphs, info.distinct_kernels
        (12, 4)
    """
    spec = _spec(layer, "draw_layer")
    _check_int("max_channels", max_channels, 2, "draw_layer")
    _check_title(title, "draw_layer")
    _matplotlib()
    _check_ax(ax, "draw_layer")
    cols, rows = _select(spec.in_channels, spec.out_channels, spec.groups, max_channels)
    grouped = spec.groups > 1
    grid = _Grid(
        cols=cols,
        rows=rows,
        kernel=spec.kernel,
        label=lambda key: f"{key[0]},{key[1]}",
        sums=spec.n_in > 1,
        group_of_row=(lambda o: o // spec.n_out) if grouped else None,
        group_of_col=(lambda i: i // spec.n_in) if grouped else None,
    )
    fig, ax, own = _new_axes(ax)
    total_kernels = spec.out_channels * spec.n_in
    total_distinct = (spec.n_out if spec.shared else spec.out_channels) * spec.n_in
    elided = None in cols or None in rows
    if spec.shared:
        key = f"tile f,d = shared bank weight[f, d], reused by all {spec.groups} groups"
        if spec.groups == 1:
            key = "tile f,d = weight[f, d]"
    else:
        key = "tile o,i = weight[o, i]" + (", i counted inside the group" if grouped else "")
    for unit in _units(own):  # the largest unit whose figure fits the page
        if unit != _UNITS[0]:
            ax.clear()
        cells, colors, sums, left, right, top, bottom = _render_grid(ax, grid, unit)
        distinct = len(set(cells.values()))
        drawn = f"{len(cells)} kernels drawn, {distinct} distinct"
        if elided:
            drawn += f" (layer: {total_kernels:,} kernels, {total_distinct:,} distinct)"
        caption = [_caption_params(spec.weight_shape, spec.bias_shape, spec.n_params),
                   drawn, key]
        width = _finish(ax, fig, own, left, right, top, bottom, title or spec.title(),
                        caption, unit)
        if width <= _MAX_WIDTH:
            break
    return DiagramInfo(
        kernel_glyphs=len(cells),
        distinct_kernels=distinct,
        sum_nodes=sums,
        inputs_shown=sum(i is not None for i in cols),
        outputs_shown=sum(o is not None for o in rows),
        elided=elided,
        weight_shape=spec.weight_shape,
        n_params=spec.n_params,
        fig=fig,
        total_kernels=total_kernels,
        total_distinct=total_distinct,
        total_sum_nodes=spec.out_channels if spec.n_in > 1 else 0,
        colors=len(set(colors.values())),
        ax=ax,
        tiles={(rows[r], cols[c]): key for (r, c), key in cells.items()},
    )


def draw_scheme(
    scheme: str,
    in_channels: int = 3,
    out_channels: int = 2,
    ax: Any = None,
    kernel_size: int = 3,
    max_channels: int = 6,
    title: str | None = None,
) -> DiagramInfo:
    """Draw one of the two ways to use one kernel on every input channel and sum.

    Both schemes have ``out_channels`` kernels ``w0, w1, ...`` of size ``kernel_size``
    (2-D, no bias), stored as a weight of shape ``(out_channels, 1, k, k)``, and both
    compute the same output, with ``out_channels`` channels whatever ``in_channels`` is:

    - ``"A"``: kernel ``w_o`` on every input channel, then one sum per output channel:
      ``in_channels * out_channels`` tiles, ``out_channels`` distinct, ``out_channels``
      sum nodes.
    - ``"B"``: sum the input channels first (one node), then each kernel once:
      ``out_channels`` tiles, ``out_channels`` distinct, one sum node.

    The kernel ``w_o`` has the same colour in both pictures.

    Args:
        scheme: ``"A"`` or ``"B"``.
        in_channels: input channels (at least 1).
        out_channels: output channels, one kernel each (at least 1).
        ax: matplotlib Axes to draw into; by default a new figure sized to the diagram,
            at most 6.4 inches wide with the default ``max_channels``.
        kernel_size: side of the square kernels (for the weight shape and parameter count).
        max_channels: most input, and most output, channels drawn (at least 2).
        title: title above the diagram; by default a description of the scheme.

    Returns:
        DiagramInfo: what was drawn (see :class:`DiagramInfo`).

    Raises:
        ValueError: ``scheme`` is not ``"A"`` or ``"B"``, or a count is out of range.
        TypeError: a count is not an int, or ``ax``/``title`` has the wrong type.

    Example::

        >>> info = draw_scheme("B", in_channels=3, out_channels=2)
        >>> info.kernel_glyphs, info.distinct_kernels, info.sum_nodes
        (2, 2, 1)
    """
    if not isinstance(scheme, str) or scheme not in ("A", "B"):
        raise ValueError(
            "draw_scheme: scheme must be 'A' (convolve every channel, then sum) or 'B' "
            f"(sum the channels, then convolve), got {scheme!r}"
        )
    _check_int("in_channels", in_channels, 1, "draw_scheme")
    _check_int("out_channels", out_channels, 1, "draw_scheme")
    _check_int("kernel_size", kernel_size, 1, "draw_scheme")
    _check_int("max_channels", max_channels, 2, "draw_scheme")
    _check_title(title, "draw_scheme")
    _matplotlib()
    _check_ax(ax, "draw_scheme")
    cols, rows = _pick(in_channels, max_channels), _pick(out_channels, max_channels)
    weight_shape = (out_channels, 1, kernel_size, kernel_size)
    n_params = out_channels * kernel_size * kernel_size
    fig, ax, own = _new_axes(ax)
    elided = None in cols or None in rows
    colors: dict = {}
    for unit in _units(own):  # the largest unit whose figure fits the page
        if unit != _UNITS[0]:
            ax.clear()
        if scheme == "A":
            grid = _Grid(cols=cols, rows=rows, kernel=lambda o, i: o,
                         label=lambda o: f"w{o}", color_index=lambda o: o, sums=True)
            cells, colors, sums, left, right, top, bottom = _render_grid(ax, grid, unit)
            tiles = {(rows[r], cols[c]): key for (r, c), key in cells.items()}
            kernels = len(cells)
            distinct = len(set(cells.values()))
            total_kernels, total_sums = in_channels * out_channels, out_channels
            what = "the same kernel on every input channel, then one sum per output"
            default_title = f"Scheme A: convolve each of {in_channels} channels, then sum"
        else:
            kernels, distinct, sums, ncolors, left, right, top, bottom = _render_scheme_b(
                ax, cols, rows, unit
            )
            total_kernels, total_sums = out_channels, 1
            tiles = {(o, None): o for o in rows if o is not None}
            what = "one sum of the input channels, then each kernel once"
            default_title = f"Scheme B: sum the {in_channels} channels, then convolve"
        drawn = f"{kernels} kernels drawn, {distinct} distinct, {sums} sum node"
        drawn += "" if sums == 1 else "s"
        if elided:
            drawn += f" (in all: {total_kernels:,} kernels, {out_channels:,} distinct)"
        caption = [_caption_params(weight_shape, None, n_params), drawn, what]
        width = _finish(ax, fig, own, left, right, top, bottom, title or default_title,
                        caption, unit)
        if width <= _MAX_WIDTH:
            break
    return DiagramInfo(
        kernel_glyphs=kernels,
        distinct_kernels=distinct,
        sum_nodes=sums,
        inputs_shown=sum(i is not None for i in cols),
        outputs_shown=sum(o is not None for o in rows),
        elided=elided,
        weight_shape=weight_shape,
        n_params=n_params,
        fig=fig,
        total_kernels=total_kernels,
        total_distinct=out_channels,
        total_sum_nodes=total_sums,
        colors=len(set(colors.values())) if scheme == "A" else ncolors,
        ax=ax,
        tiles=tiles,
    )


def _render_scheme_b(ax: Any, cols: list, rows: list, unit: float = _UNIT) -> tuple:
    """Inputs into one sum node, then a column of kernels, one per output channel."""
    canvas = _Canvas(ax)
    palette = _palette()
    labels = [f"w{o}" for o in rows if o is not None]
    tile_w = max([0.74] + [_text_w(s, unit=unit) + 0.3 for s in labels])
    dx = max(1.0, max(_text_w(f"x{i}", unit=unit) + 0.6 for i in cols if i is not None))
    xs = [c * dx for c in range(len(cols))]
    x_mid = (xs[0] + xs[-1]) / 2
    y_sum = -1.25
    ys = [-(2.45 + r) for r in range(len(rows))]
    x_out = max(xs[-1] + dx / 2, x_mid + tile_w / 2) + 0.9
    out_w = max(_text_w(f"y{o}", unit=unit) for o in rows if o is not None) + 0.3
    for c, i in enumerate(cols):
        if i is None:
            canvas.dots(xs[c], 0.0, vertical=False)
            continue
        canvas.box(xs[c], 0.0, f"x{i}")
        canvas.wire([xs[c], x_mid], [-0.3, y_sum])
    canvas.sum_node(x_mid, y_sum)
    real = [r for r, o in enumerate(rows) if o is not None]
    canvas.wire([x_mid, x_mid], [y_sum - _SUM_R, ys[real[-1]]])
    kernels, colors = 0, set()
    for r, o in enumerate(rows):
        if o is None:
            canvas.dots(x_mid, ys[r], vertical=True, background=True)
            canvas.dots(x_out + out_w / 2 - 0.15, ys[r], vertical=True)
            continue
        color = palette[o % len(palette)]
        canvas.tile(x_mid, ys[r], tile_w, color, f"w{o}")
        canvas.arrow(x_mid + tile_w / 2, ys[r], x_out - 0.22, ys[r])
        canvas.box(x_out, ys[r], f"y{o}", ha="left")
        kernels += 1
        colors.add(color)
    left = min(xs[0] - dx / 2, x_mid - tile_w / 2) - 0.2
    right = x_out + out_w + 0.2
    return kernels, kernels, 1, len(colors), left, right, 0.45, ys[-1] - 0.5


# --------------------------------------------------------------------------- weights


def _resolve_weights(obj: Any, groups: int | None) -> tuple[Tensor, int, bool, str]:
    func = "show_weights"
    if isinstance(obj, (nn.Module,)):
        spec = _spec(obj, func)
        if groups is not None:
            raise ValueError(f"{func}: groups is read from the layer; pass it only with a "
                             f"weight tensor, got groups={groups!r}")
        weight = cast(Tensor, obj.weight)
        groups, shared, name = spec.groups, spec.shared, spec.title()
    elif isinstance(obj, Tensor):
        weight, shared = obj, False
        groups = 1 if groups is None else _check_int("groups", groups, 1, func)
        name = f"weight {_shape_str(weight.shape)}"
    else:
        raise TypeError(f"{func}: expected a convolution layer or a weight tensor, "
                        f"got {type(obj).__name__}")
    if weight.ndim not in (3, 4):
        raise ValueError(
            f"{func}: draws 1-d and 2-d kernels, i.e. a weight of 3 or 4 dimensions "
            f"(out, in, *kernel); got shape {tuple(weight.shape)}. For 3-d kernels pass a "
            f"slice such as weight[:, :, d]"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{func}: weight must be floating point, got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError(f"{func}: the weight is on the meta device and has no values")
    if not shared and weight.shape[0] % groups:
        raise ValueError(f"{func}: weight.shape[0] = {weight.shape[0]} is not divisible by "
                         f"groups = {groups}")
    return weight.detach().to("cpu", torch.float64), groups, shared, name


def show_weights(
    layer_or_weight: nn.Module | Tensor,
    groups: int | None = None,
    max_rows: int = 12,
    max_cols: int = 8,
    title: str | None = None,
) -> WeightsInfo:
    """Show the numbers in a convolution weight, one kernel at a time.

    1-d kernels, a weight ``(O, I, k)``, are the rows of one heatmap (row ``o,i`` is
    ``weight[o, i]``); 2-d kernels, ``(O, I, kH, kW)``, are small images in a grid with
    one row per ``o`` and one column per ``i``. A ``SharedConvNd``'s bank is shown once,
    titled with the groups that use it; a grouped ``nn.ConvNd`` labels the rows of each
    group. The colour scale is symmetric around zero (blue negative, red positive).

    Args:
        layer_or_weight: an ``nn.Conv1d/2d``, a ``SharedConv1d/2d``, or a weight tensor
            of 3 or 4 dimensions.
        groups: only with a tensor: its number of groups, to label the rows (default 1).
        max_rows: most kernels (1-d) or rows of kernels (2-d) drawn, at least 2.
        max_cols: most columns of kernels drawn (2-d), at least 2.
        title: title of the figure; by default the layer and the weight's shape.

    Returns:
        WeightsInfo: kernels shown and in total, the shape, whether it is a shared bank,
        and the Figure.

    Raises:
        TypeError: not a layer or a tensor, a non-floating weight, or wrong argument types.
        ValueError: 3-d kernels, a weight on the ``meta`` device, ``groups`` given with a
            layer or not dividing the weight's first dimension, ``max_*`` below 2.

    Example::

        >>> info = show_weights(sharedconv.SharedConv1d(4, 8, 5, groups=4))
        >>> info.kernels_shown, info.shared
        (2, True)
    """
    weight, groups, shared, name = _resolve_weights(layer_or_weight, groups)
    _check_int("max_rows", max_rows, 2, "show_weights")
    _check_int("max_cols", max_cols, 2, "show_weights")
    _check_title(title, "show_weights")
    plt = _matplotlib()
    out, inp = weight.shape[:2]
    vmax = float(weight.abs().max()) or 1.0
    if shared:
        used = (f"stored once, used by all {groups} groups ({_list_groups(groups)})"
                if groups > 1 else "one bank, groups=1")
        head = f"{name}: shared bank {_shape_str(weight.shape)}\n{used}"
    else:
        head = f"{name}: weight {_shape_str(weight.shape)}" if "weight" not in name else name
        head += f"\n{out * inp} kernels, each stored separately"
        if groups > 1:
            head += f", in {groups} groups"
    head = title or head
    a, b = ("f", "d") if shared else ("o", "i")
    out_per_group = out // groups
    if weight.ndim == 3:
        shown, fig, elided = _weights_1d(plt, weight, max_rows, vmax, head, a, b,
                                         None if shared or groups == 1 else out_per_group)
    else:
        shown, fig, elided = _weights_2d(plt, weight, max_rows, max_cols, vmax, head, a, b,
                                         None if shared or groups == 1 else out_per_group)
    return WeightsInfo(kernels_shown=shown, total_kernels=out * inp,
                       weight_shape=tuple(weight.shape), shared=shared, groups=groups,
                       elided=elided, vmax=vmax, fig=fig)


def _colorbar(fig: Any, image: Any, ax: Any, label: str) -> None:
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, shrink=0.9)
    bar.ax.tick_params(labelsize=_FONT)
    bar.set_label(label, fontsize=_FONT)


def _title_width(head: str) -> float:
    """Inches a (possibly multi-line) title of size _FONT + 1 needs, with margins."""
    return max(len(line) for line in head.splitlines()) * 0.6 * (_FONT + 1) / 72 + 0.5


def _fit_title(head: str) -> str:
    """``head`` with its lines wrapped so that the title fits ``_MAX_WIDTH``."""
    chars = int((_MAX_WIDTH - 0.5) / (0.6 * (_FONT + 1) / 72))
    return "\n".join(part for line in head.splitlines()
                     for part in textwrap.wrap(line, chars) or [""])


def _ticks_for(k: int) -> list[int]:
    if k <= 16:
        return list(range(k))
    step = math.ceil(k / 8)
    return list(range(0, k, step))


def _plain(ax: Any) -> None:
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def _group_labels(ax: Any, positions: list[float], groups: list[int | None]) -> None:
    """Label runs of rows of the same group on the right of ``ax`` ("group g")."""
    centers, labels = [], []
    run: list[float] = []
    pairs = zip(groups, [*groups[1:], None], strict=True)
    for pos, (g, nxt) in zip(positions, pairs, strict=True):
        if g is None:
            continue
        run.append(pos)
        if nxt != g:
            centers.append(sum(run) / len(run))
            labels.append(f"group {g}")
            run = []
    side = ax.secondary_yaxis("right")
    side.set_yticks(centers, labels, fontsize=_FONT, color=_EDGE)
    _plain(side)


def _weights_1d(plt: Any, w: Tensor, max_rows: int, vmax: float, head: str, a: str, b: str,
                out_per_group: int | None) -> tuple[int, Any, bool]:
    import numpy as np

    out, inp, k = w.shape
    pairs = [(o, i) for o in range(out) for i in range(inp)]
    items = _pick(len(pairs), max_rows)
    matrix = np.full((len(items), k), np.nan)
    labels = []
    for r, j in enumerate(items):
        if j is None:
            labels.append("\u22ee")
            continue
        o, i = pairs[j]
        matrix[r] = w[o, i].numpy()
        labels.append(f"{o},{i}")
    cell_w = min(0.4, 3.4 / k)
    head = _fit_title(head)
    width = min(_MAX_WIDTH, max(4.6, k * cell_w + 3.2, _title_width(head)))
    height = max(2.3, 1.5 + 0.26 * len(items))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    image = ax.imshow(matrix, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(len(items)), labels, fontsize=_FONT)
    ax.set_xticks(_ticks_for(k), [str(t) for t in _ticks_for(k)], fontsize=_FONT)
    ax.set_xlabel("tap", fontsize=_FONT)
    ax.set_ylabel(f"kernel weight[{a}, {b}]", fontsize=_FONT)
    _plain(ax)
    for r in range(1, len(items)):
        prev, cur = items[r - 1], items[r]
        if prev is not None and cur is not None and pairs[prev][0] != pairs[cur][0]:
            if out_per_group is not None and (
                pairs[prev][0] // out_per_group != pairs[cur][0] // out_per_group
            ):
                ax.axhline(r - 0.5, color="white", lw=5)
            elif inp > 1:
                ax.axhline(r - 0.5, color="white", lw=1.5)
    if out_per_group is not None:
        _group_labels(ax, list(range(len(items))),
                      [None if j is None else pairs[j][0] // out_per_group for j in items])
    ax.set_title(head, fontsize=_FONT + 1)
    _colorbar(fig, image, ax, "weight")
    return sum(j is not None for j in items), fig, None in items


def _weights_2d(plt: Any, w: Tensor, max_rows: int, max_cols: int, vmax: float, head: str,
                a: str, b: str, out_per_group: int | None) -> tuple[int, Any, bool]:
    import numpy as np

    out, inp, kh, kw = w.shape
    rows, cols = _pick(out, max_rows), _pick(inp, max_cols)
    gap = max(1, round(max(kh, kw) / 5))
    mosaic = np.full((len(rows) * (kh + gap) - gap, len(cols) * (kw + gap) - gap), np.nan)
    for r, o in enumerate(rows):
        for c, i in enumerate(cols):
            if o is not None and i is not None:
                y0, x0 = r * (kh + gap), c * (kw + gap)
                mosaic[y0 : y0 + kh, x0 : x0 + kw] = w[o, i].numpy()
    # inches per kernel pixel: each kernel about 0.42 in wide, all of them within the page
    px = min(0.42 / max(kh, kw), (_MAX_WIDTH - 3.1) / mosaic.shape[1])
    head = _fit_title(head)
    width = min(_MAX_WIDTH, max(4.0, mosaic.shape[1] * px + 3.0, _title_width(head)))
    height = max(2.4, mosaic.shape[0] * px + 1.5)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    yc = [r * (kh + gap) + (kh - 1) / 2 for r in range(len(rows))]
    xc = [c * (kw + gap) + (kw - 1) / 2 for c in range(len(cols))]
    ax.set_yticks(yc, [f"{a}={o}" if o is not None else "\u22ee" for o in rows],
                  fontsize=_FONT)
    ax.set_xticks(xc, [f"{b}={i}" if i is not None else "\u22ef" for i in cols],
                  fontsize=_FONT)
    ax.xaxis.tick_top()
    _plain(ax)
    if out_per_group is not None:
        _group_labels(ax, yc, [None if o is None else o // out_per_group for o in rows])
    ax.set_title(head, fontsize=_FONT + 1)
    _colorbar(fig, image, ax, "weight")
    shown = sum(o is not None for o in rows) * sum(i is not None for i in cols)
    return shown, fig, None in rows or None in cols


# --------------------------------------------------------------------------- feature maps


def show_feature_maps(
    output: Tensor,
    groups: int,
    sample: int = 0,
    max_streams: int = 4,
    max_features: int = 8,
    title: str | None = None,
) -> FeatureMapsInfo:
    """Show a layer's output one stream at a time: the ``F`` feature maps of each group.

    ``output`` has ``groups * F`` channels in group-major order (as a grouped or shared
    convolution produces them): channels ``g*F .. g*F + F - 1`` belong to stream ``g``.
    1-d outputs ``(B, C, L)`` draw one heatmap per stream (a row per feature, positions
    along the x axis); 2-d outputs ``(B, C, H, W)`` draw a grid of images, one row per
    stream and one column per feature. All panels share one symmetric colour scale, so
    streams can be compared.

    Args:
        output: batched layer output, ``(B, C, L)`` or ``(B, C, H, W)``, floating point.
        groups: number of streams ``G``; must divide ``C``.
        sample: which batch element to show.
        max_streams: most streams drawn (the first ones and the last), at least 2.
        max_features: most feature maps drawn per stream, at least 2.
        title: title of the figure; by default a description of the shapes.

    Returns:
        FeatureMapsInfo: streams and features shown, and the Figure.

    Raises:
        TypeError: ``output`` is not a floating-point tensor, or wrong argument types.
        ValueError: wrong number of dimensions, ``groups`` not dividing the channels,
            ``sample`` out of range, ``max_*`` below 2.

    Example::

        >>> conv = sharedconv.SharedConv1d(3, 3 * 4, 5, groups=3)
        >>> info = show_feature_maps(conv(torch.randn(1, 3, 50)), groups=3)
        >>> info.streams_shown, info.features_shown
        (3, 4)
    """
    func = "show_feature_maps"
    if not isinstance(output, Tensor):
        raise TypeError(f"{func}: output must be a Tensor, got {type(output).__name__}")
    if not output.is_floating_point():
        raise TypeError(f"{func}: output must be floating point, got {output.dtype}")
    if output.ndim not in (3, 4):
        raise ValueError(f"{func}: output must be batched, (B, C, L) or (B, C, H, W); got "
                         f"shape {tuple(output.shape)}")
    _check_int("groups", groups, 1, func)
    _check_int("sample", sample, 0, func)
    _check_int("max_streams", max_streams, 2, func)
    _check_int("max_features", max_features, 2, func)
    _check_title(title, func)
    batch, channels = output.shape[:2]
    if channels % groups:
        raise ValueError(f"{func}: groups = {groups} does not divide the {channels} channels")
    if sample >= batch:
        raise ValueError(f"{func}: sample = {sample} is out of range for a batch of {batch}")
    plt = _matplotlib()
    feats = channels // groups
    maps = output[sample].detach().to("cpu", torch.float64).unflatten(0, (groups, feats))
    vmax = float(maps.abs().max()) or 1.0
    streams, features = _pick(groups, max_streams), _pick(feats, max_features)
    head = title or (f"output {_shape_str(output.shape)}: {groups} streams "
                     f"x {feats} features, sample {sample}")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    if output.ndim == 3:
        fig = _features_1d(plt, maps, streams, features, vmax, cmap, head)
    else:
        fig = _features_2d(plt, maps, streams, features, vmax, cmap, head)
    return FeatureMapsInfo(
        streams_shown=sum(g is not None for g in streams),
        features_shown=sum(f is not None for f in features),
        groups=groups,
        features_per_stream=feats,
        elided=None in streams or None in features,
        vmax=vmax,
        fig=fig,
    )


def _features_1d(plt: Any, maps: Tensor, streams: list, features: list, vmax: float,
                 cmap: Any, head: str) -> Any:
    import numpy as np

    length = maps.shape[-1]
    real = [g for g in streams if g is not None]
    height = 0.9 + sum(0.35 + 0.2 * len(features) for _ in real) + (0.3 if None in streams else 0)
    fig, axes = plt.subplots(len(real), 1, figsize=(_MAX_WIDTH, height), sharex=True,
                             squeeze=False, layout="constrained")
    image = None
    for ax, g in zip(axes[:, 0], real, strict=True):
        matrix = np.full((len(features), length), np.nan)
        for r, f in enumerate(features):
            if f is not None:
                matrix[r] = maps[g, f].numpy()
        image = ax.imshow(matrix, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto",
                          interpolation="nearest")
        ax.set_yticks(range(len(features)),
                      [f"f={f}" if f is not None else "\u22ee" for f in features],
                      fontsize=_FONT)
        ax.set_ylabel(f"stream {g}", fontsize=_FONT, rotation=0, ha="right", va="center")
        ax.tick_params(labelsize=_FONT, length=2)
    gap = streams.index(None) if None in streams else None
    if gap is not None:
        before, after = streams[gap - 1], streams[gap + 1]
        axes[gap - 1, 0].set_xlabel(f"\u22ee streams {before + 1} to {after - 1} not shown",
                                    fontsize=_FONT, color=_EDGE)
        axes[gap - 1, 0].tick_params(labelbottom=True)
    axes[-1, 0].set_xlabel("position", fontsize=_FONT)
    fig.suptitle(head, fontsize=_FONT + 1)
    _colorbar(fig, image, axes[:, 0].tolist(), "feature value")
    return fig


def _features_2d(plt: Any, maps: Tensor, streams: list, features: list, vmax: float,
                 cmap: Any, head: str) -> Any:
    import numpy as np

    h, w = maps.shape[-2:]
    gap = max(1, round(max(h, w) / 12))
    mosaic = np.full((len(streams) * (h + gap) - gap, len(features) * (w + gap) - gap), np.nan)
    for r, g in enumerate(streams):
        for c, f in enumerate(features):
            if g is not None and f is not None:
                mosaic[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = (
                    maps[g, f].numpy()
                )
    px = min(0.9 / max(h, w), (_MAX_WIDTH - 2.3) / mosaic.shape[1])
    head = _fit_title(head)
    width = min(_MAX_WIDTH, max(3.6, mosaic.shape[1] * px + 2.2, _title_width(head)))
    fig, ax = plt.subplots(figsize=(width, max(2.0, mosaic.shape[0] * px + 1.2)),
                           layout="constrained")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(len(streams))],
                  [f"stream {g}" if g is not None else "\u22ee" for g in streams],
                  fontsize=_FONT)
    ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(len(features))],
                  [f"f={f}" if f is not None else "\u22ef" for f in features], fontsize=_FONT)
    ax.xaxis.tick_top()
    _plain(ax)
    ax.set_title(head, fontsize=_FONT + 1)
    _colorbar(fig, image, ax, "feature value")
    return fig
