"""Engines vs the float64 reference: per-token log-probs, entropies and their gradients."""
import math

import pytest
import torch

import rlkernels as R
from rlkernels import reference as ref

from conftest import DEVICE, as_fp64, assert_matches, grads, leaves, make_problem, stable_seed

SIZES = [  # (B, T, H, V): odd vocabularies that are a multiple of no block size
    (2, 5, 8, 37),
    (3, 7, 16, 123),
    (1, 4, 8, 50257),
]


def _upstream(logp, ent, seed=1):
    """A random linear functional of (logp, entropy), so both gradient paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    b = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    return (a * logp.double()).sum() + (b * ent.double()).sum()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", ["1", "0.7", "per-token"])
def test_fused_logprobs_fp64(backend, size, bias, temperature):
    B, T, H, V = size
    p = make_problem(B, T, H, V, bias=bias, temperature=0.7 if temperature == "0.7" else 1.0,
                     per_token_temperature=temperature == "per-token", seed=stable_seed(size, bias, temperature))
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"],
                                 temperature=p["temperature"], return_entropy=True, backend=backend, chunk_size=4)
    q = as_fp64(p)
    logp_r, ent_r = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], q["temperature"])
    assert logp.dtype == torch.float64 and logp.shape == (B, T)
    assert_matches("logp", logp, logp_r)
    assert_matches("entropy", ent, ent_r)
    for name, a, b in zip(("hidden", "weight", "bias"), grads(_upstream(logp, ent), leaves(p)),
                          grads(_upstream(logp_r, ent_r), leaves(q))):
        assert_matches(f"grad_{name}", a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_logprobs_low_precision(backend, dtype, bias):
    """bf16/fp16/fp32 against fp64, allowed k x the error of eager PyTorch in the same dtype."""
    p = make_problem(4, 16, 64, 1031, dtype=dtype, bias=bias, seed=3, logit_scale=4.0)
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"], return_entropy=True,
                                 backend=backend, chunk_size=16)
    assert logp.dtype == torch.float32
    eager = ref.linear_logprobs(p["hidden"], p["weight"], p["labels"], p["bias"])
    q = as_fp64(p)
    exact = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"])
    assert_matches("logp", logp, exact[0], eager[0], dtype)
    assert_matches("entropy", ent, exact[1], eager[1], dtype)
    g_ours = grads(_upstream(logp, ent), leaves(p))
    g_eager = grads(_upstream(*eager), leaves(p))
    g_exact = grads(_upstream(*exact), leaves(q))
    for name, a, e, x in zip(("hidden", "weight", "bias"), g_ours, g_eager, g_exact):
        assert a.dtype == dtype, f"grad_{name} must come back in the input dtype"
        assert_matches(f"grad_{name}", a, x, e, dtype)


def test_vocab_blocking_and_chunk_invariance(backend, monkeypatch):
    """Row chunks of 1..N and vocabulary blocks (a tiny budget) all give the same answer."""
    p = make_problem(2, 11, 8, 997, bias=True, per_token_temperature=True, seed=5)
    q = as_fp64(p)
    logp_r, ent_r = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"], q["bias"], q["temperature"])
    g_r = grads(_upstream(logp_r, ent_r), leaves(q))
    for budget_mb, chunk in [(None, None), (None, 1), (None, 7), (None, 1000), (2e-3, 3), (5e-4, None)]:
        if budget_mb is None:
            monkeypatch.delenv("RLKERNELS_MEMORY_BUDGET_MB", raising=False)
        else:  # 2e-3 MiB = 2097 bytes: 3 rows x ~170 vocab entries per block
            monkeypatch.setenv("RLKERNELS_MEMORY_BUDGET_MB", str(budget_mb))
        logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"],
                                     temperature=p["temperature"], return_entropy=True, backend=backend,
                                     chunk_size=chunk)
        assert_matches(f"logp budget={budget_mb} chunk={chunk}", logp, logp_r)
        assert_matches(f"entropy budget={budget_mb} chunk={chunk}", ent, ent_r)
        for name, a, b in zip(("hidden", "weight", "bias"), grads(_upstream(logp, ent), leaves(p)), g_r):
            assert_matches(f"grad_{name} budget={budget_mb} chunk={chunk}", a, b)


def test_mask_skips_rows(backend):
    p = make_problem(3, 8, 8, 41, seed=7)
    h = p["hidden"].detach().clone()
    h[~p["mask"]] = float("nan")  # never computed
    h.requires_grad_()
    labels = p["labels"].clone()
    labels[~p["mask"]] = -100
    logp, ent = R.fused_logprobs(h, p["weight"], labels, mask=p["mask"], return_entropy=True, backend=backend)
    assert torch.all(logp[~p["mask"]] == 0) and torch.all(ent[~p["mask"]] == 0)
    full, full_ent = ref.linear_logprobs(p["hidden"].detach(), p["weight"].detach(), p["labels"])
    assert_matches("logp kept", logp[p["mask"]], full[p["mask"]])
    gh, gw = grads(_upstream(logp, ent), [h, p["weight"]])
    assert torch.all(gh[~p["mask"]] == 0) and torch.isfinite(gw).all()


def test_extreme_and_neg_inf_logits(backend):
    """Huge logits (|z| ~ 1e4), -inf bias entries (banned tokens) and a -inf label logit."""
    p = make_problem(2, 6, 8, 64, bias=True, logit_scale=3e4, seed=11)
    b = p["bias"].detach().clone()
    b[[3, 9, 10]] = -float("inf")
    b.requires_grad_()
    labels = p["labels"].clone()
    labels[labels == 3] = 4
    labels[0, 0] = 9  # this token's logit is -inf: logp = -inf
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], labels, bias=b, return_entropy=True, backend=backend)
    logp_r, ent_r = ref.linear_logprobs(p["hidden"].detach(), p["weight"].detach(), labels, b.detach())
    assert logp[0, 0] == -float("inf")
    keep = torch.ones_like(labels, dtype=torch.bool)
    keep[0, 0] = False
    assert_matches("logp", logp[keep], logp_r[keep])
    assert_matches("entropy", ent, ent_r)
    assert torch.isfinite(ent).all()
    # gradient of the finite positions only: the banned tokens get exactly zero gradient
    gb, = grads((logp[keep].sum() + ent.sum()), [b])
    assert torch.isfinite(gb).all() and torch.all(gb[[3, 9, 10]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_nonfinite_logits_stay_nonfinite_with_checks_off(backend, dtype, monkeypatch):
    """RLKERNELS_CHECK_VALUES=0 skips the NaN check, not the NaN: a row holding a NaN or +inf logit (in a vectorised
    stretch or the scalar tail of a row) gets NaN logp and entropy, as eager's does; the other rows are unchanged."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    g = torch.Generator().manual_seed(stable_seed("nonfinite logits"))
    z = torch.randn(2, 4, 101, generator=g).to(dtype)
    y = torch.randint(0, 101, (2, 4), generator=g)
    bad = z.clone()
    bad[0, 1, 5] = float("nan")
    bad[0, 3, 100] = float("nan")
    bad[1, 0, 40] = float("inf")
    bad[1, 2, 100] = float("inf")
    poisoned = torch.zeros(2, 4, dtype=torch.bool)
    poisoned[0, 1] = poisoned[0, 3] = poisoned[1, 0] = poisoned[1, 2] = True
    logp, ent = (x.cpu() for x in R.logprobs_from_logits(bad.to(DEVICE), y.to(DEVICE), return_entropy=True,
                                                          backend=backend))
    clean, clean_ent = (x.cpu() for x in R.logprobs_from_logits(z.to(DEVICE), y.to(DEVICE), return_entropy=True,
                                                                backend=backend))
    assert torch.isnan(logp).equal(poisoned) and torch.isnan(ent).equal(poisoned)
    torch.testing.assert_close(logp[~poisoned], clean[~poisoned], rtol=0, atol=0)
    torch.testing.assert_close(ent[~poisoned], clean_ent[~poisoned], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", ["1", "per-token"])
def test_logprobs_from_logits(backend, dtype, temperature):
    g = torch.Generator().manual_seed(13)
    N, V = 19, 517
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3)
    logits[:, 5] = -float("inf")
    labels = torch.randint(6, V, (N,), generator=g).to(DEVICE)
    temp = 0.5 + torch.rand(N, generator=g, dtype=torch.float64) if temperature == "per-token" else 1.0
    temp = temp.to(DEVICE) if isinstance(temp, torch.Tensor) else temp
    x = logits.to(dtype).to(DEVICE).requires_grad_()
    before = x.detach().clone()
    logp, ent = R.logprobs_from_logits(x, labels, temperature=temp, return_entropy=True,
                                       backend=backend, chunk_size=6)
    (gx,) = grads(_upstream(logp, ent), [x])
    assert torch.equal(x.detach(), before), "the caller's logits must not be modified"
    assert gx.dtype == dtype and gx.data_ptr() != x.data_ptr()
    x64 = x.detach().double().requires_grad_()
    exact = ref.logprobs_from_logits(x64, labels, temp)
    (gx64,) = grads(_upstream(*exact), [x64])
    eager = ref.logprobs_from_logits(x, labels, temp.to(dtype) if isinstance(temp, torch.Tensor) else temp)
    eager = [e.detach() for e in eager]
    assert_matches("logp", logp, exact[0], eager[0], dtype)
    assert_matches("entropy", ent, exact[1], eager[1], dtype)
    assert torch.all(gx[:, 5] == 0)
    # the gradient is rounded once to the input dtype: allow one ulp of the largest entry
    assert_matches("grad_logits", gx, gx64, gx64.to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logprobs_from_3d_logits_with_scalar_temperature(backend, dtype):
    """A (B, T, V) view (``logits[:, :-1]``) with a scalar temperature other than 1: fp64 takes per-row temperatures
    on the Triton engine, one per row of the view (B T of them, not B)."""
    g = torch.Generator().manual_seed(23)
    B, T, V = 2, 6, 37
    full = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    x = full.requires_grad_()
    logp, ent = R.logprobs_from_logits(x[:, :-1], labels, temperature=0.7, return_entropy=True, backend=backend)
    (gx,) = grads(_upstream(logp, ent), [x])
    x64 = full.detach().double().requires_grad_()
    exact = ref.logprobs_from_logits(x64[:, :-1], labels, 0.7)
    (gx64,) = grads(_upstream(*exact), [x64])
    assert_matches("logp", logp, exact[0], dtype=dtype)
    assert_matches("entropy", ent, exact[1], dtype=dtype)
    assert_matches("grad_logits", gx, gx64, dtype=dtype)


def test_partial_requires_grad(backend):
    """A frozen LM head (weight without grad) and frozen hidden states both work and skip their GEMM."""
    p = make_problem(2, 5, 8, 37, seed=17)
    w = p["weight"].detach()
    logp = R.fused_logprobs(p["hidden"], w, p["labels"], backend=backend)
    (gh,) = grads(logp.sum(), [p["hidden"]])
    q = as_fp64(p)
    logp_r, _ = ref.linear_logprobs(q["hidden"], q["weight"].detach(), q["labels"])
    (gh_r,) = grads(logp_r.sum(), [q["hidden"]])
    assert_matches("grad_hidden", gh, gh_r)
    h = p["hidden"].detach()
    logp = R.fused_logprobs(h, p["weight"], p["labels"], backend=backend)
    (gw,) = grads(logp.sum(), [p["weight"]])
    logp_r, _ = ref.linear_logprobs(h, q["weight"], q["labels"])
    (gw_r,) = grads(logp_r.sum(), [q["weight"]])
    assert_matches("grad_weight", gw, gw_r)
    with torch.no_grad():
        out = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], backend=backend)
    assert not out.requires_grad


