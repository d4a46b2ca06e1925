"""Final-logit softcapping (Gemma 2, Gemma 4: ``softcap * tanh(logits / softcap)``) in every engine, against the
float64 reference: log-probs, entropies, losses and their gradients through the cap."""
import pytest
import torch

import rlkernels as R
from rlkernels import reference as ref

from conftest import DEVICE, as_fp64, assert_matches, grads, leaves, make_problem, stable_seed

CAP = 2.0  # raw logits of a few units: some rows well inside the cap, some saturated (tanh near +-1)


def _capped_problem(B, T, H, V, *, cap=CAP, **kw):
    """make_problem whose old / ref / rollout log-probs lie near the capped model's (the ratios stay near 1, so the
    clipped objective keeps its gradients)."""
    p = make_problem(B, T, H, V, **kw)
    g = torch.Generator().manual_seed(kw.get("seed", 0) + 7)
    q = as_fp64(p)
    with torch.no_grad():
        true, _ = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], q["temperature"], softcap=cap)
    for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        p[name] = (true.cpu() + 0.3 * torch.randn(true.shape, generator=g, dtype=torch.float64)).to(DEVICE)
    return p


def _upstream(logp, ent, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    b = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    return (a * logp.double()).sum() + (b * ent.double()).sum()


def _assert_capped_logprobs(p, backend, cap):
    """fused_logprobs with the cap ``cap`` (row chunks of 3) against the float64 reference: log-probs, entropies and
    the gradients of hidden, weight and bias. Returns (the float64 copy of ``p``, the reference log-probs)."""
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"], temperature=p["temperature"],
                                 return_entropy=True, backend=backend, chunk_size=3, softcap=cap)
    q = as_fp64(p)
    logp_r, ent_r = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], q["temperature"],
                                        softcap=cap)
    assert_matches("logp", logp, logp_r)
    assert_matches("entropy", ent, ent_r)
    for name, a, b in zip(("hidden", "weight", "bias"), grads(_upstream(logp, ent), leaves(p)),
                          grads(_upstream(logp_r, ent_r), leaves(q))):
        assert_matches(f"grad_{name}", a, b)
    return q, logp_r.detach()


@pytest.mark.parametrize("size", [(2, 5, 8, 37), (1, 4, 8, 2053)])
@pytest.mark.parametrize("temperature", ["1", "0.7", "per-token"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_logprobs_fp64(backend, size, temperature, bias):
    """Values and gradients (hidden, weight, bias) through the cap, row chunks of 3 and vocabulary blocks."""
    B, T, H, V = size
    p = make_problem(B, T, H, V, bias=bias, temperature=0.7 if temperature == "0.7" else 1.0,
                     per_token_temperature=temperature == "per-token", logit_scale=4.0,
                     seed=stable_seed(size, temperature, bias))
    q, capped = _assert_capped_logprobs(p, backend, CAP)
    plain, _ = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], q["temperature"])
    assert (plain - capped).abs().max() > 0.1  # the cap changes the distribution: a test that can fail


@pytest.mark.parametrize("cap", [30.0, 30.1])
@pytest.mark.parametrize("temperature", ["1", "per-token"])
def test_fp64_gemma_cap(backend, cap, temperature):
    """fp64 at Gemma's cap 30 and at 30.1, which fp32 cannot hold, logits up to about 200 (55-60% of them past the cap):
    fp64 values and gradients. The Triton engine's float kernel arguments are fp32: with the cap one of them, 2 / 30
    was formed in fp32 and a loss of 1.67 was 8e-8 off in fp64 on an H100 (the interpreter keeps Python floats
    in fp64, so only the compiled kernels showed it); the cap now travels as two fp32 (hi + lo)."""
    p = make_problem(2, 5, 8, 37, bias=True, per_token_temperature=temperature == "per-token", logit_scale=60.0,
                     seed=stable_seed(cap, temperature))
    q, _ = _assert_capped_logprobs(p, backend, cap)
    with torch.no_grad():
        z = q["hidden"] @ q["weight"].T + q["bias"]
    assert float((z.abs() > cap).double().mean()) > 0.3  # the cap is at work


