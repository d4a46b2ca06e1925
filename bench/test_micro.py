"""Micro-benchmarks (pytest-benchmark) of the public functions at small, fixed shapes, next to the eager reference.

Not part of the test run (``testpaths = ["tests"]``). Run them with::

    python -m pytest bench/test_micro.py --benchmark-only                    # every engine available here
    python -m pytest bench/test_micro.py --benchmark-only --benchmark-json=micro.json
    RLKERNELS_BENCH_DEVICE=cuda python -m pytest bench/test_micro.py --benchmark-only

They answer "did this change make op X slower?" in seconds; the full picture (memory, roofline, peers, large
shapes) is ``rlkernels-bench``. The shape (N=512, H=256, V=8192) makes one call 0.1-0.4 s on the 2-core CPU
machine: big enough that per-call Python overhead does not dominate, small enough that the whole file runs in ~30 s.
"""
from __future__ import annotations

import os

import pytest
import torch

import rlkernels
from rlkernels import reference

DEVICE = torch.device(os.environ.get("RLKERNELS_BENCH_DEVICE", "cpu"))
N, H, V = 512, 256, 8192
ENGINES = [name for name, status in rlkernels.available_backends(DEVICE).items() if status == "available"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    logits = (torch.randn(N, V, generator=g) * 2.0).to(DEVICE).requires_grad_()
    return {"hidden": hidden, "weight": weight, "labels": labels, "logits": logits}


def _fwd_bwd(fn, leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
        loss.backward()
        _sync()
    return step


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_logprobs_fwd(benchmark, problem, engine):
    p = problem

    def step():
        with torch.no_grad():
            rlkernels.fused_logprobs(p["hidden"], p["weight"], p["labels"], return_entropy=True, backend=engine)
        _sync()
    benchmark(step)


@pytest.mark.parametrize("engine", ENGINES)
def test_fused_logprobs_fwd_bwd(benchmark, problem, engine):
    p = problem
    benchmark(_fwd_bwd(lambda: rlkernels.fused_logprobs(p["hidden"], p["weight"], p["labels"], return_entropy=True,
                                                        backend=engine), (p["hidden"], p["weight"])))


def test_eager_logprobs_fwd_bwd(benchmark, problem):
    p = problem
    benchmark(_fwd_bwd(lambda: reference.linear_logprobs(p["hidden"], p["weight"], p["labels"]),
                       (p["hidden"], p["weight"])))


@pytest.mark.parametrize("engine", ENGINES)
def test_logprobs_from_logits_fwd_bwd(benchmark, problem, engine):
    p = problem
    benchmark(_fwd_bwd(lambda: rlkernels.logprobs_from_logits(p["logits"], p["labels"], return_entropy=True,
                                                              backend=engine), (p["logits"],)))


@pytest.mark.parametrize("preset", ["dapo", "grpo", "gspo"])
@pytest.mark.parametrize("engine", ENGINES)
def test_fused_grpo_loss_fwd_bwd(benchmark, problem, engine, preset):
    p = problem
    hidden = p["hidden"].detach().view(8, N // 8, H).requires_grad_()
    labels = p["labels"].view(8, N // 8)
    advantages = torch.randn(8, device=DEVICE)
    benchmark(_fwd_bwd(lambda: rlkernels.fused_grpo_loss(hidden, p["weight"], labels, advantages, config=preset,
                                                         backend=engine).loss, (hidden, p["weight"])))


def test_group_advantages(benchmark):
    rewards = torch.randint(0, 2, (4096,), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    benchmark(lambda: rlkernels.group_advantages(rewards, group_size=16))
