"""Triton-specific promises: runtime (not constexpr) sizes, and no recompilation when the completion length changes.

The numerical suite (test_logprobs, test_loss, test_memory, test_hypothesis) runs for the Triton engine under
``TRITON_INTERPRET=1`` on CPU (a CI step) and compiled on a GPU (``bench/device_check.sh``).
"""
import pytest
import torch

pytest.importorskip("triton")

from rlkernels.triton_ops import logprobs as K  # noqa: E402

import rlkernels as R  # noqa: E402
from rlkernels import reference as ref  # noqa: E402

from conftest import BACKENDS, DEVICE, as_fp64, assert_matches, check_events, grads, leaves, make_problem  # noqa: E402

KERNELS = [K._logits_stats_kernel, K._dlogits_kernel]
# constexpr only for tile sizes, feature flags and the accumulation dtype (STYLE.md practice 6)
ALLOWED_CONSTEXPR = {"HAS_BIAS", "TEMP", "HAS_GLOGP", "HAS_GENT", "ACC", "BLOCK_V", "LANES", "ROWS_3D", "STAGES",
                     "SPLIT_TAIL", "MASKED_ROWS", "PREFETCH", "FINISH", "SOFTCAP", "STREAM"}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__ if hasattr(k, "__name__") else str(k))
def test_sizes_and_hyperparameters_are_runtime_arguments(kernel):
    # read the annotations of the Python function: works for compiled and interpreted kernels alike
    import inspect

    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters.values()
    constexpr = {p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")}
    runtime = {p.name for p in params} - constexpr
    assert "BLOCK_V" in constexpr, "annotations not read"
    assert constexpr <= ALLOWED_CONSTEXPR, f"unexpected constexpr parameters {constexpr - ALLOWED_CONSTEXPR}"
    for name in ("n_cols", "v_offset", "stride_z", "stride_outer", "rows_inner", "inv_t_scalar", "softcap"):
        assert name in runtime


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts compiled kernels: needs a GPU (bench/device_check.sh)")
def test_no_recompile_across_completion_lengths():
    import rlkernels as R

    def cached():
        return sum(len(k.device_caches[torch.cuda.current_device()][0]) for k in KERNELS
                   if torch.cuda.current_device() in k.device_caches)

    counts = []
    for T in (37, 64, 129):  # three completion lengths, one of them a multiple of 16
        p = make_problem(2, T, 64, 1000, dtype=torch.bfloat16, seed=T, device=DEVICE)
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config="dapo", backend="triton")
        out.loss.backward()
        torch.cuda.synchronize()
        counts.append(cached())
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts


# per-row vectors: read one scalar per program, so never specialised on their alignment (else a new row offset or
# completion length compiles a new kernel)
ROW_VECTOR_ARGS = {"temp_ptr", "labels_ptr", "m_out", "s_out", "c_out", "zy_out", "m_ptr", "log_s_ptr", "cs_ptr",
                   "g_logp_ptr", "g_ent_ptr"}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__ if hasattr(k, "__name__") else str(k))
def test_row_vectors_are_not_specialised(kernel):
    import inspect

    if not hasattr(kernel, "do_not_specialize"):
        pytest.skip("the interpreter's kernel object keeps no specialisation list (checked in the run without it)")
    names = {p.name for p in inspect.signature(kernel.fn).parameters.values()}
    dns = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    assert names & ROW_VECTOR_ARGS <= dns and "v_offset" in dns, sorted(names & ROW_VECTOR_ARGS - dns)
    assert "z_ptr" not in dns, "the logits block keeps its alignment specialisation (vector loads)"


TRITON = "triton" in BACKENDS


