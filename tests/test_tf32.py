"""``sharedconv.lab.tf32``: TF32's operand rounding, emulated on any device."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharedconv.lab.tf32 import emulate_tf32, round_tf32

ROOT = Path(__file__).resolve().parents[1]


def test_rounding_keeps_ten_mantissa_bits():
    step = 2.0**-10  # one unit in TF32's last place, at 1
    x = torch.tensor([1 + step / 2, 1 + step / 4, -(1 + step / 2), 1 + step - 2.0**-23,
                      3.0, 0.0])
    assert round_tf32(x).tolist() == [1 + step, 1.0, -(1 + step), 1 + step, 3.0, 0.0]
    assert round_tf32(x, "truncate").tolist() == [1.0, 1.0, -1.0, 1.0, 3.0, 0.0]
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = round_tf32(special)
    assert out[:2].tolist() == special[:2].tolist() and out[2].isnan()
    assert round_tf32(torch.tensor([3.4028235e38])).isinf().all()  # rounds past the top


def test_rounded_values_are_tf32_and_within_half_a_step():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e3
    for rounding, bound in (("nearest", 2.0**-11), ("truncate", 2.0**-10)):
        r = round_tf32(x, rounding)
        assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
        rel = ((r.double() - x.double()).abs() / x.double().abs()).max()
        assert 0 < rel <= bound


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="float32 tensor, got torch.float64"):
        round_tf32(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="rounding must be one of"):
        round_tf32(torch.zeros(2), "down")
    with pytest.raises(ValueError, match="rounding must be one of"):
        emulate_tf32("down")


def test_convolutions_round_their_operands_forward_and_backward():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    delta = torch.randn(2, 4, 36, generator=gen)
    with emulate_tf32() as mode:
        y = F.conv1d(x, w)
        gx, gw = torch.autograd.grad(y, (x, w), delta)
    assert mode.rounded_calls == 2  # the forward and convolution_backward
    xr, wr, dr = (round_tf32(t.detach()) for t in (x, w, delta))
    torch.testing.assert_close(y, F.conv1d(xr, wr), rtol=0, atol=0)
    torch.testing.assert_close(gx, torch.nn.grad.conv1d_input(x.shape, wr, dr),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, torch.nn.grad.conv1d_weight(xr, w.shape, dr),
                               rtol=1e-6, atol=1e-6)
    exact = F.conv1d(x.double(), w.double())
    err = (y.double() - exact).abs().max() / exact.abs().max()
    assert err > 1e-5  # far above float32's rounding: the emulation changes results


def test_it_follows_pytorchs_switches():
    x, w = torch.randn(1, 2, 16), torch.randn(3, 2, 3)
    with emulate_tf32() as mode, torch.backends.cudnn.flags(enabled=True,
                                                             allow_tf32=False):
        y = F.conv1d(x, w)
    assert mode.rounded_calls == 0
    torch.testing.assert_close(y, F.conv1d(x, w), rtol=0, atol=0)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with emulate_tf32() as mode:  # matrix products: TF32 is off by default
        a @ b
    assert mode.rounded_calls == 0
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with emulate_tf32() as mode:
            p = a @ b
        assert mode.rounded_calls == 1
        torch.testing.assert_close(p, round_tf32(a) @ round_tf32(b), rtol=0, atol=0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with emulate_tf32() as mode:  # float64 passes untouched
        F.conv1d(x.double(), w.double())
    assert mode.rounded_calls == 1


def test_every_margin_run_edits_its_chapter():
    """``dev.py margins`` re-runs chapters with text edits: each edit must still match."""
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    books = {p.name[:2]: p for p in dev.toc_notebooks()}
    for chapter, runs in dev.MARGIN_RUNS.items():
        code = "".join("".join(c["source"]) for c in json.loads(books[chapter].read_text())
                       ["cells"] if c["cell_type"] == "code")
        for edits in runs:
            for old, _ in edits:
                assert code.count(old) == 1, (chapter, old)
