"""The tuner is safe: recomputation, dispatch modes, threads, hostile cache files, compiled
code, a bounded cache and varying lengths. Most tests decide the timings with a fake timer;
the stress test at the end times for real, from several threads at once."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch
from conftest import tied_conv
from test_tuning import (
    ConvGroups,
    Forced,
    _fresh_tuner,  # noqa: F401 - autouse: a fresh cache, no timing
    _refuse,
)
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import sharedconv
from sharedconv import tuning

PLANS = [("fold", "fold", "fold"), ("unfold", "grouped", "fold"),
         ("grouped", "grouped", "grouped"), ("fold", "unfold", "unfold")]


def _layer(**options):
    torch.manual_seed(0)
    return sharedconv.SharedConv1d(8, 24, 3, groups=4, padding=1, dtype=torch.float64,
                                   **options)


def _grads(layer, x, fn):
    """``fn(layer, x)``'s loss back-propagated: the input's and the layer's gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    fn(layer, x).backward()
    return [x.grad, layer.weight.grad, layer.bias.grad]


def _two_calls(layer, x):
    y = checkpoint(layer, x, use_reentrant=False) + checkpoint(layer, x, use_reentrant=False)
    return (y * y).sum()


@pytest.mark.parametrize("plan", PLANS, ids=["-".join(p) for p in PLANS])
def test_checkpointing_inside_and_across_the_block(plan, monkeypatch):
    """Two checkpointed calls of one key in a block; a checkpointed forward in the block
    and its backward (the recomputation) after it; and the other way round."""
    monkeypatch.setattr(tuning, "timer", Forced(*plan))
    layer, x = _layer(), torch.randn(2, 8, 20, dtype=torch.float64)
    expected = _grads(layer, x, _two_calls)
    with sharedconv.autotune():
        inside = _grads(layer, x, _two_calls)
    (choice,) = tuning.cache().values()
    assert (choice.forward, choice.input_grad, choice.weight_grad) == plan
    for got, want in zip(inside, expected, strict=True):
        torch.testing.assert_close(got, want)
    for forward_inside in (True, False):
        layer.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_()
        with sharedconv.autotune(forward_inside):
            y = checkpoint(layer, xg, use_reentrant=False)
        with sharedconv.autotune(not forward_inside):
            (y * y).sum().backward()
        reference = tied_conv(layer)
        xr = x.detach().requires_grad_()
        (reference(xr) ** 2).sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad)


@pytest.mark.parametrize("plan", PLANS[1:], ids=["-".join(p) for p in PLANS[1:]])
def test_retain_graph_and_double_backward_reuse_the_forwards_path(plan, monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced(*plan))
    layer, x = _layer(), torch.randn(2, 8, 20, dtype=torch.float64, requires_grad=True)
    with sharedconv.autotune():
        y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        first = torch.autograd.grad(gx.sum(), layer.weight, retain_graph=True)[0]
        again = torch.autograd.grad(gx.sum(), layer.weight)[0]
    torch.testing.assert_close(first, again)
    ref = tied_conv(layer)
    (gx_ref,) = torch.autograd.grad(ref(x).square().sum(), x, create_graph=True)
    (gw_ref,) = torch.autograd.grad(gx_ref.sum(), ref.weight)
    torch.testing.assert_close(first, gw_ref.unflatten(0, (4, -1)).sum(0))