class _LaunchKeys:
    """Stands in for a kernel and records, per launch, what a compiled Triton kernel is specialised on: every
    constexpr, and for the other arguments (minus ``do_not_specialize``) an int's being 1 or divisible by 16 and a
    tensor's 16-byte alignment. A launch with a new record is a new compile on a GPU."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or [
            kernel.arg_names[i] if isinstance(i, int) else i for i in getattr(kernel, "do_not_specialize", ())]
        self.skip = set(dns)

    @staticmethod
    def _key(value):
        if isinstance(value, torch.Tensor):
            return ("ptr", value.data_ptr() % 16 == 0)
        if isinstance(value, bool) or not isinstance(value, int):
            return (type(value).__name__,)
        return ("int", value == 1, value % 16 == 0)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            self.seen.add((getattr(self.kernel, "fn", self.kernel).__name__, tuple(sorted(
                (k, repr(v) if k.isupper() or k.startswith("num_") else self._key(v))
                for k, v in named.items() if k not in self.skip))))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("V", [96, 100])
def test_launches_specialise_alike_across_completion_lengths(monkeypatch, V):
    """The CPU side of test_no_recompile_across_completion_lengths: three completion lengths (one a multiple of 16)
    launch the kernels with the same specialisation, through the single pass and the two-stage path with a bias and
    per-token temperatures (in row chunks of 7, so that row slices start at every alignment), and the logits path
    on a (B, T, V) view with and without a mask. So none compiles again on a GPU. (It fails with the statistics
    outputs taken out of do_not_specialize: rows of a (4, N) tensor, aligned or not with N.) One exception, with V
    not a multiple of 16: the logits path's outer stride (T + 1) V of a logits[:, :-1] view divides by 16 for some
    T and not others, a second compile at most (its loads are narrow either way; a V that is a multiple of 16 keeps
    it divisible)."""
    seen = set()
    for name in ("_logits_stats_kernel", "_dlogits_kernel"):
        monkeypatch.setattr(K, name, _LaunchKeys(getattr(K, name), seen))
    after = []
    for T in (11, 16, 27):
        p = make_problem(2, T, 24, V, dtype=torch.bfloat16, seed=T, bias=True, per_token_temperature=True)
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config="dapo", backend="triton", chunk_size=7)
        out.loss.backward()
        logp = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], bias=p["bias"],
                                temperature=p["temperature"], backend="triton", chunk_size=7)
        logp.sum().backward()
        logits = torch.randn(2, T + 1, V).to(torch.bfloat16).to(DEVICE).requires_grad_()
        for mask in (None, p["mask"]):
            R.logprobs_from_logits(logits[:, :-1], p["labels"], mask=mask, backend="triton").sum().backward()
        keys = seen if V % 16 == 0 else {(name, tuple(kv for kv in key if kv[0] != "stride_outer"))
                                         for name, key in seen}
        after.append(len(keys))
    assert after[0] > 0 and after[1] == after[0] and after[2] == after[0], (after, sorted(seen))


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("accum", ["input", "fp32", "auto"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_grad_weight_accumulation_modes(monkeypatch, accum, single_pass):
    """bf16, several row chunks: both accumulation modes of grad_weight match the fp64 reference within the bf16
    tolerance (eager bf16 autograd sets the scale), in the single pass and in the recompute backward; the mode asked
    for is the one that ran ("auto" takes fp32 here: a 301 x 24 accumulator is far below the budget)."""
    from rlkernels.engines import triton_engine

    monkeypatch.setenv("RLKERNELS_GRAD_WEIGHT_ACCUM", accum)
    modes, init = [], triton_engine._Grads.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        modes.append("input" if self.w_in_input else "fp32")

    monkeypatch.setattr(triton_engine._Grads, "__init__", spy)
    p = make_problem(3, 11, 24, 301, dtype=torch.bfloat16, seed=5, device=DEVICE)
    q = as_fp64(p)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo")
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], backend="triton",
                            chunk_size=8, single_pass=single_pass, **kw)
    gh, gw = grads(out.loss, [p["hidden"], p["weight"]])
    assert gw.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    exact, _ = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"], **kw)
    gh64, gw64 = grads(exact, [q["hidden"], q["weight"]])
    eager, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], **kw)
    gh_e, gw_e = grads(eager, [p["hidden"], p["weight"]])
    assert_matches("grad_weight", gw, gw64, gw_e, torch.bfloat16)
    assert_matches("grad_hidden", gh, gh64, gh_e, torch.bfloat16)
    assert modes == [{"auto": "fp32"}.get(accum, accum)], modes


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
def test_grad_weight_accumulation_mode_is_checked(monkeypatch):
    monkeypatch.setenv("RLKERNELS_GRAD_WEIGHT_ACCUM", "fp16")
    p = make_problem(2, 4, 8, 37, dtype=torch.bfloat16, seed=6, device=DEVICE)
    with pytest.raises(ValueError, match="RLKERNELS_GRAD_WEIGHT_ACCUM"):
        R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                          old_logprobs=p["old_logprobs"], config="dapo", backend="triton")[0].backward()


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
def test_auto_accumulation_keeps_the_memory_budget(monkeypatch):
    """"auto" (the default) takes the fp32 grad_weight accumulator only when it needs at most half the budget, and
    the logits block then gets the rest: block + accumulator stay within the budget. A single row chunk (one GEMM,
    the same bits either way) and an accumulator too big for the budget accumulate in the input dtype; a call that
    fits one chunk of the whole budget is planned as one (15000 rows of the small head: not two chunks of the
    budget less the accumulator)."""
    from rlkernels.engines import load_engine, plan_chunks
    from rlkernels.engines.triton_engine import grad_weight_accum

    engine = load_engine("triton")
    monkeypatch.delenv("RLKERNELS_GRAD_WEIGHT_ACCUM", raising=False)
    qwen = torch.empty(152064, 3584, dtype=torch.bfloat16, device="meta")  # accumulator 2.2 GB: over a 1 GiB budget
    small = torch.empty(32000, 1024, dtype=torch.bfloat16, device="meta")  # accumulator 131 MB
    cases = ((qwen, 16384, None, "input"), (qwen, 65536, 8192, "fp32"), (small, 20000, None, "fp32"),
             (small, 16384, 200, "input"), (small, 100, None, "input"), (small, 15000, None, "input"),
             (small.float(), 16384, None, "input"))
    for w, n, budget_mb, want in cases:
        if budget_mb is None:
            monkeypatch.delenv("RLKERNELS_MEMORY_BUDGET_MB", raising=False)
        else:
            monkeypatch.setenv("RLKERNELS_MEMORY_BUDGET_MB", str(budget_mb))
        reserve = engine.budget_reserve(w, True)
        plan = plan_chunks(n, w.shape[0], default_mb=engine.default_budget_mb, elem_bytes=w.element_size(),
                           reserve_bytes=reserve)
        if w.dtype == torch.bfloat16:
            assert grad_weight_accum(w, n, plan) == want, (tuple(w.shape), n, budget_mb)
        assert (reserve > 0) == (want == "fp32" or n <= plan.rows), (tuple(w.shape), n, budget_mb)
        block = plan.rows * plan.vocab_block * w.element_size()
        assert block + (w.numel() * 4 if want == "fp32" else 0) <= (budget_mb or 1024) * 2**20
        assert engine.budget_reserve(w, False) == 0  # no grad_weight wanted: the whole budget for the block
    monkeypatch.setenv("RLKERNELS_GRAD_WEIGHT_ACCUM", "fp32")  # forced, whatever the budget; the block keeps it all
    assert engine.budget_reserve(small, True) == 0
    assert grad_weight_accum(qwen, 16384, plan_chunks(16384, 152064, default_mb=1024.0, elem_bytes=2)) == "fp32"


def test_triton_budget_counts_the_input_dtype():
    """The Triton engine's block is the GEMM output in the input dtype: a 1 GiB budget holds twice the bf16 rows."""
    from rlkernels.engines import load_engine, plan_chunks

    elem = load_engine("triton").block_elem_bytes(torch.bfloat16)
    assert elem == 2
    bf16 = plan_chunks(100000, 152064, budget_bytes=2**30, elem_bytes=elem)
    fp32 = plan_chunks(100000, 152064, budget_bytes=2**30)
    assert bf16.rows * 152064 * 2 <= 2**30 and fp32.rows * 152064 * 4 <= 2**30
    assert abs(bf16.rows - 2 * fp32.rows) <= 16 and not bf16.vocab_blocked


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("split", [True, False, "prefetch"])
@pytest.mark.parametrize("kernel", ["tile", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_cols", [1, 37, 200, 700])
def test_stats_kernels_match_float64(monkeypatch, kernel, dtype, n_cols, split):
    """Both loops of the statistics kernel (RLKERNELS_STATS_KERNEL) give M = max z~, S = sum exp(z~ - M) and
    C = sum exp(z~ - M)(z~ - M) of the block, with bias, per-row temperature, -inf logits (a whole -inf row too),
    labels outside the block, and more than one tile per row; with the whole tiles unmasked (split), prefetched a
    tile ahead (prefetch: rows of no whole tile, one and five), or every tile masked."""
    monkeypatch.setenv("RLKERNELS_STATS_KERNEL", kernel)
    monkeypatch.setattr(K, "BLOCK_V_FWD", 128)  # several tiles (and lanes that see few columns) at test sizes
    monkeypatch.setattr(K, "BLOCK_V_LANES", 128)
    # unmasked whole tiles + a masked last one, or every tile masked
    monkeypatch.setattr(K, "SPLIT_TAIL", split is not False)
    monkeypatch.setattr(K, "STATS_PREFETCH", split == "prefetch")
    g = torch.Generator().manual_seed(n_cols)
    rows = 6
    z = (torch.randn(rows, n_cols, generator=g, dtype=torch.float64) * 4).to(dtype)
    z[1, :: 3] = -float("inf")
    z[4] = -float("inf")
    bias = (torch.randn(n_cols, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    temp = 0.5 + torch.rand(rows, generator=g, dtype=torch.float64)
    offset = 5
    labels = torch.randint(offset, offset + n_cols, (rows,), generator=g)
    labels[2] = 0  # outside the block
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m, s, c, zy = K.logits_stats(z.to(DEVICE), labels.to(DEVICE), bias.to(DEVICE), temp.to(acc).to(DEVICE), offset)
    zt = ((z.double() + bias.double()) / temp.to(acc).double()[:, None]).clamp(min=-1e20)
    M = zt.max(1).values
    e = torch.exp(zt - M[:, None])
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(m.cpu().double(), M, rtol=rtol, atol=0)
    torch.testing.assert_close(s.cpu().double(), e.sum(1), rtol=rtol * 8, atol=0)
    torch.testing.assert_close(c.cpu().double(), (e * (zt - M[:, None])).sum(1), rtol=rtol * 8, atol=rtol * 8)
    want_zy = zt.gather(1, (labels - offset).clamp(0, n_cols - 1)[:, None]).squeeze(1)
    want_zy[labels < offset] = -float("inf")
    want_zy = torch.where(torch.isinf(want_zy) | (want_zy <= -1e20), torch.full_like(want_zy, -float("inf")), want_zy)
    got_zy = zy.cpu().double()
    assert torch.equal(torch.isinf(got_zy), torch.isinf(want_zy))
    fin = ~torch.isinf(want_zy)
    torch.testing.assert_close(got_zy[fin], want_zy[fin], rtol=rtol, atol=0)


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("loop", ["lanes", "prefetch"])
def test_other_stats_loops_in_the_whole_loss(monkeypatch, loop):
    """The lanes loop and the tile loop with register prefetch, end to end: dapo loss and gradients, bf16, bias and
    per-token temperature, equal the fp64 reference within the bf16 tolerance."""
    if loop == "lanes":
        monkeypatch.setenv("RLKERNELS_STATS_KERNEL", "lanes")
    else:
        monkeypatch.setattr(K, "STATS_PREFETCH", True)
        monkeypatch.setattr(K, "BLOCK_V_FWD", 64)  # several whole tiles per row at V = 301
    p = make_problem(2, 9, 16, 301, dtype=torch.bfloat16, seed=8, bias=True, per_token_temperature=True,
                     device=DEVICE)
    q = as_fp64(p)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo")
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            temperature=p["temperature"], backend="triton", **kw)
    got = grads(out.loss, leaves(p))
    exact, _ = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"],
                                      bias=q["bias"], temperature=q["temperature"], **kw)
    want = grads(exact, leaves(q))
    eager, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                      bias=p["bias"], temperature=p["temperature"], **kw)
    eager_g = grads(eager, leaves(p))
    assert_matches("loss", out.loss, exact, eager, torch.bfloat16)
    for name, a, b, e in zip(("hidden", "weight", "bias"), got, want, eager_g):
        assert_matches(f"grad_{name}", a, b, e, torch.bfloat16)


def test_stats_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("RLKERNELS_STATS_KERNEL", "warp")
    with pytest.raises(ValueError, match="RLKERNELS_STATS_KERNEL"):
        K.stats_kernel()


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("kernel", ["tile", "lanes"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_stats_kernel_flags_nonfinite_rows(monkeypatch, kernel, stages):
    """S is NaN exactly in the rows holding a NaN or +inf (in any tile); -inf is a value, not an error, and the other
    rows' statistics are those of the same rows computed without the flagged ones."""
    monkeypatch.setenv("RLKERNELS_STATS_KERNEL", kernel)
    monkeypatch.setattr(K, "BLOCK_V_FWD", 128)
    monkeypatch.setattr(K, "BLOCK_V_LANES", 128)
    monkeypatch.setattr(K, "STATS_STAGES", stages)  # pipelined loop (compiled only; the interpreter runs it plainly)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 300, generator=g).to(torch.bfloat16)
    z[0, 7] = float("nan")
    z[1, 299] = float("inf")  # the last, partial tile
    z[2, 5] = float("inf")  # a whole tile, with the row's largest finite value after it
    z[2, 200] = 40.0
    z[3, 150] = -float("inf")
    z[5, :] = -float("inf")
    labels = torch.randint(0, 300, (6,), generator=g)
    flagged = K.logits_stats(z.to(DEVICE), labels.to(DEVICE), None, 1.0)
    clean = K.logits_stats(z[3:].to(DEVICE), labels[3:].to(DEVICE), None, 1.0)
    assert torch.isnan(flagged[1].cpu()).tolist() == [True, True, True, False, False, False]
    for a, b in zip(flagged, clean):
        torch.testing.assert_close(a.cpu()[3:], b.cpu(), rtol=0, atol=0)
    assert flagged[1][5].item() == 300  # a row of -inf: every entry at the floor, equally likely


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_logits_value_check_rides_on_the_statistics_read(monkeypatch):
    """logprobs_from_logits on the Triton engine reads the logits once: no separate NaN scan, the kernel flags the
    rows; the error names the argument and counts kept rows only; -inf is allowed; checks off, no error and the rows
    holding NaN or +inf come out NaN (as eager's), never silently finite."""
    import rlkernels._inputs as I

    scanned = []
    real = I.check_finite_rows
    monkeypatch.setattr(I, "check_finite_rows", lambda name, *a, **k: (scanned.append(name), real(name, *a, **k)))
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 6, 97, generator=g, dtype=torch.float64).to(torch.bfloat16)
    y = torch.randint(0, 97, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    z[0, 0, ::5] = -float("inf")
    y[0, 0] = 1
    clean = R.logprobs_from_logits(z.to(DEVICE), y.to(DEVICE), mask=mask.to(DEVICE), backend="triton")
    want, _ = ref.logprobs_from_logits(z.double(), y)
    torch.testing.assert_close(clean.cpu().double()[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert "logits" not in scanned
    bad = z.clone()
    bad[0, 2, 50] = float("nan")
    bad[1, 1, 3] = float("inf")
    bad[1, 5, 0] = float("nan")  # a masked-out row: ignored
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf in 2 row\(s\)"):
        R.logprobs_from_logits(bad.to(DEVICE), y.to(DEVICE), mask=mask.to(DEVICE), backend="triton")
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    out = R.logprobs_from_logits(bad.to(DEVICE), y.to(DEVICE), mask=mask.to(DEVICE), backend="triton").cpu()
    poisoned = torch.zeros(2, 6, dtype=torch.bool)
    poisoned[0, 2] = poisoned[1, 1] = True
    assert torch.isnan(out).equal(poisoned)  # the masked-out row with a NaN is never read: 0
    torch.testing.assert_close(out[~poisoned], clean.cpu()[~poisoned], rtol=0, atol=0)


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_logits_nan_check_is_read_by_backward_when_a_gradient_is_needed(monkeypatch):
    """With the logits' gradient needed, the forward reads nothing back (the statistics kernel flags both NaN logits
    and labels out of range) and returns without waiting for the statistics kernel; backward queues the gradient's
    kernel, then raises the NaN check's error naming the argument, returning no gradient. A label out of range is
    raised the same way, naming the labels, and before the logits' NaN when both are bad. Without a gradient needed
    the forward raises, as before; a clean call's gradient is unchanged."""
    import rlkernels._checks as C

    reads = []
    read_back = C.read_back
    monkeypatch.setattr(C, "read_back", lambda values: (reads.append(len(values)), read_back(values))[1])
    arm_all = C.LateCheck.arm_all
    monkeypatch.setattr(C.LateCheck, "arm_all", lambda self, checks: (
        reads.append(("late", sum(len(c[0]) for c in checks))), arm_all(self, checks))[1])
    launches = []
    launch = K._launch_dlogits
    monkeypatch.setattr(K, "_launch_dlogits", lambda *a, **k: (launches.append(1), launch(*a, **k))[1])
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 131, generator=g, dtype=torch.float64).to(torch.bfloat16)
    y = torch.randint(0, 131, (7,), generator=g)
    bad = z.clone()
    bad[2, 40] = float("nan")
    x = bad.to(DEVICE, copy=True).requires_grad_()
    logp, ent = R.logprobs_from_logits(x, y.to(DEVICE), return_entropy=True, backend="triton")
    # nothing read before the launch (the kernel checks the labels too); the NaN flag armed for backward
    assert reads == [("late", 1)], reads
    assert torch.isnan(logp[2]).item() and not torch.isnan(logp[torch.arange(7) != 2]).any()
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf in 1 row\(s\) \(found in the forward pass"):
        (logp.sum() + ent.sum()).backward()
    assert launches == [1] and x.grad is None  # the kernel was queued; nothing was returned
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf in 1 row\(s\)$"):
        with torch.no_grad():
            R.logprobs_from_logits(x, y.to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf in 1 row\(s\)$"):
        R.logprobs_from_logits(bad.to(DEVICE), y.to(DEVICE), backend="triton")
    # labels out of range (past V, negative) in a call whose logits also hold a NaN: the labels' error, in backward
    for label in (131, -3):
        y_bad = y.clone()
        y_bad[5] = label
        x = bad.to(DEVICE, copy=True).requires_grad_()
        logp = R.logprobs_from_logits(x, y_bad.to(DEVICE), backend="triton")
        assert torch.isnan(logp[5]).item() and torch.isnan(logp[2]).item()
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, V=131\) at kept positions; found {label} at "
                                             r"index \(5,\) \(found in the forward pass; raised in backward"):
            logp.sum().backward()
        assert x.grad is None
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, V=131\) at kept positions; found {label} at "
                                             r"index \(5,\)$"):
            R.logprobs_from_logits(z.to(DEVICE), y_bad.to(DEVICE), backend="triton")
    reads.clear()
    clean = z.to(DEVICE, copy=True).requires_grad_()
    logp = R.logprobs_from_logits(clean, y.to(DEVICE), backend="triton")
    logp.sum().backward()
    assert reads == [("late", 1)] and not torch.isnan(clean.grad).any()
    z64 = z.double().requires_grad_()
    want = ref.logprobs_from_logits(z64, y)[0]
    want.sum().backward()
    torch.testing.assert_close(logp.detach().cpu().double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clean.grad.cpu().double(), z64.grad, rtol=2 ** -7, atol=1e-3)


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("copy_after", [False, True], ids=["copies-before", "copies-after"])
@pytest.mark.parametrize("masked", [False, True])
def test_logits_kernel_is_queued_before_the_checks_are_read(monkeypatch, masked, copy_after):
    """The logits op prepares its statistics launch (outputs, arguments, key) with its value checks, queues the
    checks' copies, then the kernel, and only then waits for the checks (the kernel stays in bounds for any value):
    the GPU computes while the host waits, where it idled from the host sync to the launch. A per-token temperature
    out of range still raises, naming the argument, before anything is returned; no host sync comes before the
    launch. The labels need no check before the launch at all: the kernel flags those out of range (a kept negative
    one too, with a mask), and the NaN scan after it raises their error. With COPY_AFTER_LAUNCH the copies are
    queued after the kernel (on CUDA on a side stream, behind the checks' reductions), and the results and errors
    are the same."""
    import rlkernels._checks as C
    import rlkernels.triton_ops.logprobs as KL

    monkeypatch.setattr(C, "COPY_AFTER_LAUNCH", copy_after)
    stats = ("_logits_stats_kernel",)
    first = [("launch",) + stats, "copy"] if copy_after else ["copy", ("launch",) + stats]
    events = check_events(monkeypatch)
    prepare = KL.prepare_launch

    def recorded(kernel, *a, **k):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        events.append(("prepare", name))
        start = prepare(kernel, *a, **k)
        return lambda: (events.append(("launch", name)), start())[1]

    monkeypatch.setattr(KL, "prepare_launch", recorded)
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2, 5, 131, generator=g).to(torch.bfloat16).to(DEVICE).requires_grad_()
    y = torch.randint(0, 131, (2, 5), generator=g).to(DEVICE)
    t = (0.5 + torch.rand(2, 5, generator=g)).to(DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE) if masked else None
    want = ref.logprobs_from_logits(z.detach().double().cpu(), y.cpu())[0]
    want_t = ref.logprobs_from_logits(z.detach().double().cpu(), y.cpu(), temperature=t.double().cpu())[0]
    # a scalar temperature: nothing to check before the launch; the NaN scan's flag armed for the backward pass
    logp = R.logprobs_from_logits(z, y, mask=mask, backend="triton")
    assert events == [("prepare",) + stats, ("launch",) + stats, "copy"], events
    torch.testing.assert_close(logp.detach().double().cpu(), want, rtol=1e-5, atol=1e-5)
    # a per-token temperature: its check's copy, the launch, the wait; then the NaN flag
    events.clear()
    logp = R.logprobs_from_logits(z, y, mask=mask, temperature=t, backend="triton")
    assert events == [("prepare",) + stats] + first + ["wait", "copy"], events
    torch.testing.assert_close(logp.detach().double().cpu(), want_t, rtol=1e-5, atol=1e-5)
    events.clear()
    t_bad = t.clone()
    t_bad[1, 2] = 0.0
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0 at kept positions; found 0.0 at 1 "):
        R.logprobs_from_logits(z, y, mask=mask, temperature=t_bad, backend="triton")
    assert events == [("prepare",) + stats] + first + ["wait"], events
    # labels out of range: the kernel flags them, the backward raises (before returning without a gradient)
    for label in (131, -1):
        bad = y.clone()
        bad[1, 2] = label
        events.clear()
        logp = R.logprobs_from_logits(z, bad, mask=mask, backend="triton")
        assert events == [("prepare",) + stats, ("launch",) + stats, "copy"], events
        assert torch.isnan(logp[1, 2]).item() and torch.isnan(logp).sum() == 1
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, V=131\) at kept positions; found {label} at "
                                             r"index \(1, 2\)"):
            logp.sum().backward()
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, V=131\) at kept positions; found {label} "):
            with torch.no_grad():
                R.logprobs_from_logits(z, bad, mask=mask, backend="triton")
    if masked:  # a masked-out position may hold any label
        bad = y.clone()
        bad[1, 2] = -100
        part = mask.clone()
        part[1, 2] = False
        logp = R.logprobs_from_logits(z, bad, mask=part, backend="triton")
        assert logp[1, 2] == 0 and not torch.isnan(logp).any()
        logp.sum().backward()
        z.grad = None
    # the earlier order, kept for the benchmarks' same-process baseline: one sync, then the launch
    events.clear()
    monkeypatch.setattr(C, "READ_AFTER_LAUNCH", False)
    R.logprobs_from_logits(z, y, mask=mask, temperature=t, backend="triton")
    assert events == [("prepare",) + stats, "sync", ("launch",) + stats, "copy"], events
    monkeypatch.setattr(C, "READ_AFTER_LAUNCH", True)
    # value checks off: nothing copied or read
    events.clear()
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    R.logprobs_from_logits(z, y, mask=mask, temperature=t, backend="triton")
    assert events == [("prepare",) + stats, ("launch",) + stats], events


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("copy_after", [False, True], ids=["copies-before", "copies-after"])
@pytest.mark.parametrize("path", ["fused_logprobs", "two-stage", "single pass", "gspo single pass"])
def test_linear_checks_are_read_once_the_forward_is_queued(monkeypatch, path, copy_after):
    """fused_logprobs / fused_grpo_loss on the Triton engine queue their value checks' copies, then the forward's
    kernels, and wait for the checks only then (its kernels stay in bounds for any label): bad labels of any size
    still raise, naming the argument, before anything is returned, and before an error the call would raise of its
    own (single_pass=True that cannot apply). With checks off nothing is copied. With COPY_AFTER_LAUNCH the copies
    are queued after the first kernel."""
    import rlkernels._checks as C
    import rlkernels.triton_ops.logprobs as KL

    monkeypatch.setattr(C, "COPY_AFTER_LAUNCH", copy_after)  # the copies queued after the forward's first kernel
    first = ["launch", "copy"] if copy_after else ["copy", "launch"]
    events = check_events(monkeypatch)
    prepare = KL.prepare_launch

    def launch():
        if "launch" not in events:  # the first of the forward's Triton kernels
            events.append("launch")

    monkeypatch.setattr(KL, "prepare_launch", lambda *a, **k: (
        lambda start=prepare(*a, **k): (launch(), start())[1]))
    monkeypatch.setattr(KL, "fast_launch", lambda *a, **k: (launch(), prepare(*a, **k)())[1])
    p = make_problem(2, 5, 16, 131, dtype=torch.float32, device=DEVICE)
    h, w, y, adv = p["hidden"], p["weight"], p["labels"], p["advantages"]

    def call(labels, **kw):
        if path == "fused_logprobs":
            return R.fused_logprobs(h, w, labels, backend="triton", **kw)
        config = "gspo" if path.startswith("gspo") else "dapo"
        out = R.fused_grpo_loss(h, w, labels, adv, p["mask"] if "mask" not in kw else kw.pop("mask"),
                                backend="triton", config=config, single_pass=path != "two-stage", **kw)
        return out.loss

    call(y)
    assert events == first + ["wait"], events  # no read_back: nothing waits for the checks before
    for bad in (131, 131 + 1000, -100, 2 ** 40):
        events.clear()
        labels = y.clone()
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, V=131\) at kept positions; found {bad} "):
            call(labels)
        assert events[:2] == first and "wait" in events, events
    if path == "gspo single pass":  # a sequence longer than a row chunk: single_pass=True cannot apply
        labels = y.clone()
        labels[0, 0] = 131
        with pytest.raises(ValueError, match="labels must lie"):
            call(labels, chunk_size=2, mask=None)
        with pytest.raises(ValueError, match="single_pass=True cannot apply"):
            call(y, chunk_size=2, mask=None)
    events.clear()
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    call(y)
    assert "copy" not in events and "wait" not in events, events


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("masked_rows", [False, True])
def test_logits_kernels_stay_in_bounds_for_any_label(masked_rows):
    """What lets the logits op queue its statistics kernel before its labels are known to be in range
    (``TritonEngine.safe_for_any_values``): a label outside ``[0, V)`` reads nothing outside its row's logits. The
    logits sit inside a buffer whose other entries are NaN, so a read outside them would show as NaN in the entropy
    or the gradient; the row of such a label gives logp NaN (the flag the op's label check reads:
    ``flags_bad_labels``) and its true entropy, or, negative with masked rows, the skipped row's zeros; every other
    row is exact. The same for the gradient kernel: no one-hot in such a row, nothing NaN.
    """
    g = torch.Generator().manual_seed(4)
    rows, V = 6, 100
    buf = torch.full((rows + 2, V + 64), float("nan"), dtype=torch.float32)
    z = buf[1:rows + 1, 32:32 + V]  # NaN all around: before, after and between the rows
    z.copy_(torch.randn(rows, V, generator=g) * 3)
    good = torch.randint(0, V, (rows,), generator=g)
    labels = good.clone()
    labels[1], labels[2], labels[3], labels[4] = V, V + 20, -5, 2 ** 40  # past the row, into the next, before it
    out = K.logits_stats(z.to(DEVICE), labels.to(DEVICE), None, 1.0, masked_rows=masked_rows, finish=True)
    logp, ent = out[3].cpu(), out[4].cpu()
    want_lp = torch.log_softmax(z.double(), -1)
    want_ent = -(want_lp.exp() * want_lp).sum(-1)
    fine = torch.tensor([True, False, False, False, False, True])
    torch.testing.assert_close(logp[fine].double(), want_lp[fine].gather(1, good[fine, None]).squeeze(1))
    torch.testing.assert_close(ent[fine].double(), want_ent[fine])
    for row in (1, 2, 4):  # past V: not in the block; flagged NaN (the logits op's label check reads it)
        assert torch.isnan(logp[row]) and torch.isclose(ent[row].double(), want_ent[row]), row
    if masked_rows:  # negative: a masked-out row, never read
        assert logp[3] == 0 and ent[3] == 0
    else:
        assert torch.isnan(logp[3]) and torch.isclose(ent[3].double(), want_ent[3])
    # the gradient kernel (the single pass runs it in the forward): no one-hot where the label is not in the block
    grad = torch.full((rows, V), float("nan"), device=DEVICE)
    ones = torch.ones(rows, device=DEVICE)
    K.dlogits(z.to(DEVICE), grad, labels.to(DEVICE), None, 1.0, 0, out[0], out[1], out[2], ones, None,
              masked_rows=masked_rows)
    want = -want_lp.exp()
    want[fine.nonzero().squeeze(1), good[fine]] += 1
    if masked_rows:
        want[3] = 0
    grad = grad.cpu().double()
    assert not grad.isnan().any()  # nothing read outside the logits, every entry written
    # every row, the label past 2^31 (row 4) too: it is made -1 before the int32 compare, so it cannot wrap into the
    # block and place a one-hot there
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
def test_kernels_wait_for_labels_only_when_rows_may_be_masked(monkeypatch):
    """The kernels skip masked-out rows (negative labels) only when told that there may be some, since skipping makes
    each tile's loads wait for its row's label: the logits path with a mask says so; the logits path without one,
    and the hidden+W path (kept rows gathered), do not. Both launches give the same values on kept rows."""
    import rlkernels.engines.triton_engine as E

    seen = []
    for name in ("logits_stats", "dlogits"):
        real = getattr(E, name)
        monkeypatch.setattr(E, name, lambda *a, _real=real, _name=name, **k: (
            seen.append((_name, k["masked_rows"])), _real(*a, **k))[1])
    p = make_problem(2, 5, 8, 37, dtype=torch.float32)
    logits = (p["hidden"] @ p["weight"].T).detach().requires_grad_()
    got = {}
    for mask in (None, torch.ones_like(p["mask"])):
        seen.clear()
        logp = R.logprobs_from_logits(logits, p["labels"], mask=mask, backend="triton")
        g, = torch.autograd.grad(logp.sum(), logits)
        assert seen == [("logits_stats", mask is not None), ("dlogits", mask is not None)]
        got[mask is None] = (logp, g)
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    seen.clear()
    R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], backend="triton").sum().backward()
    assert seen and all(masked is False for _, masked in seen)


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("layout", ["contiguous", "shifted view", "2-D"])
def test_masked_logits_rows_are_skipped_not_copied(layout):
    """The Triton logits path hands the kernels the caller's tensor as it is, a (B, T, V) view such as
    ``logits[:, :-1]`` included, and marks dropped rows with a negative label: no gather of the kept rows or
    flattening copy (forward) and no scatter into zeros (backward). The one N x V tensor made is the gradient;
    dropped rows may hold NaN and garbage labels and still give 0 and a 0 gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class BigTensors(TorchDispatchMode):
        def __init__(self, nbytes):
            super().__init__()
            self.nbytes, self.made = nbytes, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # ops that write into a tensor they were given (the interpreter's copies of a kernel's arguments: set_,
            # copy_) make nothing new; views and detach share the storage
            if func._schema.is_mutable or func in (torch.ops.aten.view.default, torch.ops.aten.detach.default,
                                                   torch.ops.aten._unsafe_view.default):
                return out
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() * t.element_size() >= self.nbytes:
                    self.made.append(str(func))
            return out

    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 8, 203
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[0, 0] = True
    z[~mask] = float("nan")
    y[~mask] = -100
    temp = 0.6 + torch.rand(B, T, generator=g, dtype=torch.float64)
    g_lp, g_en = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    if layout == "shifted view":  # the model's (B, T + 1, V) output, last position dropped
        full = torch.cat([z, torch.randn(B, 1, V, generator=g).to(z.dtype)], 1).to(DEVICE).requires_grad_()
        x = full[:, :-1]
        assert not x.is_contiguous()
        leaf = full
    else:
        x = leaf = z.to(DEVICE).requires_grad_()
    args = (x, y.to(DEVICE), mask.to(DEVICE), temp.float().to(DEVICE), g_lp.to(DEVICE), g_en.to(DEVICE))
    if layout == "2-D":
        x, *rest = args
        args = (x.reshape(B * T, V), *(a.reshape(B * T) for a in rest))
    with BigTensors(B * T * V) as probe:  # half the bf16 tensor's bytes
        lp, en = R.logprobs_from_logits(args[0], args[1], mask=args[2], temperature=args[3], return_entropy=True,
                                        backend="triton")
        (gx,) = torch.autograd.grad((lp, en), leaf, (args[4], args[5]))
    # the shifted view's gradient goes through slice_backward into the (B, T + 1, V) leaf: autograd's, not ours
    made = [op for op in probe.made if op != "aten.slice_backward.default"]
    assert made == ["aten.empty.memory_format"], probe.made  # the gradient, allocated by the backward
    lp, en = lp.reshape(B, T), en.reshape(B, T)
    gx = gx[:, :-1] if layout == "shifted view" else gx.reshape(B, T, V)
    keep = mask
    assert torch.equal(lp.cpu()[~keep], torch.zeros(int((~keep).sum()))) and not torch.isnan(en.cpu()).any()
    assert torch.equal(gx.cpu()[~keep].float(), torch.zeros(int((~keep).sum()), V))
    zk = z.double()[keep].requires_grad_()
    want_lp, want_en = ref.logprobs_from_logits(zk, y[keep], temperature=temp[keep])
    (want_g,) = torch.autograd.grad((want_lp, want_en), zk, (g_lp[keep].double(), g_en[keep].double()))
    torch.testing.assert_close(lp.cpu().double()[keep], want_lp.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(en.cpu().double()[keep], want_en.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gx.cpu().double()[keep], want_g, rtol=1e-2, atol=1e-2 * float(want_g.abs().max()))


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("n_cols", [37, 300, 384])
def test_padded_block_rows(monkeypatch, split, n_cols, stream):
    """The engine's blocks pad each row to a multiple of 16 entries (16-byte loads for any V): the kernels read up to
    the padded width and ignore what the padding holds (NaN here), dL/dz in place leaves 0 there, and the results
    equal those of an unpadded block, with unmasked whole tiles (split) or every tile masked, with and without the
    dL/dz kernel's streaming cache hints."""
    monkeypatch.setattr(K, "SPLIT_TAIL", split)
    monkeypatch.setattr(K, "SPLIT_TAIL_BWD", split)
    monkeypatch.setattr(K, "STREAM_BWD", stream)
    monkeypatch.setattr(K, "BLOCK_V_FWD", 128)
    monkeypatch.setattr(K, "BLOCK_V_BWD", 128)
    g = torch.Generator().manual_seed(n_cols)
    rows, width = 5, K.padded_width(n_cols)
    z = (torch.randn(rows, n_cols, generator=g) * 3).to(torch.bfloat16)
    z[1, ::7] = -float("inf")
    labels = torch.randint(0, n_cols, (rows,), generator=g)
    labels[3] = -1  # a masked-out row
    bias = (torch.randn(n_cols, generator=g) * 0.5).to(torch.bfloat16)
    g_lp, g_en = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    buf = torch.full((rows, width), float("nan"), dtype=torch.bfloat16)
    buf[:, :n_cols] = z
    args = [t.to(DEVICE) for t in (labels, bias)]
    plain = K.logits_stats(z.to(DEVICE), *args, 0.7)
    bufd = buf.to(DEVICE)
    block = bufd[:, :n_cols]
    padded = K.logits_stats(block, *args, 0.7, n_load=width)
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, equal_nan=False)
    m, s, c, _ = plain
    log_s, cs = torch.log(s), c / s
    want = K.dlogits(z.to(DEVICE), torch.empty_like(z.to(DEVICE)), *args, 0.7, 0, m, log_s, cs, g_lp.to(DEVICE),
                     g_en.to(DEVICE))
    got = K.dlogits(block, block, *args, 0.7, 0, m, log_s, cs, g_lp.to(DEVICE), g_en.to(DEVICE), n_load=width)
    assert torch.equal(got.cpu(), want.cpu()) and torch.all(want.cpu()[3] == 0)
    assert torch.all(bufd.cpu()[:, n_cols:] == 0)  # the padding (none at 384) holds 0 after dL/dz