def test_softcap_kernel_arguments():
    """The Triton launch's (hi, lo) for a cap: hi holds in fp32, hi + lo is the cap to 48 bits (2^-48 relative);
    no cap is (1.0, 0.0), and a cap past fp32's range passes as it always did (the kernel's fp32 is inf)."""
    pytest.importorskip("triton")
    from rlkernels.triton_ops.logprobs import softcap_args

    for cap in (30.0, 30.1, 0.7, 1e-3, 2.0**100 / 3):
        hi, lo = softcap_args(cap)
        assert float(torch.tensor(hi, dtype=torch.float32)) == hi
        assert float(torch.tensor(lo, dtype=torch.float32)) == pytest.approx(lo, rel=2.0**-24)
        assert abs(hi + float(torch.tensor(lo, dtype=torch.float32)) - cap) <= cap * 2.0**-48
    assert softcap_args(30.0)[1] == 0.0 and softcap_args(None) == (1.0, 0.0) and softcap_args(0.0) == (1.0, 0.0)
    assert softcap_args(1e300) == (1e300, 0.0)


def test_vocab_blocks_and_banned_tokens(backend, monkeypatch):
    """A tiny memory budget (vocabulary blocks of a row chunk) and -inf bias entries: a banned token's capped logit
    is -softcap, finite, as the model computes it (tanh(-inf) = -1), so it keeps a probability and a gradient of
    zero through the cap's saturated derivative."""
    monkeypatch.setenv("RLKERNELS_MEMORY_BUDGET_MB", "2e-3")  # 3 rows x ~170 entries per block
    p = make_problem(2, 7, 8, 611, bias=True, logit_scale=3.0, seed=17)
    b = p["bias"].detach().clone()
    b[[5, 300, 610]] = -float("inf")
    b.requires_grad_()
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=b, return_entropy=True,
                                 backend=backend, chunk_size=3, softcap=CAP)
    q = as_fp64(p)
    bq = b.detach().double().requires_grad_()
    logp_r, ent_r = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], bq, softcap=CAP)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_matches("logp", logp, logp_r)
    assert_matches("entropy", ent, ent_r)
    g_ours = grads(_upstream(logp, ent), [p["hidden"], p["weight"], b])
    g_ref = grads(_upstream(logp_r, ent_r), [q["hidden"], q["weight"], bq])
    for name, x, y in zip(("hidden", "weight", "bias"), g_ours, g_ref):
        assert torch.isfinite(x).all(), name
        assert_matches(f"grad_{name}", x, y)
    assert torch.all(g_ours[2][[5, 300, 610]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(backend, dtype):
    """bf16 / fp32 against float64, allowed k x the error of the eager code in the same dtype (HF's Gemma: the LM
    head, the cap's divide, tanh and multiply in the input dtype, then fp32)."""
    p = make_problem(4, 16, 64, 1031, dtype=dtype, bias=True, logit_scale=6.0, seed=19)
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"], return_entropy=True,
                                 backend=backend, chunk_size=16, softcap=CAP)
    eager = ref.linear_logprobs(p["hidden"], p["weight"], p["labels"], p["bias"], softcap=CAP)
    q = as_fp64(p)
    exact = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], softcap=CAP)
    assert_matches("logp", logp, exact[0], eager[0], dtype)
    assert_matches("entropy", ent, exact[1], eager[1], dtype)
    for name, a, e, x in zip(("hidden", "weight", "bias"), grads(_upstream(logp, ent), leaves(p)),
                             grads(_upstream(*eager), leaves(p)), grads(_upstream(*exact), leaves(q))):
        assert a.dtype == dtype
        assert_matches(f"grad_{name}", a, x, e, dtype)