def test_packed_matches_padded(backend):
    p = make_problem(2, 6, 8, 29, seed=19)
    logp = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], backend=backend)
    flat = R.fused_logprobs(p["hidden"].reshape(-1, 8), p["weight"], p["labels"].reshape(-1), backend=backend)
    assert_matches("packed", flat, logp.reshape(-1))


@pytest.mark.parametrize("path", ["linear", "logits"])
def test_eager_calls_skip_the_custom_op_and_match_it(backend, path, monkeypatch):
    """Outside torch.compile the autograd entry points run the engine through plain autograd.Functions (no custom-op
    dispatch: host time a GPU waits for): the custom op is not called, and its results and gradients, called
    directly, are identical. Differentiating their gradient again raises, as it does through the op."""
    from rlkernels.engines import autograd as AG
    from rlkernels.engines.chunking import ChunkPlan

    p = make_problem(2, 5, 8, 37, bias=True, per_token_temperature=True, seed=7)
    called = []
    for name in ("linear_logprobs_op", "logits_logprobs_op", "linear_logprobs_backward_op",
                 "logits_logprobs_backward_op"):
        monkeypatch.setattr(AG, name, lambda *a, _f=getattr(AG, name), _n=name, **k: called.append(_n) or _f(*a, **k))
    labels, temp = p["labels"].reshape(-1), p["temperature"].reshape(-1)
    if path == "linear":
        leaves_ = [p["hidden"], p["weight"], p["bias"]]
        h = p["hidden"].reshape(-1, 8)
        plan = ChunkPlan(4, 37, 37)
        # with a final-logit cap: the twin and the op carry it alike
        twin = AG.linear_logprobs(backend, h, p["weight"], p["bias"], labels, temp, plan, 3.0)
        op = AG.linear_logprobs_op(h, p["weight"], p["bias"], labels, temp, 1.0, plan.rows, plan.vocab_block,
                                   backend, 3.0)[:2]
    else:
        z = (p["hidden"].reshape(-1, 8) @ p["weight"].detach().T).detach().requires_grad_()
        leaves_ = [z]
        plan = ChunkPlan(4, 37, 37)
        twin = AG.logits_logprobs(backend, z, labels, temp, plan, False)
        op = AG.logits_logprobs_op(z, labels, temp, 1.0, plan.rows, False, backend)[:2]
    assert called == [f"{path}_logprobs_op"]  # only the direct call above
    for a, b in zip(twin, op):
        assert torch.equal(a, b)
    twin_grads = grads(_upstream(*twin), leaves_)
    assert called == [f"{path}_logprobs_op"]  # the twin's backward: no backward op either
    for a, b in zip(twin_grads, grads(_upstream(*op), leaves_)):
        assert torch.equal(a, b)
    assert called == [f"{path}_logprobs_op", f"{path}_logprobs_backward_op"]
    lp, ent = (AG.linear_logprobs(backend, h, p["weight"], p["bias"], labels, temp, plan) if path == "linear"
               else AG.logits_logprobs(backend, z, labels, temp, plan, False))
    w = torch.ones_like(lp, requires_grad=True)  # an upstream gradient that itself depends on a leaf
    first = torch.autograd.grad((w * lp).sum() + ent.sum(), leaves_[0], create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiate twice"):  # as the op's "no autograd formula" error
        first.sum().backward()


def test_value_checks_read_back_on_the_device():
    """The value checks' read-back on the tests' device (on a GPU: non-blocking copies into pinned memory and one
    stream sync; a LateCheck waits on its event): the values as ``tolist()`` gives them, in order, and a
    LateCheck raises only when armed with a failed test."""
    import rlkernels._checks as C

    x = torch.tensor([3, -1, 7], device=DEVICE)
    lo, hi = torch.aminmax(x)
    flag = torch.isnan(torch.tensor([1.0, float("nan")], device=DEVICE)).any()
    assert C.read_back((lo, hi, flag, torch.tensor([0.5, 2.0], device=DEVICE))) == [-1, 7, True, [0.5, 2.0]]
    late = C.LateCheck()
    late.raise_if_failed()  # not armed: nothing to check
    late.arm((x.max() > 5, x.min()), lambda big, low: big and low < 0, lambda: "x is out of range")
    torch.ones(1000, device=DEVICE).cumsum(0)  # work queued after the check's copies: not waited for
    with pytest.raises(ValueError, match="x is out of range"):
        late.raise_if_failed()
    with pytest.raises(ValueError, match="x is out of range"):  # a second backward (retain_graph) raises again
        late.raise_if_failed()
    fine = C.LateCheck()
    fine.arm((x.max() > 10,), bool, lambda: "never")
    fine.raise_if_failed()
    # the read-back's buffer and the checks' pinned buffers are reused: many values, many checks outstanding at
    # once, each still reading its own values
    many = [torch.arange(k, k + 40, device=DEVICE) for k in range(6)] + [torch.tensor(True, device=DEVICE)]
    assert C.read_back(many) == [list(range(k, k + 40)) for k in range(6)] + [True]
    checks = []
    for k in range(5):
        checks.append(C.LateCheck())
        checks[-1].arm((torch.tensor(k, device=DEVICE),), lambda v, k=k: v != k, lambda: "a check read another's value")
    for check in reversed(checks):
        check.raise_if_failed()
    again = C.LateCheck()
    again.arm((torch.tensor([2.5, float("nan")], device=DEVICE).amax(),), math.isnan, lambda: "NaN found")
    with pytest.raises(ValueError, match="NaN found"):
        again.raise_if_failed()


def test_staging_places_each_layout_once():
    """A staging buffer places a layout of values (dtypes and shapes) once and reuses those places: the same tensors
    come back for the same layout, other layouts get their own, and a layout larger than the buffer grows it and
    places again; every place round-trips its value."""
    import rlkernels._checks as C

    staging = C._Staging(pin=False)
    a = [torch.tensor(3), torch.tensor(True)]
    first = staging.slots(a, [True, True])
    assert staging.slots([torch.tensor(-8), torch.tensor(False)], [True, True]) is first  # same layout
    other = staging.slots([torch.tensor([1.5, 2.5]), torch.tensor(4)], [True, False])
    assert other is not first and other[1] is None
    buf = staging.buf
    big = [torch.arange(500)]  # 4000 bytes: more than the first buffer
    slots = staging.slots(big, [True])
    assert staging.buf is not buf and staging.buf.numel() >= 4000
    slots[0].copy_(big[0])
    assert slots[0].tolist() == list(range(500))
    again = staging.slots(a, [True, True])
    assert again is not first and again[0].untyped_storage().data_ptr() == staging.buf.untyped_storage().data_ptr()
    for v, slot in zip(a, again):
        slot.copy_(v)
        assert slot.tolist() == v.tolist()


def test_staging_slots_place_each_value_aligned_in_one_buffer():
    """read_back's and LateCheck's layout of several values in one byte buffer, on CPU: every dtype and shape
    (0-d, empty, odd sizes) round-trips, each place is 16-byte aligned, unchosen values get none, and the buffer
    asked for holds them all."""
    import rlkernels._checks as C

    values = [torch.tensor(-3), torch.tensor(True), torch.tensor([0.5, 2.0], dtype=torch.float64), torch.zeros(0),
              torch.tensor([1, 2, 3], dtype=torch.int16), torch.tensor(7), torch.full((2, 3), 1.5)]
    chosen = [True, True, True, True, True, False, True]
    asked = []

    def buffer_of(nbytes):
        asked.append(nbytes)
        return torch.full((nbytes,), 255, dtype=torch.uint8)

    slots = C.staging_slots(values, chosen, buffer_of)
    assert len(asked) == 1 and asked[0] == 16 * 4 + 32  # the empty value takes no room
    for v, c, slot in zip(values, chosen, slots):
        if not c:
            assert slot is None
            continue
        slot.copy_(v)
        assert slot.dtype == v.dtype and slot.shape == v.shape and slot.tolist() == v.tolist()
        assert (slot.storage_offset() * slot.element_size()) % 16 == 0
