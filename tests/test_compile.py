"""torch.compile(fullgraph=True) over the public functions: the engines are torch.library custom ops with fake
implementations, data-dependent checks and row gathers step aside while tracing, and the results match eager."""
import inspect

import pytest
import torch

import rlkernels as R

from conftest import BACKENDS, DEVICE, TOLERANCES, assert_matches, grads, leaves, make_problem, pack, stable_seed


def _loss_fn(config, backend, **kw):
    def f(hidden, weight, labels, advantages, mask, old_logprobs, ref_logprobs):
        out = R.fused_grpo_loss(hidden, weight, labels, advantages, mask, old_logprobs=old_logprobs,
                                ref_logprobs=ref_logprobs, config=config, backend=backend, **kw)
        return out.loss, out.metrics
    return f


def _args(p):
    return (p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], p["old_logprobs"], p["ref_logprobs"])


def _assert_same(loss, metrics, g, loss_e, metrics_e, g_e):
    """A compiled call's loss, gradients and metrics (the same keys) against eager's."""
    assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
    for a, b in zip(g, g_e):
        assert_matches("grad", a, b, dtype=torch.float32)
    assert metrics.keys() == metrics_e.keys()
    for k in metrics_e:
        assert_matches(k, metrics[k], metrics_e[k], dtype=torch.float32, scale=1.0)


@pytest.mark.parametrize("config,kw", [("dapo", {}), ("gspo", {}), ("grpo", dict(kl_coef=0.05, entropy_coef=0.01)),
                                       ("cispo", dict(rollout_correction="none")),
                                       ("dapo", dict(top_entropy_quantile=0.6, entropy_coef=0.01)),
                                       ("grpo", dict(opsm_delta=0.01))])
def test_fullgraph_matches_eager(backend, config, kw):
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=3)
    f = _loss_fn(config, backend, **kw)
    loss, metrics = torch.compile(f, fullgraph=True, backend="aot_eager")(*_args(p))
    g = grads(loss, leaves(p))
    loss_e, metrics_e = f(*_args(p))
    g_e = grads(loss_e, leaves(p))
    _assert_same(loss, metrics, g, loss_e, metrics_e, g_e)


