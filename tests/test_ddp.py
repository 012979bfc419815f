"""DistributedDataParallel (gloo, CPU, 2 processes) reduces the shared bank's gradient."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sharedconv

WORLD = 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        sharedconv.SharedConv1d(4, 4 * 3, 3, groups=4, padding=1),
        torch.nn.Tanh(),
        sharedconv.SharedConv1d(12, 4, 3, groups=4, padding_mode="circular", padding=1),
    ).double()


def _batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 4, 16, dtype=torch.float64)


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        shard = _batch().chunk(WORLD)[rank]  # each process sees half the global batch
        _loss(model, shard).backward()
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_gradient_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = _model()
    _loss(single, _batch()).backward()
    expected = {name: p.grad for name, p in single.named_parameters()}
    assert set(expected) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert set(grads) == set(expected)
        for name, grad in expected.items():
            assert grad.abs().sum() > 0
            torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-14)
