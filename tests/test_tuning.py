"""sharedconv.autotune: every strategy is correct, the fastest is picked, the cache works.

No test times anything for real: a fake timer (``tuning.timer``) decides which strategy
is fastest, so the tests check the machinery, not this machine.
"""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNELS, SHARED, SIZES, assert_matches_grouped_conv, cuda, tied_conv
from torch.utils._python_dispatch import TorchDispatchMode

import sharedconv
from sharedconv import tuning
from sharedconv.lab.memory import saved_tensors


@pytest.fixture(autouse=True)
def _fresh_tuner(monkeypatch):
    tuning.clear_cache()
    monkeypatch.setattr(tuning, "timer", _refuse)
    yield
    tuning.clear_cache()
    tuning.enable(False)


def _refuse(candidates, device, part):
    pytest.fail(f"timed {part} ({sorted(candidates)}) where nothing should be timed")


class Forced:
    """A fake timer: the strategy named for a part is fastest; records what it was asked.

    ``step`` is what wins the whole-step comparison that follows the parts' choices:
    ``"plan"`` (the parts as chosen; where they are one strategy for every part, that
    strategy), ``"fold"``, or a strategy for every part.
    """

    def __init__(self, forward="fold", input_grad="fold", weight_grad="fold", step="plan",
                 bias_grad="fold"):
        self.want = {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad,
                     "bias_grad": bias_grad, "step": step}
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, candidates, device, part):
        self.asked.append((part, tuple(candidates)))
        want = self.want[part]
        if part == "step" and want == "plan" and "plan" not in candidates:
            want = self.want["forward"]  # the parts are one strategy: that one
        return {n: 1e-3 if n == want else 2e-3 for n in candidates}


class ConvGroups(TorchDispatchMode):
    """Records the ``groups`` argument of every convolution, and counts matrix products."""

    def __init__(self):
        super().__init__()
        self.groups, self.products = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in ("aten::convolution", "aten::convolution_backward"):
            self.groups.append(args[-1] if name == "aten::convolution" else args[-2])
        if name in ("aten::bmm", "aten::baddbmm"):
            self.products += 1
        return func(*args, **(kwargs or {}))


def _combos(dim):
    names = tuning.STRATEGIES if dim == 1 else ("fold", "grouped")
    return list(itertools.product(names, repeat=3))


CASES = [(dim, combo, options) for dim in (1, 2, 3) for combo in _combos(dim)
         for options in ({"stride": 1, "padding": "same", "dilation": 1},
                         {"stride": 2, "padding": 2, "dilation": 2, "padding_mode": "reflect"})]


@pytest.mark.parametrize("dim,combo,options", CASES,
                         ids=[f"{d}d-{'-'.join(c)}-s{o['stride']}" for d, c, o in CASES])
@pytest.mark.parametrize("bias", ["fold", "sum", None])
def test_every_strategy_equals_tied_grouped_conv(dim, combo, options, bias, monkeypatch):
    forced = Forced(*combo, bias_grad=bias)
    monkeypatch.setattr(tuning, "timer", forced)
    torch.manual_seed(0)
    G, D, F_out = 3, 2, 4
    layer = SHARED[dim](G * D, G * F_out, KERNELS[dim], groups=G, bias=bias is not None,
                        dtype=torch.float64, **options)
    x = torch.randn(2, G * D, *(s + 4 for s in SIZES[dim]), dtype=torch.float64)
    with sharedconv.autotune():
        assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
        (choice,) = tuning.cache().values()
        assert (choice.forward, choice.input_grad, choice.weight_grad) == combo
        # the bias: in the bank's call or by its own sum (unfold's bank has no call)
        bias_way = bias and ("sum" if combo[2] == "unfold" else bias)
        assert choice.bias_grad == bias_way
        # autograd keeps the (padded) input and the one bank, as the bare fold does
        x_grad = x.clone().requires_grad_()
        tuned = saved_tensors(layer, x_grad, exclude=[layer.weight])
    fold = saved_tensors(layer, x_grad, exclude=[layer.weight])
    assert tuned.nbytes == fold.nbytes > 0 and tuned.count == fold.count
    # then whole steps: the fold's, each other strategy's and the parts' plan
    timed_bias = bias is not None and combo[2] != "unfold"
    assert [part for part, _ in forced.asked] == [
        *tuning.PARTS[:3], *["bias_grad"] * timed_bias, "step"]
    plans = dict(forced.asked)["step"]
    uniform = len(set(combo)) == 1 and bias_way in (None, "sum" if combo[0] == "unfold"
                                                    else "fold")
    assert plans[:2] == ("fold", "grouped") and ("plan" in plans) == (not uniform)