@pytest.mark.parametrize("config", ["dapo", "grpo", "gspo"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_fused_grpo_loss(backend, config, single_pass):
    """The loss, its gradients and metrics through the cap, in the single pass (3 GEMMs; for gspo over row chunks of
    whole sequences) and the two-stage path, against the eager reference on a masked batch."""
    p = _capped_problem(3, 9, 16, 301, bias=True, per_token_temperature=True, logit_scale=4.0,
                        seed=stable_seed(config, single_pass))
    kw = dict(old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.05, entropy_coef=0.01)
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            temperature=p["temperature"], config=config, backend=backend,
                            chunk_size=9 if config == "gspo" else 4, single_pass=single_pass, softcap=CAP, **kw)
    q = as_fp64(p)
    loss_r, metrics_r = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"],
                                               bias=q["bias"], temperature=q["temperature"], config=config,
                                               softcap=CAP, **kw)
    assert_matches("loss", out.loss, loss_r, scale=max(1.0, abs(float(loss_r.detach()))))
    for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, leaves(p)), grads(loss_r, leaves(q))):
        assert_matches(f"grad_{name}", a, b)
    for k in ("clip_frac", "entropy", "kl", "ratio_mean"):
        assert_matches(k, out.metrics[k], metrics_r[k], scale=max(1.0, abs(float(metrics_r[k]))),
                       dtype=torch.float32)


def test_grpo_loss_module_and_per_call_override(backend):
    p = _capped_problem(2, 6, 8, 53, seed=29, logit_scale=4.0)
    args = (p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"])
    kw = dict(old_logprobs=p["old_logprobs"], backend=backend)  # off-policy: the loss's value depends on logp
    module = R.GRPOLoss("dapo", softcap=CAP, backend=backend)
    assert f"softcap={CAP}" in repr(module)
    want = R.fused_grpo_loss(*args, config="dapo", softcap=CAP, **kw).loss
    torch.testing.assert_close(module(*args, old_logprobs=p["old_logprobs"]).loss, want, rtol=0, atol=0)
    plain = R.fused_grpo_loss(*args, config="dapo", **kw).loss
    torch.testing.assert_close(module(*args, old_logprobs=p["old_logprobs"], softcap=None).loss, plain, rtol=0,
                               atol=0)
    assert abs(float(plain.detach() - want.detach())) > 1e-3


@pytest.mark.parametrize("bad,error,match", [
    (0.0, ValueError, r"softcap=0.0: must be finite and > 0"),
    (-30.0, ValueError, r"softcap=-30.0: must be finite and > 0"),
    (float("nan"), ValueError, r"softcap=nan"),
    (float("inf"), ValueError, r"softcap=inf"),
    (True, TypeError, r"softcap must be a number or None, got bool"),
    ("30", TypeError, r"softcap must be a number or None, got str"),
    (torch.tensor(30.0), TypeError, r"softcap must be a Python number"),
])
def test_bad_softcap_is_named(bad, error, match):
    p = make_problem(1, 3, 4, 11)
    with pytest.raises(error, match=match):
        R.fused_logprobs(p["hidden"], p["weight"], p["labels"], softcap=bad)
    with pytest.raises(error, match=match):
        R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], softcap=bad)
    with pytest.raises(error, match=match):
        R.GRPOLoss(softcap=bad)


def test_torch_compile_fullgraph(backend):
    """The single pass and the two-stage path as custom ops under torch.compile(fullgraph=True) carry the cap."""
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("the interpreter's kernels are not compiled; device_check.sh runs this on a GPU")
    p = _capped_problem(2, 6, 8, 53, seed=31, logit_scale=4.0)

    def loss_fn(h, w, single_pass):
        return R.fused_grpo_loss(h, w, p["labels"], p["advantages"], p["mask"], config="dapo", backend=backend,
                                 softcap=CAP, single_pass=single_pass, old_logprobs=p["old_logprobs"]).loss

    for single_pass in (None, False):
        compiled = torch.compile(lambda h, w, sp=single_pass: loss_fn(h, w, sp), fullgraph=True, backend="aot_eager")
        got = compiled(p["hidden"], p["weight"])
        want = loss_fn(p["hidden"], p["weight"], single_pass)
        torch.testing.assert_close(got, want)
        for a, b in zip(grads(got, [p["hidden"], p["weight"]]), grads(want, [p["hidden"], p["weight"]])):
            torch.testing.assert_close(a, b)