@pytest.mark.parametrize("config", ["dapo", "gspo", "dr_grpo"])
def test_policy_loss_and_kl_penalty_under_compile(config):
    """The objective from log-probs the caller made (policy_loss) and kl_penalty trace without a graph break and
    equal eager, gradients included (a packed gspo batch: its sequence sums)."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float64, seed=4)
    logp = p["old_logprobs"].detach() + 0.1 * torch.randn(3, 9, dtype=torch.float64, device=DEVICE)
    ent = torch.rand(3, 9, dtype=torch.float64, device=DEVICE)
    kw = dict(old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.05, entropy_coef=0.01,
              config=config, **({"norm_length": 9} if config == "dr_grpo" else {}))
    keep, cu, pick = pack(3, 9, [4, 9, 2])
    packed = config == "gspo"
    if packed:  # picked outside the compiled function (a boolean index has a data-dependent size)
        kw.update(old_logprobs=pick(kw["old_logprobs"]), ref_logprobs=pick(kw["ref_logprobs"]), cu_seqlens=cu)

    def f(lp, en):
        out = R.policy_loss(lp, en, p["advantages"], None if packed else p["mask"], **kw)
        return out.loss + R.kl_penalty(lp, kw["ref_logprobs"], "k3").sum(), out.metrics

    inputs = (pick(logp), pick(ent)) if packed else (logp, ent)
    a = [x.clone().requires_grad_() for x in inputs]
    b = [x.clone().requires_grad_() for x in inputs]
    loss, metrics = torch.compile(f, fullgraph=True, backend="aot_eager")(*a)
    loss_e, metrics_e = f(*b)
    _assert_same(loss, metrics, grads(loss, a), loss_e, metrics_e, grads(loss_e, b))


class _PathSpy:
    """Which engine primitives a call ran: ``linear_fused`` (the single pass, 3 GEMMs) or ``linear_forward`` +
    ``linear_backward`` (the two-stage path, 4)."""

    def __init__(self, monkeypatch, backend):
        from rlkernels.engines import load_engine

        self.calls, self.plans = [], []
        engine = load_engine(backend)
        for name in ("linear_fused", "linear_forward", "linear_backward"):
            original = getattr(engine, name)

            def spy(*a, _o=original, _n=name, **k):
                self.calls.append(_n)
                self.plans.append(a[5])  # (hidden, weight, bias, labels, temperature, plan, ...)
                return _o(*a, **k)
            monkeypatch.setattr(engine, name, spy)


@pytest.mark.parametrize("config,kw,problem", [
    ("dapo", {}, {}),
    ("grpo", dict(kl_coef=0.05, entropy_coef=0.01, chunk_size=5), dict(bias=True)),
    ("dr_grpo", dict(norm_length=9.0, entropy_shaping_alpha=0.4, kl_estimator="low_var_kl", kl_coef=0.1),
     dict(per_token_temperature=True)),
    ("cispo", dict(rollout_correction="token_tis", chunk_size=4), dict(per_token_advantages=True)),
    ("sapo", dict(kl_coef=0.02, kl_straight_through=True, kl_is_corrected=True), {}),
])
def test_compiled_single_pass(backend, monkeypatch, config, kw, problem):
    """Token-separable objectives take the single pass under torch.compile too (the rlkernels::linear_fused_loss
    op: one linear_fused call, no recompute), with the loss, every gradient and every metric of eager's two-stage
    path, with a bias, per-token temperatures, several row chunks, and a loss scaled before backward."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=stable_seed(config), **problem)

    def f(hidden, weight, bias, labels, advantages, mask, old, ref, rollout, temperature, single_pass=None):
        out = R.fused_grpo_loss(hidden, weight, labels, advantages, mask, old_logprobs=old, ref_logprobs=ref,
                                rollout_logprobs=rollout, bias=bias, temperature=temperature, config=config,
                                backend=backend, single_pass=single_pass, **kw)
        return out.loss * 0.5, out.metrics  # grad_output 0.5 reaches the op's backward

    args = (p["hidden"], p["weight"], p["bias"], p["labels"], p["advantages"], p["mask"], p["old_logprobs"],
            p["ref_logprobs"], p["rollout_logprobs"], p["temperature"])
    spy = _PathSpy(monkeypatch, backend)
    loss, metrics = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g = grads(loss, leaves(p))
    assert spy.calls == ["linear_fused"], spy.calls
    loss_e, metrics_e = f(*args, single_pass=False)
    g_e = grads(loss_e, leaves(p))
    _assert_same(loss, metrics, g, loss_e, metrics_e, g_e)