def test_backward_under_a_counting_mode_times_nothing(monkeypatch):
    """A forward tuned in the block, then a step under FlopCounterMode: the backward parts
    not chosen yet run the fold, untimed, and the count is the fold's."""
    layer = _layer()
    x = torch.randn(2, 8, 20, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(tuning, "timer", Forced("unfold"))
    with sharedconv.autotune():
        layer(x)  # the training key's forward is chosen: unfold; its backward is not
        monkeypatch.setattr(tuning, "timer", _refuse)
        with FlopCounterMode(display=False) as tuned:
            layer(x).sum().backward()
    with FlopCounterMode(display=False) as fold:
        layer(x).sum().backward()
    assert tuned.get_total_flops() == fold.get_total_flops() > 0
    (choice,) = tuning.cache().values()
    assert choice.forward == "unfold" and choice.input_grad is choice.weight_grad is None


def test_backward_under_is_grads_batched_runs_the_fold(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold", "unfold", "unfold"))
    layer, x = _layer(), torch.randn(2, 8, 20, dtype=torch.float64, requires_grad=True)
    with sharedconv.autotune():
        layer(x).sum().backward()  # every part chosen: unfold (in-place additions)
        y = layer(x)
        grads = torch.randn(3, *y.shape, dtype=torch.float64)
        (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True)
    ref = tied_conv(layer)
    yr = ref(x)
    for i in range(3):
        (one,) = torch.autograd.grad(yr, x, grads[i], retain_graph=True)
        torch.testing.assert_close(batched[i], one)


def _in_thread(fn):
    errors = []

    def run():
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_the_switch_is_per_thread(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("grouped"))
    layer = _layer()
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def tuned():
        with sharedconv.autotune():
            inside.set()
            assert outside.wait(10)
            seen["tuned"] = tuning.is_enabled()

    thread, errors = _in_thread(tuned)
    assert inside.wait(10)
    # the main thread never opted in: not tuned while the other thread is in its block
    with torch.no_grad():
        layer(torch.randn(3, 8, 20, dtype=torch.float64))
    seen["main"] = tuning.is_enabled()
    outside.set()
    thread.join()
    assert not errors and seen == {"tuned": True, "main": False}
    assert tuning.cache() == {}


def test_interleaved_blocks_of_two_threads_leave_tuning_off():
    """A enters, B enters, A leaves, B leaves: afterwards no thread is tuned."""
    steps = [threading.Event() for _ in range(4)]
    states = {}

    def a():
        with sharedconv.autotune():
            steps[0].set()
            assert steps[1].wait(10)
        steps[2].set()
        states["a"] = tuning.is_enabled()

    def b():
        assert steps[0].wait(10)
        with sharedconv.autotune():
            steps[1].set()
            assert steps[2].wait(10)
        states["b"] = tuning.is_enabled()

    (ta, ea), (tb, eb) = _in_thread(a), _in_thread(b)
    ta.join()
    tb.join()
    assert not ea and not eb
    assert states == {"a": False, "b": False} and not tuning.is_enabled()


def test_a_forced_choice_stays_in_its_thread(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("unfold"))
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    w = torch.randn(4, 2, 3, dtype=torch.float64)
    forcing, done = threading.Event(), threading.Event()

    def forced():
        with tuning._force(tuning.Choice("grouped", "grouped", "grouped")):
            forcing.set()
            assert done.wait(10)

    thread, errors = _in_thread(forced)
    assert forcing.wait(10)
    with sharedconv.autotune(), torch.no_grad():
        sharedconv.shared_conv(x, w, groups=4)  # tuned here (nothing is, under a mode)
        with ConvGroups() as seen:
            sharedconv.shared_conv(x, w, groups=4)
    done.set()
    thread.join()
    assert not errors
    (choice,) = tuning.cache().values()  # this thread tuned and ran its own choice
    assert choice.forward == "unfold" and seen.groups == [] and seen.products == 1


# ------------------------------------------------------------------------- cache files


def _saved_entry(tmp_path, monkeypatch, dim=1):
    monkeypatch.setattr(tuning, "timer", Forced("grouped", "fold", "grouped",
                                                bias_grad="sum"))
    if dim == 1:
        layer, size = sharedconv.SharedConv1d(4, 8, 3, groups=4), (30,)
    else:
        layer, size = sharedconv.SharedConv2d(4, 8, 3, groups=4), (9, 9)
    x = torch.randn(2, 4, *size, requires_grad=True)
    with sharedconv.autotune():
        layer(x).sum().backward()
    path = tmp_path / "choices.json"
    tuning.save_cache(path)
    tuning.clear_cache()
    (entry,) = json.loads(path.read_text())
    return path, entry


def _hostile(entry):
    """Entries that name what cannot run, or are not entries at all."""
    def edit(**changes):
        out = json.loads(json.dumps(entry))
        for dotted, value in changes.items():
            target = out
            *parents, last = dotted.split("__")
            for name in parents:
                target = target[name]
            if value is _DELETE:
                del target[last]
            else:
                target[last] = value
        return out

    return {
        "a null forward": edit(forward=None),
        "an unknown strategy": edit(weight_grad="magic"),
        "a bias strategy for the bank": edit(bias_grad="grouped"),
        "a bias gradient the key does not need": edit(key__needs=[True, True, False]),
        "unfold for a 2-d key": edit(key__bank=[2, 1, 3, 3], key__input=[8, 1, 9, 9],
                                     key__stride=[1, 1], key__padding=[0, 0],
                                     key__dilation=[1, 1], forward="unfold"),
        "grouped beyond the memory rule": edit(key__groups=4096, key__input=[4096, 1, 3],
                                               key__bank=[64, 1, 3]),
        "a missing key field": edit(key__threads=_DELETE),
        "a key field of the wrong type": edit(key__groups="4"),
        "a gradient the key does not need": edit(key__needs=[False, False, False]),
        "a dtype torch does not have": edit(key__dtype="float99"),
        "a device that is none": edit(key__device="gpu"),
        "timings that are not seconds": edit(timings={"forward": {"fold": "fast"}}),
        "an unknown field": edit(seed=1),
        "not an object": [1, 2],
    }


_DELETE = object()


HOSTILE = ["a null forward", "an unknown strategy", "a bias strategy for the bank",
           "a bias gradient the key does not need", "unfold for a 2-d key",
           "grouped beyond the memory rule", "a missing key field",
           "a key field of the wrong type", "a gradient the key does not need",
           "a dtype torch does not have", "a device that is none",
           "timings that are not seconds", "an unknown field", "not an object"]


@pytest.mark.parametrize("case", HOSTILE)
def test_load_cache_refuses_a_hostile_file_and_adds_nothing(case, tmp_path, monkeypatch):
    path, entry = _saved_entry(tmp_path, monkeypatch)
    cases = _hostile(entry)
    assert list(cases) == HOSTILE
    bad = cases[case]
    tuning.load_cache(path)  # the valid entry alone loads
    assert len(tuning.cache()) == 1
    tuning.clear_cache()
    path.write_text(json.dumps([entry, bad]))  # a valid entry first: all or nothing
    with pytest.raises(ValueError, match=rf"load_cache: {path}, entry 1: "):
        tuning.load_cache(path)
    assert tuning.cache() == {}


@pytest.mark.parametrize("text,what", [
    ("{not json", "cannot read"), ('{"key": 1}', "must hold a JSON list"),
    ("", "cannot read"), ("null", "must hold a JSON list"), ("[1]", "entry 0"),
])
def test_load_cache_refuses_a_malformed_file(text, what, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=what):
        tuning.load_cache(path)
    with pytest.raises(ValueError, match="cannot read"):
        tuning.load_cache(tmp_path / "missing.json")


def test_load_cache_refuses_more_entries_than_the_cache_holds(tmp_path, monkeypatch):
    path, entry = _saved_entry(tmp_path, monkeypatch)
    monkeypatch.setattr(tuning, "CACHE_LIMIT", 1)
    path.write_text(json.dumps([entry, entry]))
    with pytest.raises(ValueError, match="holds 2 entries, more than the cache's limit of 1"):
        tuning.load_cache(path)


def test_save_cache_is_atomic(tmp_path, monkeypatch):
    path, entry = _saved_entry(tmp_path, monkeypatch)
    before = path.read_text()
    tuning.load_cache(path)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        tuning.save_cache(path)
    assert path.read_text() == before  # untouched, and no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]


def test_a_saved_and_loaded_cache_runs_what_it_says(tmp_path, monkeypatch):
    path, entry = _saved_entry(tmp_path, monkeypatch, dim=2)
    monkeypatch.setattr(tuning, "timer", _refuse)
    assert tuning.load_cache(path) == 1
    layer = sharedconv.SharedConv2d(4, 8, 3, groups=4)
    with sharedconv.autotune(), ConvGroups() as seen:
        layer(torch.randn(2, 4, 9, 9, requires_grad=True)).sum().backward()
    assert seen.groups == [4, 1, 4]  # grouped forward, fold input grad, grouped weight grad


# ------------------------------------------------------------------------ compiled code


@pytest.mark.slow
def test_toggling_the_tuner_does_not_recompile():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer = sharedconv.SharedConv1d(8, 16, 3, groups=4, padding=1)
    compiled = torch.compile(layer, backend=backend)
    x = torch.randn(2, 8, 20)
    compiled(x)
    with sharedconv.autotune():
        compiled(x)
    with sharedconv.autotune(dynamic=True):
        compiled(x)
    compiled(x)
    assert len(graphs) == 1
    assert tuning.cache() == {}


# ------------------------------------------------------------------- bound and lengths


def test_the_cache_keeps_the_newest_keys_up_to_its_limit(monkeypatch):
    monkeypatch.setattr(tuning, "timer", Forced("grouped"))
    monkeypatch.setattr(tuning, "CACHE_LIMIT", 3)
    w = torch.randn(4, 2, 3)
    with sharedconv.autotune(), torch.no_grad():
        for length in range(20, 25):
            sharedconv.shared_conv(torch.randn(1, 8, length), w, groups=4)
    assert [key.input[2] for key in tuning.cache()] == [22, 23, 24]


def test_dynamic_sizes_tune_one_key_per_power_of_two(monkeypatch):
    forced = Forced("grouped")
    monkeypatch.setattr(tuning, "timer", forced)
    torch.manual_seed(5)
    w = torch.randn(2, 1, 31)
    with sharedconv.autotune(dynamic=True), torch.no_grad():
        sharedconv.shared_conv(torch.randn(1, 4, 64), w, groups=4, padding=15)  # tuned
        for length in (64, 50, 33):  # one bucket: lengths 33 to 64
            x = torch.randn(1, 4, length)
            with ConvGroups() as seen:  # (under a mode: a cached choice runs, none is made)
                y = sharedconv.shared_conv(x, w, groups=4, padding=15)
            torch.testing.assert_close(y, torch.nn.functional.conv1d(
                x, w.repeat(4, 1, 1), padding=15, groups=4))
            # grouped's copies (4 x 62 weights) fit beside 4 x 64 inputs, not 4 x 33:
            # there the fold runs
            assert seen.groups == ([4] if 4 * 62 <= max(4 * length, 4 * 2 * length)
                                   else [1]), length
        sharedconv.shared_conv(torch.randn(1, 4, 65), w, groups=4, padding=15)
    assert [p for p, _ in forced.asked] == ["forward", "forward"]
    assert [(k.input, k.sizes) for k in tuning.cache()] == [((4, 1, 64), "pow2"),
                                                            ((4, 1, 128), "pow2")]


# --------------------------------------------------------------------------- stress


@pytest.mark.slow
def test_stress_threads_tuning_calling_checkpointing_saving_and_loading(tmp_path):
    """Four threads tune and train at once with the real timer (shapes of their own and
    shared ones, plain and checkpointed), while a fifth saves and reloads the cache and
    a sixth counts FLOPs: every result is right, and nothing raises."""
    tuning.timer = tuning.measure
    try:
        errors: list[BaseException] = []
        stop = threading.Event()
        torch.manual_seed(6)
        layers = [sharedconv.SharedConv1d(8, 16, 3, groups=4, padding=1,
                                          dtype=torch.float64) for _ in range(2)]
        references = [tied_conv(layer) for layer in layers]

        def trainer(index):
            gen = torch.Generator().manual_seed(index)
            with sharedconv.autotune(dynamic=index % 2 == 1):
                for step in range(6):
                    layer, ref = layers[step % 2], references[step % 2]
                    length = (16, 24, 40)[(index + step) % 3]
                    x = torch.randn(2, 8, length, dtype=torch.float64, generator=gen,
                                    requires_grad=True)
                    y = (checkpoint(layer, x, use_reentrant=False) if step % 3 == 0
                         else layer(x))
                    (gx,) = torch.autograd.grad(y.square().sum(), x)
                    xr = x.detach().requires_grad_()
                    (gr,) = torch.autograd.grad(ref(xr).square().sum(), xr)
                    torch.testing.assert_close(gx, gr)

        def saver():
            path = tmp_path / "stress.json"
            while not stop.is_set():
                tuning.save_cache(path)
                tuning.load_cache(path)

        def counter():
            # (a dispatch mode of this thread's own: FlopCounterMode would also hook every
            # module call of the process, the other threads' included)
            layer = layers[0]
            while not stop.is_set():
                # a length no trainer uses: a key only ever met under the mode, so never
                # timed: the fold's one convolution each way
                with sharedconv.autotune(), ConvGroups() as seen:
                    layer(torch.randn(2, 8, 28, dtype=torch.float64)).sum().backward()
                assert seen.groups == [1, 1] and seen.products == 0

        def guarded(fn, *args):
            def run():
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - handed to the test thread
                    errors.append(error)
            return threading.Thread(target=run)

        trainers = [guarded(trainer, i) for i in range(4)]
        helpers = [guarded(saver), guarded(counter)]
        for thread in trainers + helpers:
            thread.start()
        for thread in trainers:
            thread.join(120)
        stop.set()
        for thread in helpers:
            thread.join(60)
        assert not errors, errors[0]
        cache = tuning.cache()
        assert cache and all(math.isfinite(sum(t.values())) for c in cache.values()
                             for t in c.timings.values())
        assert {k.sizes for k in cache} == {"exact", "pow2"}
    finally:
        tuning.timer = _refuse
