"""Shared test helpers: the device and engines under test, random problems, and the one tolerance table.

``RLKERNELS_TEST_DEVICE`` (default ``cpu``) runs the suite on another device (``bench/device_check.sh`` sets
``cuda``); ``RLKERNELS_TEST_BACKENDS`` (comma list) restricts the engines, default every available one.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import pytest
import torch

from rlkernels import available_backends
from rlkernels import reference as ref

DEVICE = torch.device(os.environ.get("RLKERNELS_TEST_DEVICE", "cpu"))


def _backends():
    chosen = os.environ.get("RLKERNELS_TEST_BACKENDS")
    names = [b for b, status in available_backends(DEVICE).items() if status == "available"]
    if chosen:
        names = [b for b in chosen.split(",") if b]
    return names


BACKENDS = _backends()

# |ours - fp64| <= K * max|eager same dtype - fp64| + ATOL * max|fp64|, per element (STYLE.md practice 11). The eager
# error is taken over the whole tensor: elementwise, eager is sometimes right by luck (its bf16 bias add, say, rounds
# differently from our fp32 one), which says nothing about our accuracy. fp64 is compared to the fp64 reference
# directly (K = 0).
TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float64: dict(k=0.0, atol=1e-10),
    torch.float32: dict(k=2.0, atol=2e-6),
    torch.bfloat16: dict(k=2.0, atol=4e-3),
    torch.float16: dict(k=2.0, atol=1e-3),
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def assert_matches(name: str, ours, fp64, eager=None, dtype: torch.dtype = torch.float64, scale: Optional[float] = None):
    """Tolerance check of STYLE.md practice 11, with a failure message that shows the count and worst offenders."""
    tol = TOLERANCES[dtype]
    ours = torch.as_tensor(ours).detach().double().cpu()
    fp64 = torch.as_tensor(fp64).detach().double().cpu()
    assert ours.shape == fp64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(fp64.shape)}"
    if scale is None:
        scale = float(fp64.abs().max()) if fp64.numel() else 1.0
    allowed = tol["atol"] * max(scale, 1e-30)
    if eager is not None and tol["k"] > 0:
        allowed = allowed + tol["k"] * float((torch.as_tensor(eager).detach().double().cpu() - fp64).abs().max())
    err = (ours - fp64).abs()
    bad = ~(err <= allowed)  # NaN counts as bad
    if bool(bad.any()):
        flat = bad.flatten().nonzero().flatten()
        worst = flat[(err.flatten()[flat] - torch.as_tensor(allowed, dtype=err.dtype).expand_as(err).flatten()[flat]).argsort(
            descending=True)[:5]]
        lines = [f"  at {tuple(int(i) for i in torch.unravel_index(torch.tensor(w), err.shape))}: ours={ours.flatten()[w]:.10g} "
                 f"ref={fp64.flatten()[w]:.10g} err={err.flatten()[w]:.3g} "
                 f"allowed={torch.as_tensor(allowed, dtype=err.dtype).expand_as(err).flatten()[w]:.3g}" for w in worst.tolist()]
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements out of tolerance\n"
                             + "\n".join(lines))


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every run (``hash`` of a str changes per process)."""
    import zlib

    return zlib.crc32(repr(parts).encode()) % 1000


def make_problem(B=3, T=9, H=16, V=37, *, dtype=torch.float64, seed=0, mask_frac=0.25, bias=False,
                 temperature=1.0, per_token_temperature=False, logit_scale=1.0, ratio_noise=0.3,
                 per_token_advantages=False, device=DEVICE):
    """A random padded batch whose old/ref/rollout log-probs lie near the true ones, so that clipping, masks and
    corrections are all exercised. Returns a dict of leaf tensors (hidden, weight, bias require grad)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden = randn(B, T, H)
    weight = randn(V, H) * (logit_scale / H**0.5)
    b = randn(V) * 0.5 if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g, dtype=torch.float64) >= mask_frac
    if per_token_temperature:
        temp = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    else:
        temp = temperature
    with torch.no_grad():
        true_logp, _ = ref.linear_logprobs(hidden, weight, labels, b, temp)
    noise = lambda: ratio_noise * randn(B, T)  # noqa: E731
    adv = randn(B, T) if per_token_advantages else randn(B)
    out = dict(
        hidden=hidden.to(dtype).to(device).requires_grad_(),
        weight=weight.to(dtype).to(device).requires_grad_(),
        bias=None if b is None else b.to(dtype).to(device).requires_grad_(),
        labels=labels.to(device),
        mask=mask.to(device),
        temperature=temp.to(device) if isinstance(temp, torch.Tensor) else temp,
        advantages=adv.to(device),
        old_logprobs=(true_logp + noise()).to(device),
        ref_logprobs=(true_logp + noise()).to(device),
        rollout_logprobs=(true_logp + noise()).to(device),
    )
    return out


def pack(B: int, T: int, lengths):
    """A padded (B, T) batch as a packed one whose sequence b keeps the first ``lengths[b]`` positions:
    -> (keep (B*T,) bool, cu_seqlens (B+1,) int32, pick: a (B, T, ...) tensor -> its kept rows (N, ...))."""
    lengths = torch.as_tensor(lengths)
    keep = (torch.arange(T)[None, :] < lengths[:, None]).reshape(-1).to(DEVICE)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return keep, cu.to(DEVICE), lambda x: x.reshape(B * T, *x.shape[2:])[keep]


def leaves(p):
    """The differentiable inputs of a problem, in a fixed order."""
    return [t for t in (p["hidden"], p["weight"], p["bias"]) if t is not None]


def as_fp64(p):
    """A float64 copy of a problem (new leaves) for the reference."""
    q = dict(p)
    for k in ("hidden", "weight", "bias"):
        if p[k] is not None:
            q[k] = p[k].detach().double().requires_grad_()
    if isinstance(p["temperature"], torch.Tensor):
        q["temperature"] = p["temperature"].double()
    return q


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def check_events(monkeypatch) -> list:
    """A list that the value checks' host reads append to, in order: "sync" (read_back: copy and wait at once),
    "copy" (LateCheck.arm_all: copies queued behind an event) and "wait" (LateCheck.raise_if_failed)."""
    import rlkernels._checks as C

    events = []
    read_back, arm_all, wait = C.read_back, C.LateCheck.arm_all, C.LateCheck.raise_if_failed
    monkeypatch.setattr(C, "read_back", lambda values: (events.append("sync"), read_back(values))[1])
    monkeypatch.setattr(C.LateCheck, "arm_all", lambda self, c, after=None: (
        events.append("copy"), arm_all(self, c, after=after))[1])
    monkeypatch.setattr(C.LateCheck, "raise_if_failed", lambda self: (events.append("wait"), wait(self))[1])
    return events