def test_compiled_single_pass_partial_grads(backend, monkeypatch):
    """Only the weight requires grad: the op forms grad_weight alone, and the hidden states get none."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=21)
    hidden = p["hidden"].detach()
    f = _loss_fn("dapo", backend)
    spy = _PathSpy(monkeypatch, backend)
    loss, _ = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, *_args(p)[1:])
    (gw,) = torch.autograd.grad(loss, [p["weight"]])
    assert spy.calls == ["linear_fused"], spy.calls
    loss_e, _ = _loss_fn("dapo", backend, single_pass=False)(hidden, *_args(p)[1:])
    (gw_e,) = torch.autograd.grad(loss_e, [p["weight"]])
    assert_matches("grad_weight", gw, gw_e, dtype=torch.float32)


@pytest.mark.parametrize("config,chunk,V,blocked", [("gspo", 20, 37, False), ("luspo", 5, 600, True)])
def test_compiled_single_pass_sequence_ratio(backend, monkeypatch, config, chunk, V, blocked):
    """Sequence-level ratios take the single pass under compile too: the op cuts row chunks of whole sequences (two
    9-token sequences per 20-row chunk), or, with sequences longer than a chunk (9 > 5 rows), chunks of one
    sequence over vocabulary blocks; loss, gradients and metrics equal eager's two-stage path."""
    import rlkernels._single_pass as S

    torch._dynamo.reset()
    p = make_problem(3, 9, 16, V, dtype=torch.float32, seed=23)
    spy = _PathSpy(monkeypatch, backend)
    lengths = []
    aligned = S.sequence_aligned
    monkeypatch.setattr(S, "sequence_aligned", lambda *a: (lengths.append(a[3]), aligned(*a))[1])
    loss, metrics = torch.compile(_loss_fn(config, backend, chunk_size=chunk), fullgraph=True,
                                  backend="aot_eager")(*_args(p))
    g = grads(loss, leaves(p))
    assert spy.calls == ["linear_fused"], spy.calls
    # a padded batch: every row is computed under compile, so each sequence has T = 9 rows, known without a read
    assert lengths and all(ls == (9, 9, 9) for ls in lengths), lengths
    plan = spy.plans[0]
    assert plan.bounds == ((0, 18, 27) if not blocked else (0, 9, 18, 27)), plan
    assert plan.vocab_blocked == blocked, plan
    loss_e, metrics_e = _loss_fn(config, backend, chunk_size=chunk, single_pass=False)(*_args(p))
    g_e = grads(loss_e, leaves(p))
    _assert_same(loss, metrics, g, loss_e, metrics_e, g_e)


def test_compiled_single_pass_packed_sequences(backend, monkeypatch):
    """A packed batch's sequence lengths are device data: under compile the single pass for a sequence-level ratio
    reads them inside the op tagged cudagraph_unsafe (which torch.compile(mode="reduce-overhead") keeps out of its
    CUDA graphs); chunks end at sequence ends, and loss and gradients equal eager's two-stage path."""
    import rlkernels._single_pass as S

    torch._dynamo.reset()
    B, T = 4, 8
    p = make_problem(B, T, 16, 41, dtype=torch.float32, seed=24)
    _, cu, pick = pack(B, T, [5, 0, 8, 3])  # one empty sequence
    hidden = pick(p["hidden"].detach()).requires_grad_()
    args = (hidden, p["weight"], pick(p["labels"]), p["advantages"], pick(p["mask"]), pick(p["old_logprobs"]),
            pick(p["ref_logprobs"]))
    spy = _PathSpy(monkeypatch, backend)
    ops = []
    for name in ("linear_fused_loss_op", "linear_fused_loss_read_op"):
        op = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _op=op, _name=name: (ops.append(_name), _op(*a))[1])
    loss, metrics = torch.compile(_loss_fn("gspo", backend, chunk_size=9, cu_seqlens=cu), fullgraph=True,
                                  backend="aot_eager")(*args)
    g = grads(loss, [hidden, p["weight"]])
    assert ops == ["linear_fused_loss_read_op"] and spy.calls == ["linear_fused"], (ops, spy.calls)
    assert spy.plans[0].bounds == (0, 5, 13, 16), spy.plans[0]  # 5 + 0 | 8 | 3 rows: whole sequences per chunk
    loss_e, metrics_e = _loss_fn("gspo", backend, chunk_size=9, cu_seqlens=cu, single_pass=False)(*args)
    g_e = grads(loss_e, [hidden, p["weight"]])
    _assert_same(loss, metrics, g, loss_e, metrics_e, g_e)
    if hasattr(torch.Tag, "cudagraph_unsafe") and "tags" in inspect.signature(torch.library.custom_op).parameters:
        assert torch.Tag.cudagraph_unsafe in torch.ops.rlkernels.linear_fused_loss_read_lengths.default.tags
        assert torch.Tag.cudagraph_unsafe not in torch.ops.rlkernels.linear_fused_loss.default.tags