@pytest.mark.parametrize("strategy", tuning.STRATEGIES)
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("bias_grad", tuning.BIAS_STRATEGIES)
def test_gradcheck_and_gradgradcheck_per_strategy(strategy, dim, bias_grad, monkeypatch):
    if strategy == "unfold" and dim != 1:
        pytest.skip("unfold is a 1-d strategy")
    monkeypatch.setattr(tuning, "timer", Forced(strategy, strategy, strategy,
                                                bias_grad=bias_grad))
    torch.manual_seed(1)
    G, D, F_out = 3, 2, 3
    size = {1: (9,), 2: (5, 6)}[dim]
    x = torch.randn(2, G * D, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(F_out, D, *KERNELS[dim], dtype=torch.float64, requires_grad=True)
    b = torch.randn(F_out, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return sharedconv.shared_conv(x, w, b, groups=G, stride=2, padding=1, dilation=1)

    with sharedconv.autotune():
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
    choices = {(c.forward, c.input_grad, c.weight_grad) for c in tuning.cache().values()}
    assert (strategy,) * 3 in choices


@pytest.mark.parametrize("times,expected", [
    ({"fold": 3.0, "grouped": 1.0, "unfold": 2.0}, "grouped"),
    ({"fold": 3.0, "grouped": 2.0, "unfold": 1.0}, "unfold"),
    ({"fold": 1.0, "grouped": 2.0, "unfold": 3.0}, "fold"),
    ({"fold": 1.0, "grouped": 1.0, "unfold": 1.0}, "fold"),  # a tie keeps the fold
])
def test_the_fastest_strategy_is_picked_and_run(times, expected, monkeypatch):
    monkeypatch.setattr(tuning, "timer", lambda c, device, part: {n: times[n] for n in c})
    G = 4
    x = torch.randn(2, G, 50)
    w = torch.randn(8, 1, 3)
    with sharedconv.autotune(), torch.no_grad():
        y = sharedconv.shared_conv(x, w, groups=G, padding=1)
        with ConvGroups() as seen:  # the second call runs the cached choice
            y2 = sharedconv.shared_conv(x, w, groups=G, padding=1)
    (choice,) = tuning.cache().values()
    assert choice.forward == expected and choice.timings["forward"] == times
    ran = {"fold": ([1], 0), "grouped": ([G], 0), "unfold": ([], 1)}[expected]
    assert (seen.groups, seen.products) == ran
    ref = F.conv1d(x, w.repeat(G, 1, 1), padding=1, groups=G)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y2, ref)


def test_backward_parts_are_chosen_each_by_its_own_timing(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold", "grouped", "fold"))
    G = 4
    x = torch.randn(2, G, 50, requires_grad=True)
    w = torch.randn(8, 1, 3, requires_grad=True)
    with sharedconv.autotune():
        sharedconv.shared_conv(x, w, groups=G, padding=1).sum().backward()
        with ConvGroups() as seen:
            sharedconv.shared_conv(x, w, groups=G, padding=1).sum().backward()
    # forward: one batched product; input gradient: a grouped convolution's backward;
    # weight gradient: the folded one's
    assert seen.products == 1 and seen.groups == [G, 1]


def test_a_choice_is_reused_for_its_key_and_redone_for_a_new_one(monkeypatch):
    forced = Forced("grouped", "fold", "fold")
    monkeypatch.setattr(tuning, "timer", forced)
    layer = sharedconv.SharedConv1d(4, 16, 3, groups=4, padding=1)
    x = torch.randn(2, 4, 30)
    with sharedconv.autotune():
        for _ in range(3):
            layer(x).sum().backward()
        # once each, and the plan (grouped forward) checked as a whole step once
        assert [p for p, _ in forced.asked] == ["forward", "weight_grad", "bias_grad", "step"]
        with torch.no_grad():  # no gradient needed: a key of its own
            layer(x)
            layer(x)
        assert len(forced.asked) == 5
        layer(torch.randn(3, 4, 30)).sum().backward()  # another batch size
        assert len(forced.asked) == 9
        layer(x.detach().requires_grad_()).sum().backward()  # the input's gradient too
        assert len(forced.asked) == 14
        before = torch.get_num_threads()
        torch.set_num_threads(1 if before > 1 else 2)
        try:
            with torch.no_grad():
                layer(x)
        finally:
            torch.set_num_threads(before)
        assert len(forced.asked) == 15
    keys = list(tuning.cache())
    assert len(keys) == 5 and len(set(keys)) == 5
    assert {k.needs for k in keys} == {(False, True, True), (False, False, False),
                                       (True, True, True)}


def test_candidates_stay_within_the_memory_bound():
    # the folded input (B * G, D, *S): G copies of the bank may not outgrow both the input
    # and the output, one sample's windows not the input
    o = tuning._Options(4096, (1,), (15,), (1,))
    x = torch.empty(2 * 4096, 8, 32, device="meta")  # thousands of groups, a wide kernel
    w = torch.empty(16, 8, 31, device="meta")  # 4096 banks: 16.3 M > 2.1 M in, 4.2 M out
    assert tuning._candidates(x, w, o) == ("fold", "unfold")
    wider = torch.empty(2 * 4096, 8, 128, device="meta")  # 8.4 M in, 16.8 M out
    assert "grouped" in tuning._candidates(wider, w, o)
    small = tuning._Options(4, (1,), (0,), (1,))
    assert tuning._candidates(torch.empty(4, 1, 40), torch.empty(8, 1, 3), small) == (
        "fold", "grouped", "unfold")
    # 4 copies of 24 weights: more than the 40 inputs, fewer than the 4 * 8 * 8 outputs
    assert "grouped" in tuning._candidates(torch.empty(4, 1, 10), torch.empty(8, 1, 3), small)
    # 4 copies of 18 weights: more than the 48 inputs and the 4 * 2 * 4 outputs
    assert tuning._candidates(torch.empty(4, 1, 12), torch.empty(2, 1, 9), small) == (
        "fold", "unfold")
    # a kernel longer than the input: an empty output, nothing but the fold
    assert tuning._candidates(torch.empty(4, 1, 10), torch.empty(1, 1, 11), small) == (
        "fold",)
    # one sample's windows larger than the whole input
    assert "unfold" not in tuning._candidates(torch.empty(4, 1, 40), torch.empty(8, 1, 30),
                                              small)
    two_d = tuning._Options(4, (1, 1), (0, 0), (1, 1))
    assert tuning._candidates(torch.empty(4, 1, 8, 8), torch.empty(2, 1, 3, 3), two_d) == (
        "fold", "grouped")
    one = tuning._Options(1, (1, 1), (0, 0), (1, 1))
    assert tuning._candidates(torch.empty(1, 4, 8, 8), torch.empty(2, 4, 3, 3), one) == (
        "fold",)


def test_one_candidate_is_not_timed():
    layer = sharedconv.SharedConv2d(3, 8, 3, padding=1)  # groups=1: nothing but the fold
    with sharedconv.autotune():
        layer(torch.randn(2, 3, 8, 8)).sum().backward()
    (choice,) = tuning.cache().values()
    assert choice.is_fold((True, True, True)) and choice.tuning_s == {}


@pytest.mark.parametrize("where", ["vmap", "jvp", "jit_trace", "autocast", "fake",
                                   "flop_counter"])
def test_the_fold_runs_under_transforms_and_modes(where):
    layer = sharedconv.SharedConv1d(4, 16, 3, groups=4, padding=1)
    x = torch.randn(2, 4, 30)
    ref = layer.to_conv()(x)
    with sharedconv.autotune():
        if where == "vmap":
            out = torch.func.vmap(layer)(x[None])[0]
        elif where == "jvp":
            out = torch.func.jvp(layer, (x,), (torch.ones_like(x),))[0]
        elif where == "jit_trace":
            # (check_trace would also run the layer eagerly, where tuning may time)
            with warnings.catch_warnings():  # deprecated, and it specialises the checks
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                out = torch.jit.trace(layer, (x,), check_trace=False)(x)
        elif where == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x).float()
            ref = ref.bfloat16().float()
        elif where == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                out = layer(mode.from_tensor(x))
            assert out.shape == ref.shape
            out = ref
        else:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                out = layer(x)
            assert counter.get_total_flops() == 2 * 2 * 16 * 30 * 3
    tol = dict(rtol=2e-2, atol=2e-2) if where == "autocast" else {}
    torch.testing.assert_close(out, ref, **tol)
    assert tuning.cache() == {}


def test_a_cached_choice_is_used_under_a_dispatch_mode(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold"))
    x, w = torch.randn(2, 4, 30), torch.randn(8, 1, 3)
    with sharedconv.autotune(), torch.no_grad():
        sharedconv.shared_conv(x, w, groups=4)
        monkeypatch.setattr(tuning, "timer", _refuse)
        with ConvGroups() as seen:
            sharedconv.shared_conv(x, w, groups=4)
    assert seen.products == 1 and seen.groups == []


def test_cache_saves_and_loads_and_loaded_choices_are_not_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("grouped", "unfold", "grouped"))
    layer = sharedconv.SharedConv1d(4, 16, 3, groups=4, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 30, dtype=torch.float64, requires_grad=True)
    with sharedconv.autotune():
        layer(x).sum().backward()
    path = tmp_path / "choices.json"
    tuning.save_cache(path)
    saved = json.loads(path.read_text())
    assert len(saved) == 1
    assert saved[0]["key"]["bank"] == [4, 1, 3] and saved[0]["key"]["groups"] == 4
    assert (saved[0]["forward"], saved[0]["input_grad"]) == ("grouped", "unfold")
    assert set(saved[0]["timings"]["forward"]) == {"fold", "grouped", "unfold"}
    before = tuning.cache()
    tuning.clear_cache()
    assert tuning.cache() == {}
    assert tuning.load_cache(path) == 1
    assert tuning.cache() == before
    monkeypatch.setattr(tuning, "timer", _refuse)
    with sharedconv.autotune():
        assert_matches_grouped_conv(layer, x, rtol=1e-12, atol=1e-12)
    saved[0]["forward"] = "magic"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="unknown strategy 'magic'"):
        tuning.load_cache(path)


