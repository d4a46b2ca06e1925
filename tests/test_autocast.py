"""Inside a ``torch.autocast`` region the fused functions take hidden, weight and bias as ``F.linear`` would (cast to
the region's dtype, differentiably), and every engine then computes exactly as it does on inputs of that dtype,
forward and backward alike: autocast turns none of an engine's own matmuls. Before this, the regions reached some of
the torch engine's GEMMs and none of the others', so engines disagreed under autocast and none matched the eager
code (whose LM head autocast runs in bf16)."""
import pytest
import torch

import rlkernels as R
from rlkernels import reference as ref

from conftest import DEVICE, as_fp64, assert_matches, grads, make_problem

AUTOCAST_DTYPE = torch.bfloat16
CASES = [("dapo", True), ("dapo", False), ("gspo", None)]  # single pass, recompute mode, sequence-level ratio


def _region(enabled: bool = True):
    return torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=enabled)


def _run(p, backend, config, single_pass, autocast, dtype=None):
    """loss, logp, entropy and the three leaf gradients: everything (backward included) inside the region, or
    outside any, on leaves of ``p`` cast to ``dtype`` for each call (as the region casts them per call, the
    gradients reaching the leaves are summed in the leaves' dtype)."""
    leaves = [p[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]

    def inputs():
        return [t if dtype is None else t.to(dtype) for t in leaves]

    with _region(autocast):
        h, w, b = inputs()
        out = R.fused_grpo_loss(h, w, p["labels"], p["advantages"], p["mask"], bias=b,
                                old_logprobs=p["old_logprobs"], config=config, backend=backend, chunk_size=5,
                                single_pass=single_pass)
        h, w, b = inputs()
        logp, ent = R.fused_logprobs(h, w, p["labels"], bias=b, return_entropy=True, backend=backend, chunk_size=4)
        (out.loss + (logp * p["advantages"][:, None]).sum() + ent.sum()).backward()
    return [out.loss, logp, ent] + [t.grad for t in leaves]


@pytest.mark.parametrize("config,single_pass", CASES)
def test_an_autocast_region_casts_the_gemm_inputs_and_nothing_else(backend, config, single_pass):
    """fp32 inputs in a bf16 region: bit for bit the results of the same calls on the inputs cast to bf16 outside
    any region, the gradients coming back to the fp32 leaves in fp32."""
    p = make_problem(3, 7, 16, 41, dtype=torch.float32, seed=11, bias=True)
    got = _run(p, backend, config, single_pass, autocast=True)
    want = _run(p, backend, config, single_pass, autocast=False, dtype=AUTOCAST_DTYPE)
    for name, a, b in zip(("loss", "logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), (name, (a - b).abs().max())
    assert all(g.dtype == torch.float32 for g in got[3:])


@pytest.mark.parametrize("dtype", [AUTOCAST_DTYPE, torch.float64])
def test_inputs_autocast_leaves_alone_compute_as_outside(backend, dtype):
    """Inputs already in the region's dtype, or float64 (which autocast never casts): the region changes nothing,
    although the backward (and the engines' matmuls on the compute dtype) run inside it."""
    p = make_problem(3, 7, 16, 41, dtype=dtype, seed=12, bias=True)
    got = _run(p, backend, "dapo", None, autocast=True)
    want = _run(p, backend, "dapo", None, autocast=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


def test_the_logits_op_computes_as_outside(backend):
    """logprobs_from_logits in a region: fp32 math on the logits as given (eager's log_softmax runs in fp32 there
    too), its gradient in the logits' dtype."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(4, 6, 53, generator=g).to(DEVICE)
    y = torch.randint(0, 53, (4, 6), generator=g).to(DEVICE)
    out = []
    for autocast in (True, False):
        x = z.clone().requires_grad_()
        with _region(autocast):
            lp, en = R.logprobs_from_logits(x, y, return_entropy=True, backend=backend)
            (lp.sum() + en.sum()).backward()
        out.append((lp, en, x.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", ["dapo", "gspo", "grpo"])
def test_policy_loss_computes_as_outside(config):
    """policy_loss on given log-probs in a region: the same loss and gradients as outside (its math is fp32)."""
    p = make_problem(3, 7, 16, 41, dtype=torch.float32, seed=16)
    base = p["old_logprobs"].detach().float() + 0.05
    entropy = torch.rand(3, 7, generator=torch.Generator().manual_seed(0))
    out = []
    for autocast in (True, False):
        logp, ent = base.clone().requires_grad_(), entropy.to(DEVICE).requires_grad_()
        with _region(autocast):
            loss = R.policy_loss(logp, ent, p["advantages"], p["mask"], old_logprobs=p["old_logprobs"],
                                 ref_logprobs=p["ref_logprobs"], config=config, kl_coef=0.02, entropy_coef=0.01).loss
            loss.backward()
        out.append((loss, logp.grad, ent.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def _assert_as_eager_in_a_region(p, kw, got):
    """``got`` = (loss, grad_hidden, grad_weight) of calls on fp32 leaves ``p["hidden"]``, ``p["weight"]`` inside a
    bf16 region: each to bf16 tolerance against float64 on the bf16-rounded inputs, allowed k times the error of the
    eager code (``rlkernels.reference``) in the same region."""
    h, w = p["hidden"], p["weight"]
    with _region():
        eager, _ = ref.linear_policy_loss(h, w, p["labels"], p["advantages"], p["mask"], **kw)
        eager_g = grads(eager, [h, w])
    q = as_fp64(p)
    q["hidden"] = h.detach().to(AUTOCAST_DTYPE).double().requires_grad_()
    q["weight"] = w.detach().to(AUTOCAST_DTYPE).double().requires_grad_()
    exact, _ = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"], **kw)
    exact_g = grads(exact, [q["hidden"], q["weight"]])
    assert_matches("loss", got[0], exact, eager, AUTOCAST_DTYPE, scale=1.0)
    for name, a, b, e in zip(("grad_hidden", "grad_weight"), got[1:], exact_g, eager_g):
        assert_matches(name, a, b, e, AUTOCAST_DTYPE)


def test_matches_the_eager_code_in_the_same_region(backend):
    """What the region promises: the loss and gradients of the eager code in the same region (its LM head in bf16,
    its log-softmax in fp32), to bf16 tolerance against float64 on the bf16-rounded inputs."""
    p = make_problem(3, 9, 32, 301, dtype=torch.float32, seed=14)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo")
    h, w = p["hidden"], p["weight"]
    with _region():
        out = R.fused_grpo_loss(h, w, p["labels"], p["advantages"], p["mask"], backend=backend, **kw)
        gh, gw = grads(out.loss, [h, w])
    _assert_as_eager_in_a_region(p, kw, (out.loss, gh, gw))


def test_under_torch_compile(backend):
    """torch.compile(fullgraph=True) over a function that calls the loss in a region: the cast traces, the engines'
    custom ops run with autocast off, and the result is eager's in the same region: on the CPU to rounding (the same
    bits but for the GEMMs' order of summation), on CUDA to bf16 tolerance against float64, as eager is. There the
    compiled graph computes every row (the dropped ones neutralised) where eager gathers the kept ones: cuBLAS runs
    GEMMs of other shapes, the bf16 logits round differently, and gradient entries differed by several bf16 ulps
    (an H100, the Triton engine: 1e-3 at most; a small entry -5.57e-4 against -5.84e-4)."""
    torch._dynamo.reset()
    p = make_problem(3, 7, 16, 41, dtype=torch.float32, seed=15)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo")

    def f(hidden, weight):
        with _region():
            return R.fused_grpo_loss(hidden, weight, p["labels"], p["advantages"], p["mask"], backend=backend,
                                     **kw).loss

    h, w = p["hidden"], p["weight"]
    loss = torch.compile(f, fullgraph=True)(h, w)
    g = grads(loss, [h, w])
    loss_e = f(h, w)
    g_e = grads(loss_e, [h, w])
    assert loss.dtype == loss_e.dtype and all(a.dtype == torch.float32 for a in g)
    if DEVICE.type == "cpu":
        assert torch.allclose(loss, loss_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(g, g_e):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
        return
    _assert_as_eager_in_a_region(p, kw, (loss, *g))  # compiled
    _assert_as_eager_in_a_region(p, kw, (loss_e, *g_e))  # eager mode