def test_compiled_two_stage_where_the_single_pass_cannot_apply(backend, monkeypatch):
    """Under compile an objective that couples a batch's tokens (the entropy quantile) takes the two-stage path;
    single_pass=True then says why, and single_pass=False is honoured for separable objectives too."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=22)
    spy = _PathSpy(monkeypatch, backend)
    loss, _ = torch.compile(_loss_fn("dapo", backend, top_entropy_quantile=0.5), fullgraph=True,
                            backend="aot_eager")(*_args(p))
    loss.backward()
    assert spy.calls == ["linear_forward", "linear_backward"], spy.calls
    with pytest.raises(Exception, match="single_pass=True cannot apply"):  # dynamo wraps the ValueError
        torch.compile(_loss_fn("dapo", backend, top_entropy_quantile=0.5, single_pass=True), fullgraph=True,
                      backend="aot_eager")(*_args(p))
    torch._dynamo.reset()
    spy.calls.clear()
    loss, _ = torch.compile(_loss_fn("dapo", backend, single_pass=False), fullgraph=True,
                            backend="aot_eager")(*_args(p))
    loss.backward()
    assert spy.calls == ["linear_forward", "linear_backward"], spy.calls


_FIRST_CALL = """
import sys, torch, rlkernels as R
g, dev = torch.Generator().manual_seed(0), sys.argv[2]
h = torch.randn(2, 5, 16, generator=g).to(dev).requires_grad_()
w = torch.randn(37, 16, generator=g).to(dev).requires_grad_()
y, a = torch.randint(0, 37, (2, 5), generator=g).to(dev), torch.randn(2, generator=g).to(dev)
f = lambda h, w: R.fused_grpo_loss(h, w, y, a, config="dapo", backend=sys.argv[1]).loss
loss = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w)
loss.backward()
assert torch.isfinite(loss) and w.grad is not None
"""


@pytest.mark.parametrize("which", ["auto"] + BACKENDS)
def test_first_call_under_compile(which):
    """A fresh process whose first call is compiled: the engine loads (importing Triton, building or loading the
    native extension) outside dynamo's trace instead of failing it (the native loader's lock broke fullgraph)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FIRST_CALL, which, str(DEVICE)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_config_survives_the_op_arguments():
    """Every preset, with every optional field set and unset, comes back equal from the custom op's encoding."""
    from rlkernels.config import PRESETS, PolicyLossConfig, config_from_op_args, config_to_op_args

    for name in PRESETS:
        for extra in ({}, dict(norm_length=7.0, kl_coef=0.1, kl_straight_through=True, opsm_delta=0.5,
                               dual_clip=6.0, log_ratio_clamp=None, clip_low=None)):
            cfg = PolicyLossConfig.from_preset(name, **{"norm_length": 5.0, **extra})
            assert config_from_op_args(*config_to_op_args(cfg)) == cfg