def test_switches_nest_and_restore():
    assert not tuning.is_enabled()
    with sharedconv.autotune():
        assert tuning.is_enabled()
        with sharedconv.autotune(False):
            assert not tuning.is_enabled()
        assert tuning.is_enabled()
    assert not tuning.is_enabled()
    tuning.enable()
    assert tuning.is_enabled()
    with pytest.raises(RuntimeError), sharedconv.autotune(False):
        raise RuntimeError
    assert tuning.is_enabled()
    tuning.enable(False)

    @sharedconv.autotune()
    def decorated():
        return tuning.is_enabled()

    assert decorated() and not tuning.is_enabled()


def test_default_is_the_fold_without_tuning():
    layer = sharedconv.SharedConv1d(4, 16, 3, groups=4, padding=1)
    with ConvGroups() as seen:
        layer(torch.randn(2, 4, 30, requires_grad=True)).sum().backward()
    assert seen.groups == [1, 1] and seen.products == 0 and tuning.cache() == {}


def test_measure_calls_each_candidate_interleaved():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = tuning.measure(candidates, torch.device("cpu"), rounds=3)
    assert set(times) == {"a", "b"}
    assert all(len(s) == 3 and min(s) >= 0 for s in times.values())  # one sample a round
    # a warm-up sample each, in order (an untimed call, then timed ones), then 3 samples
    # of an untimed call and timed calls each
    assert calls[:2] == ["a", "a"] and calls.count("a") >= 2 + 3 * 2
    assert calls.count("b") >= 2 + 3 * 2