def test_autotune_picks_the_fastest_once(monkeypatch):
    """pick(): times every candidate, keeps the fastest per key for the process, keeps the default (first) unless
    another beats it by more than 3%, skips candidates the compiler rejects, and says so when none runs. (Timings
    are stubbed: this is the selection logic, not a timed test.)"""
    from triton.runtime.errors import OutOfResources

    from rlkernels.triton_ops import autotune

    autotune.reset()
    ms = {"default": 4.0, "fast": 1.0, "slow": 6.0, "near": 3.9}
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg == "too big":
            raise OutOfResources(1, 0, "shared memory")

    def fake_median_ms(fn, device):
        fn()
        return ms[calls[-1]]

    monkeypatch.setattr(autotune, "_median_ms", fake_median_ms)
    key = ("stats", torch.device("cpu"), torch.bfloat16, 4096)
    assert autotune.pick(key, ["default", "too big", "fast", "slow"], run) == "fast"
    n = len(calls)
    assert autotune.pick(key, ["default", "too big", "fast", "slow"], run) == "fast" and len(calls) == n
    assert autotune.pick(key[:3] + (8192,), ["default", "near"], run) == "default"  # 2.5% faster: noise
    with pytest.raises(RuntimeError, match="no candidate ran"):
        autotune.pick(key[:3] + (2,), ["too big"], run)
    assert autotune.bucket(152064) == 262144 and autotune.bucket(4096) == 4096 and autotune.bucket(1) == 1
    autotune.reset()


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
def test_autotuned_kernels_give_the_same_results(monkeypatch):
    """RLKERNELS_AUTOTUNE=1: a tuned (non-default) launch gives the defaults' results (in place too: tuning writes
    only into scratch, never into the block that dL/dz overwrites)."""
    from rlkernels.triton_ops import autotune

    alt_stats, alt_dlogits = K.LaunchConfig(64, 2), K.LaunchConfig(64, 2, 1, False)
    monkeypatch.setattr(autotune, "stats_candidates", lambda lanes: [K.stats_launch(lanes), alt_stats])
    monkeypatch.setattr(autotune, "dlogits_candidates", lambda: [K.dlogits_launch(), alt_dlogits])
    ms = iter([2.0, 1.0] * 2)  # the candidates run for real; the stubbed clock makes the non-default one win

    def fake_median_ms(fn, device):
        fn()
        return next(ms)

    monkeypatch.setattr(autotune, "_median_ms", fake_median_ms)
    g = torch.Generator().manual_seed(21)
    z = (torch.randn(6, 300, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    y = torch.randint(0, 300, (6,), generator=g).to(DEVICE)
    g1, g2 = torch.randn(6, generator=g).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)

    def both():
        m, s, c, zy = K.logits_stats(z, y, None, 0.8)
        log_s, cs = torch.log(s), c / s
        block = z.clone()
        K.dlogits(block, block, y, None, 0.8, 0, m, log_s, cs, g1, g2)
        return (m, s, c, zy, block)

    monkeypatch.delenv("RLKERNELS_AUTOTUNE", raising=False)
    plain = both()
    monkeypatch.setenv("RLKERNELS_AUTOTUNE", "1")
    autotune.reset()
    tuned = both()
    assert sorted(map(str, autotune.tuned().values())) == sorted(map(str, (alt_stats, alt_dlogits)))
    for a, b in zip(tuned, plain):
        torch.testing.assert_close(a.cpu().float(), b.cpu().float(), rtol=1e-6, atol=1e-6)
    autotune.reset()


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_launch_argument_overrides_the_defaults(monkeypatch):
    """A kernel call's ``launch=`` (bench/gpu_tune.py's sweep) replaces the default launch and leaves the module's
    defaults as they were; the results match the default launch's. override_defaults restores the constants when
    its block raises, and names only the tunable ones."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(6, 300, generator=g) * 3).to(DEVICE)
    y = torch.randint(0, 300, (6,), generator=g).to(DEVICE)
    before = (K.BLOCK_V_FWD, K.NUM_WARPS_FWD, K.BLOCK_V_BWD, K.NUM_WARPS_BWD, K.STATS_STAGES, K.SPLIT_TAIL)
    launched = []
    for name in ("_launch_stats", "_launch_dlogits"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _o=original, **kw: launched.extend(
            x for x in a if isinstance(x, K.LaunchConfig)) or _o(*a, **kw))
    m, s, c, zy = K.logits_stats(z, y, None, 1.0)
    m2, s2, c2, zy2 = K.logits_stats(z, y, None, 1.0, launch=K.LaunchConfig(64, 1, 1, False))
    for a, b in ((m, m2), (s, s2), (c, c2), (zy, zy2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    log_s, cs = torch.log(s), c / s
    g1, g2 = torch.randn(6, generator=g).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)
    d1 = K.dlogits(z, torch.empty_like(z), y, None, 1.0, 0, m, log_s, cs, g1, g2)
    d2 = K.dlogits(z, torch.empty_like(z), y, None, 1.0, 0, m, log_s, cs, g1, g2, launch=K.LaunchConfig(32, 1, 1, True))
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=1e-7)
    assert launched == [K.stats_launch(False), K.LaunchConfig(64, 1, 1, False), K.dlogits_launch(),
                        K.LaunchConfig(32, 1, 1, True)]
    assert (K.BLOCK_V_FWD, K.NUM_WARPS_FWD, K.BLOCK_V_BWD, K.NUM_WARPS_BWD, K.STATS_STAGES, K.SPLIT_TAIL) == before
    with pytest.raises(RuntimeError, match="inside"):
        with K.override_defaults(BLOCK_V_FWD=64, SPLIT_TAIL=not before[-1]):
            assert (K.BLOCK_V_FWD, K.SPLIT_TAIL) == (64, not before[-1])
            raise RuntimeError("inside")
    assert (K.BLOCK_V_FWD, K.NUM_WARPS_FWD, K.BLOCK_V_BWD, K.NUM_WARPS_BWD, K.STATS_STAGES, K.SPLIT_TAIL) == before
    with pytest.raises(KeyError, match="ROW_PAD"):
        with K.override_defaults(ROW_PAD=8):
            pass


@pytest.mark.parametrize("dtype, accum", [(torch.float32, "auto"), (torch.bfloat16, "input"),
                                          (torch.bfloat16, "fp32")])
@pytest.mark.parametrize("vocab_block", [10, 4])
def test_gradient_buffers_are_written_then_added(monkeypatch, dtype, accum, vocab_block):
    """The Triton engine's gradient buffers start uninitialised where the first GEMM writes them (grad_hidden's rows
    by their first vocabulary block, grad_weight by the first row chunk), so nothing left in them reaches the result
    (filled with NaN here before the adds); over 3 row chunks and 1 or 3 vocabulary blocks they equal dz W and
    dz^T h; with no chunk added they are zeros, and a chunk without an upstream gradient leaves zeros in its rows."""
    from rlkernels.engines import triton_engine as TE
    from rlkernels.engines.chunking import ChunkPlan

    monkeypatch.setenv("RLKERNELS_GRAD_WEIGHT_ACCUM", accum)
    g = torch.Generator().manual_seed(11)
    N, H, V = 9, 16, 10
    hid = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(V, H, generator=g).to(dtype).to(DEVICE)
    dz = torch.randn(N, V, generator=g).to(dtype).to(DEVICE)
    plan = ChunkPlan(4, vocab_block, V)

    def fresh():
        grads = TE._Grads(hid, w, None, True, True, False, plan)
        grads.h.fill_(float("nan"))  # the buffers a GEMM writes first
        if grads.w_written:
            grads.w.fill_(float("nan"))
        return grads

    grads = fresh()
    for r0, r1 in plan.ranges(N):
        for v0 in range(0, V, vocab_block):
            v1 = min(v0 + vocab_block, V)
            grads.add(dz[r0:r1, v0:v1].contiguous(), hid[r0:r1], w, r0, v0, v1)
    gh, gw, _ = grads.results()
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double().cpu(), (dz.double() @ w.double()).cpu(), **tol)
    torch.testing.assert_close(gw.double().cpu(), (dz.double().T @ hid.double()).cpu(), **tol)
    gh, gw, _ = fresh().results()
    assert not gh.any() and not gw.any()
    grads = fresh()  # the first row chunk adds nothing (no upstream gradient): its rows are 0, the rest as before
    grads.no_rows(0, 4)
    for r0, r1 in plan.ranges(N)[1:]:
        for v0 in range(0, V, vocab_block):
            v1 = min(v0 + vocab_block, V)
            grads.add(dz[r0:r1, v0:v1].contiguous(), hid[r0:r1], w, r0, v0, v1)
    gh, gw, _ = grads.results()
    part = dz.double().clone()
    part[:4] = 0
    torch.testing.assert_close(gh.double().cpu(), (part @ w.double()).cpu(), **tol)
    torch.testing.assert_close(gw.double().cpu(), (part.T @ hid.double()).cpu(), **tol)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="2^31 logits (4.3 GB): a GPU test (bench/device_check.sh)")
@pytest.mark.parametrize("layout", ["(N, V)", "(B, T, V)"])
def test_logits_past_int32_offsets(layout):
    """The logits op over more than 2^31 logits, where a row's element offset row x V no longer fits in int32 (from
    row 14123 at V = 152064): log-probs, entropies and the gradient of rows on both sides of that bound equal the
    fp32 eager computation of those rows, for an (N, V) tensor and a (B, T, V) one (its rows b T + t)."""
    V = 152064
    first_past = -(-2 ** 31 // V)  # the first row whose offset passes 2^31
    N = 2 * (first_past + 8)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = (torch.randn(N, V, device=DEVICE, generator=g) * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    g_lp, g_en = torch.randn(N, device=DEVICE, generator=g), torch.randn(N, device=DEVICE, generator=g)
    x = (z if layout == "(N, V)" else z.view(2, N // 2, V)).requires_grad_()
    lp, en = R.logprobs_from_logits(x, y.view(x.shape[:-1]), return_entropy=True, backend="triton")
    (gx,) = torch.autograd.grad((lp, en), x, (g_lp.view(lp.shape), g_en.view(en.shape)))
    rows = torch.tensor([0, first_past - 1, first_past, N - 1], device=DEVICE)
    zr = z[rows].float().requires_grad_()
    want_lp, want_en = ref.logprobs_from_logits(zr, y[rows])
    (want_g,) = torch.autograd.grad((want_lp, want_en), zr, (g_lp[rows], g_en[rows]))
    torch.testing.assert_close(lp.reshape(-1)[rows], want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en.reshape(-1)[rows], want_en, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.reshape(N, V)[rows].float(), want_g, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("add", [True, False], ids=["addmm", "mm"])
def test_mixed_gemm_probe_says_whether_the_engines_call_runs(add):
    """The probe that decides whether the fp32 grad_weight accumulator is added into (addmm) or written (mm) by a bf16
    GEMM agrees with that GEMM as the engine calls it, at another size: dz^T a transposed block of a row-padded
    buffer, into a row slice of the accumulator, with the right sum (the CPU build has neither: zeros and a separate
    add there). (The results of each path are checked by test_gradient_buffers_are_written_then_added.)"""
    from rlkernels.engines import triton_engine as TE

    g = torch.Generator().manual_seed(12)
    buf = torch.randn(24, 40, generator=g).to(DEVICE, torch.bfloat16)
    dz = buf[:, :30]  # 24 rows x 30 vocabulary entries at a padded row stride
    h = torch.randn(24, 16, generator=g).to(DEVICE, torch.bfloat16)
    acc = torch.ones(50, 16, device=DEVICE)
    gw = acc[10:40]
    try:
        if add:
            torch.addmm(gw, dz.T, h, out_dtype=torch.float32, out=gw)
        else:
            torch.mm(dz.T, h, out_dtype=torch.float32, out=gw)
        want = float(add) + dz.double().T @ h.double()
        runs = bool(torch.allclose(gw.double(), want, rtol=1e-5, atol=1e-5)) and bool((acc[:10] == 1).all())
    except (RuntimeError, TypeError, NotImplementedError):
        runs = False
    assert TE._mixed_gemm_works(torch.device(DEVICE), add=add) == runs


@pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_statistics_finished_in_the_kernel(dtype):
    """logits_stats(finish=True), the logits path's launch: the kernel's own (M, log S, C/S, logp, entropy) equal
    finish_stats of its raw state (to an ulp of the log: libdevice's or numpy's against torch's), with masked-out
    rows (label -1) all 0, a row of -inf logits and a -inf label logit (logp -inf), and a NaN row left NaN."""
    from rlkernels.engines.torch_engine import finish_stats

    g = torch.Generator().manual_seed(21)
    z = (torch.randn(6, 300, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, 300, (6,), generator=g)
    z[1] = -float("inf")
    z[2, y[2]] = -float("inf")
    z[4, 7] = float("nan")
    y[5] = -1  # masked out
    temp = (0.5 + torch.rand(6, generator=g, dtype=torch.float64)).to(K._acc(dtype))
    zd, yd, td = z.to(DEVICE), y.to(DEVICE), temp.to(DEVICE)
    got = K.logits_stats(zd, yd, None, td, finish=True)
    m, s, c, zy = K.logits_stats(zd, yd, None, td)
    want = (m, *finish_stats(m, s, c, zy))
    for name, a, b in zip(("M", "log S", "C/S", "logp", "entropy"), got, want):
        assert a.dtype == b.dtype and a.is_contiguous(), name
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=4 * torch.finfo(a.dtype).eps, atol=0, equal_nan=True,
                                   msg=name)
    logp, ent = got[3].cpu(), got[4].cpu()
    assert logp[5] == 0 and ent[5] == 0 and all(float(x[5]) == 0 for x in got)
    # a -inf label logit, in a row of -inf too: logp -inf
    assert (logp[[1, 2]] == -float("inf")).all() and torch.isnan(logp[4]) and torch.isfinite(logp[[0, 3]]).all()


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2,
                    reason="tensors on a CUDA device that is not the current one: needs two GPUs")
def test_tensors_on_a_device_that_is_not_the_current_one():
    """Triton launches on the current device: with every tensor on cuda:1 and cuda:0 current (an LM head placed on
    another GPU by ``device_map="auto"``), the loss, the logits op and the group advantages still match float64,
    their outputs on cuda:1 and the current device unchanged (launch.py runs each launch on its tensors' device)."""
    other = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    p = make_problem(3, 11, 24, 301, dtype=torch.bfloat16, seed=8, device=other)
    q = as_fp64(p)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo")
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], backend="triton", **kw)
    gh, gw = grads(out.loss, [p["hidden"], p["weight"]])
    assert out.loss.device == other and gw.device == other and torch.cuda.current_device() == 0
    exact, _ = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"], **kw)
    gh64, gw64 = grads(exact, [q["hidden"], q["weight"]])
    eager, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], **kw)
    gh_e, gw_e = grads(eager, [p["hidden"], p["weight"]])
    assert_matches("loss", out.loss, exact, eager, torch.bfloat16)
    assert_matches("grad_weight", gw, gw64, gw_e, torch.bfloat16)
    assert_matches("grad_hidden", gh, gh64, gh_e, torch.bfloat16)

    z = torch.randn(37, 1003, device=other, dtype=torch.float32).requires_grad_()
    y = torch.randint(0, 1003, (37,), device=other)
    lp = R.logprobs_from_logits(z, y, backend="triton")
    (gz,) = torch.autograd.grad(lp.sum(), z)
    z64 = z.detach().double().cpu().requires_grad_()
    want = ref.logprobs_from_logits(z64, y.cpu())[0]
    (gz64,) = torch.autograd.grad(want.sum(), z64)
    z32 = z.detach().clone().requires_grad_()
    eager = ref.logprobs_from_logits(z32, y)[0]
    (gz_e,) = torch.autograd.grad(eager.sum(), z32)
    assert lp.device == other and gz.device == other
    assert_matches("logp", lp, want, eager, torch.float32)
    assert_matches("grad_logits", gz, gz64, gz_e, torch.float32)

    rewards = torch.randn(32, device=other, dtype=torch.float64)
    adv = R.group_advantages(rewards, group_size=8, backend="triton")
    assert adv.device == other
    assert_matches("advantages", adv, ref.group_advantages(rewards.cpu(), group_size=8))