def test_masked_garbage_under_compile(backend):
    """Without the row gather, masked rows are computed: garbage there must still not leak."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=5)
    f = _loss_fn("dapo", backend)
    clean, _ = f(*_args(p))
    g_clean = grads(clean, leaves(p))
    h = p["hidden"].detach().clone()
    h[~p["mask"]] = float("nan")
    h.requires_grad_()
    labels = p["labels"].masked_fill(~p["mask"], -100)
    args = list(_args(p))
    args[0], args[2] = h, labels
    loss, _ = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    gh, gw = grads(loss, [h, p["weight"]])
    assert_matches("loss", loss, clean, dtype=torch.float32, scale=1.0)
    assert torch.all(gh[~p["mask"]] == 0)
    assert_matches("grad_weight", gw, g_clean[1], dtype=torch.float32)


@pytest.mark.parametrize("config", ["dapo", "gspo"])  # gspo: the op plans its sequence chunks from a symbolic T
def test_no_recompile_across_completion_lengths(backend, config):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    f = torch.compile(_loss_fn(config, backend), fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (9, 13, 21):
        p = make_problem(2, T, 16, 37, dtype=torch.float32, seed=T)
        loss, _ = f(*_args(p))
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_inductor_logprobs(backend):
    """Inductor around the custom ops (C++ on CPU, Triton on CUDA)."""
    torch._dynamo.reset()
    p = make_problem(2, 5, 8, 37, dtype=torch.float32, seed=7)

    def f(hidden, weight, labels):
        logp, ent = R.fused_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
        return (logp * 2 + ent).sum()

    loss = torch.compile(f, fullgraph=True)(p["hidden"], p["weight"], p["labels"])
    g = grads(loss, leaves(p))
    loss_e = f(p["hidden"], p["weight"], p["labels"])
    for a, b in zip(g, grads(loss_e, leaves(p))):
        assert_matches("grad", a, b, dtype=torch.float32)


@pytest.mark.parametrize("config", ["grpo", "gspo"])
def test_inductor_per_sequence_sums(config):
    """Inductor over the presets that sum per sequence (grpo's seq-mean-token-mean, gspo's sequence ratio), single
    pass included: on the CPU its vectorised index_add failed to compile on a padded batch's seq_ids (segment_sum
    is a scatter_reduce now). One engine: each case is a C++ build."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=31, mask_frac=0.0)
    f = _loss_fn(config, "torch")
    loss, _ = torch.compile(f, fullgraph=True)(*_args(p))
    g = grads(loss, leaves(p))
    loss_e, _ = _loss_fn(config, "torch", single_pass=False)(*_args(p))
    assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
    for a, b in zip(g, grads(loss_e, leaves(p))):
        assert_matches("grad", a, b, dtype=torch.float32)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a second inductor build is only cheap on CUDA (Triton codegen)")
def test_inductor_fused_grpo_loss_bf16(backend):
    """The product path on a GPU: fused_grpo_loss compiled by inductor with fullgraph=True, bf16, against eager."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.bfloat16, seed=9)
    f = _loss_fn("dapo", backend)
    loss, _ = torch.compile(f, fullgraph=True)(*_args(p))
    g = grads(loss, leaves(p))
    loss_e, _ = f(*_args(p))
    g_e = grads(loss_e, leaves(p))
    assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
    for a, b in zip(g, g_e):
        assert_matches("grad", a.float(), b.float(), dtype=torch.bfloat16)


def test_logits_path_under_compile(backend):
    """logprobs_from_logits compiled with fullgraph=True on a shifted (B, T, V) view with a mask and garbage in the
    dropped rows: values and the gradient equal eager's, and the dropped rows get exactly 0."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    B, T, V = 3, 7, 53
    full = torch.randn(B, T + 1, V, generator=g).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(DEVICE)
    full[:, :-1][~mask] = float("nan")
    labels = labels.masked_fill(~mask, -100)
    temp = (0.5 + torch.rand(B, T, generator=g)).to(DEVICE)

    def f(full, labels, mask, temp):
        logp, ent = R.logprobs_from_logits(full[:, :-1], labels, mask=mask, temperature=temp, return_entropy=True,
                                           backend=backend)
        return logp, ent, (logp * 2 + ent).sum()

    x = full.clone().requires_grad_()
    logp, ent, s = torch.compile(f, fullgraph=True, backend="aot_eager")(x, labels, mask, temp)
    (gx,) = torch.autograd.grad(s, x)
    x_e = full.clone().requires_grad_()
    logp_e, ent_e, s_e = f(x_e, labels, mask, temp)
    (gx_e,) = torch.autograd.grad(s_e, x_e)
    assert_matches("logp", logp, logp_e, dtype=torch.float32)
    assert_matches("entropy", ent, ent_e, dtype=torch.float32)
    assert_matches("grad", gx, gx_e, dtype=torch.float32)
    assert torch.all(gx[:, :-1][~mask] == 0) and torch.all(gx[:, -1] == 0) and torch.all(logp[~mask] == 0)