@pytest.mark.parametrize("needs", ["x", "w", "b", "wb", "xb"])
def test_only_the_needed_gradients_are_computed(needs, monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold", "unfold", "grouped"))
    torch.manual_seed(12)
    x = torch.randn(2, 8, 30, dtype=torch.float64, requires_grad="x" in needs)
    w = torch.randn(8, 1, 3, dtype=torch.float64, requires_grad="w" in needs)
    b = torch.randn(8, dtype=torch.float64, requires_grad="b" in needs)
    with sharedconv.autotune():
        y = sharedconv.shared_conv(x, w, b, groups=8, padding=1)
        leaves = [t for t in (x, w, b) if t.requires_grad]
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, leaves, g)
    (choice,) = tuning.cache().values()
    assert (choice.input_grad is not None) == ("x" in needs)
    assert (choice.weight_grad is not None) == ("w" in needs)
    ref = F.conv1d(x, w.repeat(8, 1, 1), b.repeat(8), padding=1, groups=8)
    torch.testing.assert_close(y, ref)
    for a, e in zip(got, torch.autograd.grad(ref, leaves, g), strict=True):
        torch.testing.assert_close(a, e)


def test_unbatched_and_strided_inputs(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold", "grouped", "unfold"))
    layer = sharedconv.SharedConv1d(6, 12, 3, groups=3, padding=1, dtype=torch.float64)
    transposed = torch.randn(2, 40, 6, dtype=torch.float64).transpose(1, 2)  # folds by a copy
    strided = torch.randn(2, 6, 80, dtype=torch.float64)[..., ::2]  # folds to a strided view
    with sharedconv.autotune():
        assert_matches_grouped_conv(layer, transposed, rtol=1e-12, atol=1e-12)
        # (the helper clones its input, which makes a gappy tensor contiguous)
        torch.testing.assert_close(layer(strided), tied_conv(layer)(strided))
        x = torch.randn(6, 40, dtype=torch.float64)
        torch.testing.assert_close(layer(x), tied_conv(layer)(x))
    assert {k.layout for k in tuning.cache()} == {"strided", "contiguous"}


def test_unfold_in_chunks_equals_one_chunk(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold", "unfold", "unfold"))
    monkeypatch.setattr(tuning, "_CHUNK_BYTES", 100)  # a few samples per chunk
    assert len(tuning._chunks(6, 2 * 3 * 13 * 8, torch.empty(1))) == 6
    layer = sharedconv.SharedConv1d(6, 24, 3, groups=3, stride=2, dilation=2, padding=2,
                                    dtype=torch.float64)
    with sharedconv.autotune():
        assert_matches_grouped_conv(layer, torch.randn(5, 6, 41, dtype=torch.float64),
                                    rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_strategies_against_float64(dtype, monkeypatch):
    for strategy in tuning.STRATEGIES:
        tuning.clear_cache()
        monkeypatch.setattr(tuning, "timer", Forced(strategy, strategy, strategy))
        torch.manual_seed(14)
        x = torch.randn(4, 16, 200, dtype=dtype, requires_grad=True)
        w = torch.randn(8, 1, 5, dtype=dtype, requires_grad=True)
        with sharedconv.autotune():
            y = sharedconv.shared_conv(x, w, groups=16, padding=2)
            g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
            gx, gw = torch.autograd.grad(y, (x, w), g)
        x64 = x.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        ref = F.conv1d(x64, w64.repeat(16, 1, 1), padding=2, groups=16)
        gx_ref, gw_ref = torch.autograd.grad(ref, (x64, w64), g.double())
        tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                              atol=1e-5)
        assert y.dtype == gx.dtype == gw.dtype == dtype
        torch.testing.assert_close(y.double(), ref, **tol)
        torch.testing.assert_close(gx.double(), gx_ref, **tol)
        scale = gw_ref.abs().max()  # a sum of 4 x 16 x 200 products: relative to its size
        torch.testing.assert_close(gw.double() / scale, gw_ref / scale, **tol)


@cuda
@pytest.mark.parametrize("strategy", tuning.STRATEGIES)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_strategies_on_cuda(strategy, dim, monkeypatch):
    if strategy == "unfold" and dim != 1:
        pytest.skip("unfold is a 1-d strategy")
    monkeypatch.setattr(tuning, "timer", Forced(strategy, strategy, strategy))
    torch.manual_seed(3)
    layer = SHARED[dim](6, 12, KERNELS[dim], groups=3, padding=1, dtype=torch.float64,
                        device="cuda")
    x = torch.randn(3, 6, *SIZES[dim], dtype=torch.float64, device="cuda")
    with sharedconv.autotune():
        assert_matches_grouped_conv(layer, x, rtol=1e-10, atol=1e-10)
    (choice,) = tuning.cache().values()
    assert choice.forward == strategy


@cuda
def test_real_timer_on_cuda_picks_a_candidate():
    layer = sharedconv.SharedConv1d(64, 64 * 16, 5, groups=64, padding=2, device="cuda")
    tuning.timer = tuning.measure
    try:
        with sharedconv.autotune():
            layer(torch.randn(8, 64, 512, device="cuda")).sum().backward()
    finally:
        tuning.timer = _refuse
    (choice,) = tuning.cache().values()
    assert {choice.forward, choice.input_grad, choice.weight_grad} <= set(tuning.STRATEGIES)
    assert set(choice.timings["forward"]) == {"fold", "grouped", "unfold"}


@pytest.mark.parametrize("samples,expected", [
    # a clear win: grouped's slowest sample beats the fold's fastest, by far more than 5 %
    ({"fold": [10, 10.2, 10.1, 9.9, 10], "grouped": [7, 7.1, 6.9, 7, 7.2]}, "grouped"),
    # a win of 8 % in the medians, within the fold's spread (interquartile range 1.5)
    ({"fold": [8, 10, 10, 11.5, 12], "grouped": [9.2, 9.2, 9.2, 9.2, 9.2]}, "fold"),
    # a steady win of 3 %: beyond the spread, below the 5 % margin
    ({"fold": [10, 10, 10, 10, 10], "grouped": [9.7, 9.7, 9.7, 9.7, 9.7]}, "fold"),
    # the fold fastest
    ({"fold": [5, 5, 5], "grouped": [6, 6, 6], "unfold": [7, 7, 7]}, "fold"),
    # of two winners the faster
    ({"fold": [10] * 5, "grouped": [8] * 5, "unfold": [6] * 5}, "unfold"),
])
def test_a_strategy_is_chosen_only_for_a_win_beyond_spread_and_margin(samples, expected):
    best, medians, spreads = tuning._decide(samples)
    assert best == expected
    assert set(medians) == set(spreads) == set(samples) and min(spreads.values()) >= 0


def test_a_plan_that_loses_the_whole_step_goes_back_to_the_fold(monkeypatch):
    forced = Forced("unfold", "grouped", "grouped", step="fold")
    monkeypatch.setattr(tuning, "timer", forced)
    layer = sharedconv.SharedConv1d(4, 16, 3, groups=4, padding=1)
    x = torch.randn(2, 4, 30, requires_grad=True)
    with sharedconv.autotune():
        layer(x).sum().backward()
        (choice,) = tuning.cache().values()
        assert (choice.forward, choice.input_grad, choice.weight_grad) == ("fold",) * 3
        assert set(choice.timings["step"]) == {"fold", "grouped", "unfold", "plan"}
        with ConvGroups() as seen:  # from now on, the bare fold's one call each way
            layer(x).sum().backward()
    assert seen.groups == [1, 1] and seen.products == 0
    assert [p for p, _ in forced.asked] == [*tuning.PARTS, "step"]
