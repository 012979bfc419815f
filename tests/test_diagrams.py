"""sharedconv.lab.diagrams: drawings match the layer; figures render; bad input is refused."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from torch import nn  # noqa: E402

import sharedconv  # noqa: E402
from sharedconv.lab import diagrams  # noqa: E402
from sharedconv.lab.diagrams import (  # noqa: E402
    draw_layer,
    draw_scheme,
    show_feature_maps,
    show_weights,
)

pytestmark = pytest.mark.filterwarnings("error")  # a figure that warns is a broken figure


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    return buf.getvalue()


def _assert_renders(fig, max_width: float = 9.0) -> None:
    """A non-empty PNG with ink on it, at most max_width inches wide, all text >= 9 pt."""
    data = _png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    image = plt.imread(io.BytesIO(data))
    assert (image[..., :3] < 0.5).any(), "nothing dark was drawn"
    assert fig.get_size_inches()[0] <= max_width
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= 9


# --------------------------------------------------------------------------- draw_layer


@pytest.mark.parametrize(
    "layer, glyphs, distinct, sums",
    [
        (nn.Conv2d(3, 4, 3), 12, 12, 4),                                # standard
        (nn.Conv2d(3, 3, 3, groups=3), 3, 3, 0),                        # depthwise
        (nn.Conv2d(4, 6, 3, groups=2), 12, 12, 6),                      # grouped
        (nn.Conv1d(6, 4, 5, groups=2), 12, 12, 4),                      # grouped, 1-d
        (sharedconv.SharedConv2d(3, 12, 3, groups=3), 12, 4, 0),        # seed 1, 2-d
        (sharedconv.SharedConv1d(3, 6, 5, groups=3), 6, 2, 0),          # seed 1
        (sharedconv.SharedConv1d(6, 6, 3, groups=3), 12, 4, 6),         # seed 2: T=3, D=F=2
        (sharedconv.SharedConv2d(3, 4, 3), 12, 12, 4),                  # groups=1: a conv
        (sharedconv.SharedConv3d(4, 4, 3, groups=2), 8, 4, 4),          # 3-d
        (nn.Conv3d(2, 2, 3), 4, 4, 2),
    ],
    ids=["conv", "depthwise", "grouped", "grouped1d", "shared-per-channel-2d",
         "shared-per-channel", "shared-bank", "shared-g1", "shared3d", "conv3d"],
)
def test_counts_match_the_layer(layer, glyphs, distinct, sums):
    info = draw_layer(layer, max_channels=12)
    assert (info.kernel_glyphs, info.distinct_kernels, info.sum_nodes) == (glyphs, distinct, sums)
    assert info.colors == distinct
    assert not info.elided
    assert (info.inputs_shown, info.outputs_shown) == (layer.in_channels, layer.out_channels)
    assert (info.total_kernels, info.total_distinct) == (glyphs, distinct)
    assert info.total_sum_nodes == sums
    assert info.weight_shape == tuple(layer.weight.shape)
    assert info.n_params == sum(p.numel() for p in layer.parameters())
    _assert_renders(info.fig)


def test_the_issue_examples_with_default_arguments():
    std = draw_layer(nn.Conv2d(3, 4, 3))
    assert (std.kernel_glyphs, std.distinct_kernels, std.n_params) == (12, 12, 4 * 3 * 9 + 4)
    dw = draw_layer(nn.Conv2d(3, 3, 3, groups=3))
    assert (dw.kernel_glyphs, dw.distinct_kernels) == (3, 3)
    assert dw.weight_shape == (3, 1, 3, 3)


PAGE_WIDTH = 6.6  # inches: the 660 pixels of a book page's figures, at 100 dpi


@pytest.mark.parametrize(
    "draw",
    [
        lambda: draw_layer(nn.Conv2d(3, 4, 3)),
        lambda: draw_layer(nn.Conv2d(3, 3, 3, groups=3)),
        lambda: draw_layer(nn.Conv2d(4, 6, 3, groups=2)),
        lambda: draw_layer(nn.Conv2d(64, 128, 3)),
        lambda: draw_layer(sharedconv.SharedConv1d(3, 6, 5, groups=3)),
        lambda: draw_layer(sharedconv.SharedConv1d(6, 6, 3, groups=3)),
        lambda: draw_layer(sharedconv.SharedConv2d(3, 12, 3, groups=3)),
        lambda: draw_layer(sharedconv.SharedConv1d(890_000, 445_000, 3, groups=8900,
                                                   device="meta")),
        lambda: draw_scheme("A", in_channels=3, out_channels=2),
        lambda: draw_scheme("B", in_channels=3, out_channels=2),
        lambda: draw_scheme("A", in_channels=40, out_channels=30),
        lambda: draw_scheme("B", in_channels=40, out_channels=30),
    ],
    ids=["standard", "depthwise", "grouped", "standard-elided", "shared-per-channel",
         "shared-bank", "shared-per-channel-2d", "shared-bank-8900", "scheme-A", "scheme-B",
         "scheme-A-elided", "scheme-B-elided"],
)
def test_every_kind_of_diagram_fits_the_page_with_readable_text(draw):
    """Drawn with its defaults, each diagram is at most 6.6 in wide (it is not scaled down
    on the page) and every text in it, tile labels included, is at least 9 pt."""
    info = draw()
    fig = info.fig
    assert fig.get_size_inches()[0] <= PAGE_WIDTH
    texts = [t for t in fig.findobj(Text) if t.get_text().strip()]
    assert texts and all(t.get_fontsize() >= 9 for t in texts)
    # saved as a notebook saves it (tight, 0.1 in of padding), it fits 661 pixels
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    assert plt.imread(io.BytesIO(buf.getvalue())).shape[1] <= 661
    # nothing spills out of the figure, and each tile label fits inside its tile
    from matplotlib.patches import FancyBboxPatch

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for t in texts:
        box = (t.get_bbox_patch() or t).get_window_extent(renderer)
        assert box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1, t.get_text()
    tiles = [p.get_window_extent(renderer) for p in info.ax.patches
             if isinstance(p, FancyBboxPatch)]
    assert len(tiles) == info.kernel_glyphs
    for t in texts:
        label = t.get_window_extent(renderer)
        holders = [b for b in tiles if b.x0 <= label.x0 + label.width / 2 <= b.x1
                   and b.y0 <= label.y0 + label.height / 2 <= b.y1]
        for b in holders:  # the tile this text is the label of
            assert b.x0 <= label.x0 and label.x1 <= b.x1, t.get_text()
            assert b.y0 <= label.y0 and label.y1 <= b.y1, t.get_text()


def test_show_weights_and_feature_maps_fit_the_page():
    for info in (show_weights(torch.randn(50, 100, 3)), show_weights(torch.randn(40, 20, 5, 5)),
                 show_weights(torch.randn(8, 2, 25)),
                 show_feature_maps(torch.randn(1, 6, 116), groups=3),
                 show_feature_maps(torch.randn(1, 60, 8, 8), groups=5)):
        _assert_renders(info.fig, max_width=PAGE_WIDTH)


def _connections(layer) -> set[tuple[int, int]]:
    """(output, input) pairs that are connected, found by perturbing one input at a time."""
    torch.manual_seed(0)
    dims = (5,) * (layer.weight.ndim - 2)
    x = torch.randn(1, layer.in_channels, *dims, dtype=torch.float64)
    layer = layer.double()
    base = layer(x)
    pairs = set()
    for i in range(layer.in_channels):
        x2 = x.clone()
        x2[:, i] += 1.0
        changed = (layer(x2) - base).flatten(2).abs().amax(-1)[0] > 0
        pairs |= {(o, i) for o in changed.nonzero().flatten().tolist()}
    return pairs


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 4, 3),
        nn.Conv1d(6, 4, 3, groups=2),
        nn.Conv1d(4, 8, 3, groups=4),
        sharedconv.SharedConv1d(6, 9, 3, groups=3),
        sharedconv.SharedConv2d(3, 12, 3, groups=3),
    ],
    ids=["conv", "grouped", "depthwise-x2", "shared-bank", "shared-per-channel"],
)
def test_tiles_are_the_layers_connections_and_kernels(layer):
    """Each tile sits where the layer connects input to output, and names its kernel."""
    info = draw_layer(layer, max_channels=12)
    assert set(info.tiles) == _connections(layer)
    # identity: the tile's kernel is the one the equivalent plain grouped conv uses there
    conv = layer.to_conv() if isinstance(layer, sharedconv.SharedConv1d | sharedconv.SharedConv2d) \
        else layer
    n_in = layer.in_channels // layer.groups
    for (o, i), (a, b) in info.tiles.items():
        torch.testing.assert_close(conv.weight[o, i % n_in], layer.weight[a, b], rtol=0, atol=0)
    # and tiles with different identities hold different kernels (random init)
    keys = sorted(set(info.tiles.values()))
    flat = torch.stack([layer.weight[a, b].flatten() for a, b in keys])
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0


def test_shared_per_channel_elided_by_default_keeps_the_totals():
    layer = sharedconv.SharedConv2d(3, 12, 3, groups=3)
    info = draw_layer(layer)  # 12 outputs > max_channels=6
    assert info.elided and info.outputs_shown <= 6 and info.inputs_shown <= 6
    assert (info.total_kernels, info.total_distinct) == (12, 4)
    assert info.kernel_glyphs == info.outputs_shown  # one input per group
    assert info.distinct_kernels <= 4


def test_large_layers_are_elided_not_crammed():
    info = draw_layer(nn.Conv2d(64, 128, 3))
    assert info.elided
    assert (info.inputs_shown, info.outputs_shown, info.kernel_glyphs) == (6, 6, 36)
    assert (info.total_kernels, info.total_distinct, info.total_sum_nodes) == (8192, 8192, 128)
    _assert_renders(info.fig)


def test_seed_two_at_full_size_on_meta_shows_first_and_last_group():
    T, D, F_ = 8900, 100, 50
    layer = sharedconv.SharedConv1d(T * D, T * F_, 3, groups=T, device="meta")
    info = draw_layer(layer)
    assert info.elided
    groups_drawn = {o // F_ for o, _ in info.tiles}
    assert groups_drawn == {0, T - 1}
    # both groups drawn use the same kernels: the bank
    by_group = [{k for (o, _), k in info.tiles.items() if o // F_ == g} for g in (0, T - 1)]
    assert by_group[0] == by_group[1]
    assert info.distinct_kernels == len(by_group[0]) == info.kernel_glyphs // 2
    assert (info.total_kernels, info.total_distinct) == (T * F_ * D, F_ * D)
    assert info.n_params == F_ * D * 3 + F_
    _assert_renders(info.fig)


@pytest.mark.parametrize("m", [2, 3, 4, 6, 9])
@pytest.mark.parametrize("c_in, c_out, groups", [(100, 100, 100), (8, 10, 2), (64, 6, 1),
                                                 (3, 12, 3), (12, 300, 3), (6, 6, 3)])
def test_selection_bounds_and_aligns_groups(c_in, c_out, groups, m):
    ins, outs = diagrams._select(c_in, c_out, groups, m)
    real_in = [i for i in ins if i is not None]
    real_out = [o for o in outs if o is not None]
    # at most m per side; a grouped layer shows at least 2 groups x 2 channels (when it has them)
    bound = m if groups == 1 else max(m, 4)
    assert 1 <= len(real_in) <= bound and 1 <= len(real_out) <= bound
    assert real_in == sorted(set(real_in)) and real_out == sorted(set(real_out))
    assert (None in ins or len(ins) == c_in) and (None in outs or len(outs) == c_out)
    assert 0 in real_in and c_in - 1 in real_in and 0 in real_out and c_out - 1 in real_out
    assert {i // (c_in // groups) for i in real_in} == {o // (c_out // groups) for o in real_out}


def test_draw_into_given_axes():
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    a = draw_layer(nn.Conv2d(2, 2, 3), ax=left)
    b = draw_scheme("A", ax=right)
    assert a.fig is fig and b.fig is fig and a.ax is left and b.ax is right
    assert tuple(fig.get_size_inches()) == (8, 3)
    assert _png(fig)[:4] == b"\x89PNG"


def test_default_title_is_the_constructor_call():
    info = draw_layer(sharedconv.SharedConv1d(6, 6, (3,), groups=3))
    texts = [t.get_text() for t in info.fig.findobj(Text)]
    assert "SharedConv1d(6, 6, 3, groups=3)" in texts
    info = draw_layer(nn.Conv2d(3, 4, (3, 1)), title="mine")
    texts = [t.get_text() for t in info.fig.findobj(Text)]
    assert "mine" in texts
    assert any("weight (4, 3, 3, 1), bias (4,): 40 parameters" in t for t in texts)


# --------------------------------------------------------------------------- draw_scheme


def test_scheme_a_and_b():
    a = draw_scheme("A", in_channels=3, out_channels=2)
    assert (a.kernel_glyphs, a.distinct_kernels, a.sum_nodes) == (6, 2, 2)
    b = draw_scheme("B", in_channels=3, out_channels=2)
    assert (b.kernel_glyphs, b.distinct_kernels, b.sum_nodes) == (2, 2, 1)
    for info in (a, b):
        assert info.weight_shape == (2, 1, 3, 3) and info.n_params == 18
        assert info.colors == 2 and not info.elided
        _assert_renders(info.fig)
    assert set(a.tiles.values()) == set(b.tiles.values()) == {0, 1}
    assert set(b.tiles) == {(0, None), (1, None)}


def _tile_colors(info) -> dict[str, tuple]:
    """Label text of each tile -> its face colour (tiles are the rounded patches)."""
    from matplotlib.patches import FancyBboxPatch

    patches = [p for p in info.ax.patches if isinstance(p, FancyBboxPatch)]
    texts = [t for t in info.ax.texts if re.fullmatch(r"w\d+", t.get_text())]
    assert len(patches) == len(texts)
    pairs = zip(patches, texts, strict=True)
    return {t.get_text(): tuple(p.get_facecolor()) for p, t in pairs}


def test_a_kernel_has_the_same_colour_in_both_schemes():
    a, b = _tile_colors(draw_scheme("A", 4, 3)), _tile_colors(draw_scheme("B", 4, 3))
    assert a == b and len(set(a.values())) == 3


@pytest.mark.parametrize("scheme", ["A", "B"])
def test_schemes_elide_large_counts(scheme):
    info = draw_scheme(scheme, in_channels=40, out_channels=30)
    assert info.elided and info.inputs_shown == 6 and info.outputs_shown == 6
    assert info.total_distinct == 30
    assert info.total_kernels == (1200 if scheme == "A" else 30)
    assert info.kernel_glyphs == (36 if scheme == "A" else 6)
    _assert_renders(info.fig)


# --------------------------------------------------------------------------- weights, features


def test_show_weights_shows_a_shared_bank_once():
    layer = sharedconv.SharedConv2d(6, 8, 3, groups=2)
    bank = show_weights(layer)
    assert bank.shared and bank.groups == 2
    assert bank.kernels_shown == bank.total_kernels == 4 * 3
    copies = show_weights(layer.to_conv())
    assert not copies.shared and copies.kernels_shown == 2 * 4 * 3
    assert bank.vmax == pytest.approx(layer.weight.detach().abs().max().item())
    texts = " ".join(t.get_text() for t in bank.fig.findobj(Text))
    assert "used by all 2 groups" in texts
    for info in (bank, copies):
        _assert_renders(info.fig)


@pytest.mark.parametrize(
    "obj, shown, total, elided",
    [
        (sharedconv.SharedConv1d(3, 6, 5, groups=3), 2, 2, False),
        (nn.Conv1d(6, 6, 3, groups=3), 12, 12, False),
        (torch.randn(50, 100, 3), 12, 5000, True),
        (nn.Conv2d(3, 4, 3), 12, 12, False),
        (torch.randn(40, 20, 5, 5), 12 * 8, 800, True),
    ],
    ids=["shared1d", "grouped1d", "tensor1d-big", "conv2d", "tensor2d-big"],
)
def test_show_weights_counts(obj, shown, total, elided):
    info = show_weights(obj)
    assert (info.kernels_shown, info.total_kernels, info.elided) == (shown, total, elided)
    _assert_renders(info.fig)


def test_show_weights_labels_groups_of_a_tensor():
    info = show_weights(torch.randn(6, 2, 3), groups=3)
    labels = [t.get_text() for t in info.fig.findobj(Text)]
    assert {"group 0", "group 1", "group 2"} <= set(labels)


@pytest.mark.parametrize("shape, streams, features, elided",
                         [((2, 12, 40), 3, 4, False), ((1, 120, 30), 4, 8, True),
                          ((2, 12, 9, 9), 3, 4, False), ((1, 60, 8, 8), 4, 8, True)])
def test_show_feature_maps(shape, streams, features, elided):
    groups = 3 if shape[1] == 12 else 10 if shape[1] == 120 else 5
    info = show_feature_maps(torch.randn(shape), groups=groups, sample=shape[0] - 1)
    assert (info.streams_shown, info.features_shown, info.elided) == (streams, features, elided)
    assert info.groups == groups and info.features_per_stream == shape[1] // groups
    _assert_renders(info.fig)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: draw_layer(nn.Linear(3, 4)), TypeError, "nn.Conv1d/2d/3d.*got Linear"),
        (lambda: draw_layer(nn.ConvTranspose2d(3, 4, 3)), TypeError, "got ConvTranspose2d"),
        (lambda: draw_layer(torch.randn(4, 3, 3)), TypeError, "got Tensor"),
        (lambda: draw_layer(nn.Conv2d(3, 4, 3), max_channels=1), ValueError, "at least 2"),
        (lambda: draw_layer(nn.Conv2d(3, 4, 3), max_channels=6.0), TypeError, "got float"),
        (lambda: draw_layer(nn.Conv2d(3, 4, 3), max_channels=True), TypeError, "got bool"),
        (lambda: draw_layer(nn.Conv2d(3, 4, 3), ax="left"), TypeError, "Axes or None, got str"),
        (lambda: draw_layer(nn.Conv2d(3, 4, 3), title=3), TypeError, "title must be a str"),
        (lambda: draw_scheme("C"), ValueError, "'A'.*'B'.*got 'C'"),
        (lambda: draw_scheme("a"), ValueError, "got 'a'"),
        (lambda: draw_scheme(1), ValueError, "got 1"),
        (lambda: draw_scheme("A", in_channels=0), ValueError, "in_channels must be at least 1"),
        (lambda: draw_scheme("B", out_channels="2"), TypeError, "out_channels must be an int"),
        (lambda: draw_scheme("A", kernel_size=0), ValueError, "kernel_size"),
        (lambda: show_weights(nn.Conv3d(2, 2, 3)), ValueError, "3-d kernels"),
        (lambda: show_weights(nn.Conv1d(2, 2, 3), groups=2), ValueError, "read from the layer"),
        (lambda: show_weights(torch.ones(4, 2, 3, dtype=torch.int64)), TypeError, "floating"),
        (lambda: show_weights(torch.randn(4, 3)), ValueError, r"got shape \(4, 3\)"),
        (lambda: show_weights(torch.randn(6, 2, 3), groups=4), ValueError, "not divisible"),
        (lambda: show_weights(nn.Conv1d(2, 2, 3, device="meta")), ValueError, "meta"),
        (lambda: show_weights([1, 2, 3]), TypeError, "got list"),
        (lambda: show_weights(nn.Conv1d(2, 2, 3), max_rows=1), ValueError, "max_rows"),
        (lambda: show_feature_maps([1.0], groups=1), TypeError, "must be a Tensor"),
        (lambda: show_feature_maps(torch.ones(1, 4, 5, dtype=torch.int32), 2), TypeError,
         "floating"),
        (lambda: show_feature_maps(torch.randn(4, 5), 2), ValueError, "batched"),
        (lambda: show_feature_maps(torch.randn(1, 6, 5), 4), ValueError, "does not divide"),
        (lambda: show_feature_maps(torch.randn(1, 6, 5), 0), ValueError, "groups"),
        (lambda: show_feature_maps(torch.randn(2, 6, 5), 3, sample=2), ValueError,
         "out of range"),
        (lambda: show_feature_maps(torch.randn(2, 6, 5), 3, max_streams=1), ValueError,
         "max_streams"),
    ],
)
def test_bad_arguments_get_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
    assert plt.get_fignums() == [], "the error came before any figure was made"


def test_import_sharedconv_does_not_import_matplotlib():
    code = ("import sys, sharedconv, sharedconv.lab.diagrams; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_group_layer_is_drawn_as_one_group():
    """A layer that reads G from its input is drawn with its one bank (one group)."""
    from sharedconv import SharedConv1d
    from sharedconv.lab import diagrams

    layer = SharedConv1d.per_group(2, 3, 5)
    info = diagrams.draw_layer(layer)
    assert (info.total_kernels, info.total_distinct) == (6, 6)
    assert info.weight_shape == (3, 2, 5)
    shown = diagrams.show_weights(layer)
    assert shown.total_kernels == 6
    import matplotlib.pyplot as plt

    plt.close("all")