def test_fused_logprobs_masked_positions_are_zero_under_compile(backend):
    """Under compile the dropped rows are computed (no gather); their log-probs and entropies still come back 0,
    as in eager, and the rest equals eager."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=13)

    def f(hidden, weight, labels, mask):
        return R.fused_logprobs(hidden, weight, labels, mask=mask, return_entropy=True, backend=backend)

    logp, ent = torch.compile(f, fullgraph=True, backend="aot_eager")(p["hidden"], p["weight"], p["labels"],
                                                                       p["mask"])
    logp_e, ent_e = f(p["hidden"], p["weight"], p["labels"], p["mask"])
    assert torch.all(logp[~p["mask"]] == 0) and torch.all(ent[~p["mask"]] == 0)
    assert_matches("logp", logp, logp_e, dtype=torch.float32)
    assert_matches("entropy", ent, ent_e, dtype=torch.float32)


@pytest.mark.parametrize("n,q", [(1, 0.5), (7, 0.2), (100, 0.8), (1000, 0.37), (64, 0.0), (64, 1.0)])
def test_masked_quantile_equals_torch_quantile(n, q):
    """The entropy-quantile threshold, computed without a data-dependent size (so that torch.compile traces it):
    torch.quantile of the kept values, ties and fp32 included; -inf when nothing is kept."""
    from rlkernels.objective import _masked_quantile

    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(n, generator=g, dtype=dtype).round(decimals=1)  # ties
        mask = torch.rand(n, generator=g) < 0.7
        mask[0] = True
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_masked_quantile(x, mask, q), torch.quantile(x[mask], q), **tol)
        assert _masked_quantile(x, torch.zeros_like(mask), q) == float("-inf")
    x = torch.randn(50, generator=g)
    mask = torch.rand(50, generator=g) < 0.5
    compiled = torch.compile(_masked_quantile, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask, 0.3), torch.quantile(x[mask], 0.3), rtol=1e-6, atol=1e-7)


def test_compiled_single_pass_needs_the_dispatcher_api(backend, monkeypatch):
    """Where torch lacks the dispatcher API the op uses to run autograd inside itself, fused_grpo_loss under compile
    takes the two-stage path, and single_pass=True says why."""
    import rlkernels.ops as ops

    monkeypatch.setattr(ops, "_COMPILED_SINGLE_PASS", False)
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.float32, seed=41)
    spy = _PathSpy(monkeypatch, backend)
    loss, _ = torch.compile(_loss_fn("dapo", backend), fullgraph=True, backend="aot_eager")(*_args(p))
    loss.backward()
    assert spy.calls == ["linear_forward", "linear_backward"], spy.calls
    with pytest.raises(Exception, match="its dispatcher lacks"):
        torch.compile(_loss_fn("dapo", backend, single_pass=True), fullgraph=True, backend="aot_eager")(*_args(p))


@pytest.mark.parametrize("config", ["dapo", "gspo"])
def test_compiled_single_pass_bf16_bias(backend, config):
    """bf16 inputs with a bias through the compiled single pass: gradients in the inputs' dtype (as the op's fake
    implementation says), equal to eager's single pass."""
    torch._dynamo.reset()
    p = make_problem(3, 9, 16, 37, dtype=torch.bfloat16, seed=43, bias=True)

    def f(hidden, weight, bias, labels, advantages, mask, old):
        return R.fused_grpo_loss(hidden, weight, labels, advantages, mask, bias=bias, old_logprobs=old, config=config,
                                 backend=backend).loss

    args = (p["hidden"], p["weight"], p["bias"], p["labels"], p["advantages"], p["mask"], p["old_logprobs"])
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    g = grads(loss, leaves(p))
    loss_e = f(*args)
    assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
    for a, b in zip(g, grads(loss_e, leaves(p))):
        assert a.dtype == torch.bfloat16
        # two bf16 results, each rounded once from fp32 sums that may differ in their last bits (the GEMMs of the
        # two paths may run different cuBLAS kernels: one element in 592 came out one bf16 step apart on the H100):
        # the allowance is the table's plus one bf16 step (2^-7 relative at most) of each element
        scale = float(b.float().abs().max())
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=TOLERANCES[torch.bfloat16]["atol"] * scale)
