"""The fused per-token objective (``rlkernels/triton_ops/objective.py``): the single pass's loss and (g_logp, g_ent)
per row chunk in one Triton launch, against autograd over ``objective.token_loss`` (the torch path it replaces) and
the float64 reference, for every policy loss, KL estimator and weight; its METRICS mode against
``objective.metrics``; the two-stage path and ``policy_loss`` on it; the benchmark's policy op; and the engine taking
it exactly where it applies. Runs under ``TRITON_INTERPRET=1`` on CPU (a CI step) and compiled on a GPU
(``bench/device_check.sh``)."""
import math

import pytest
import torch

pytest.importorskip("triton")

import rlkernels as R  # noqa: E402
from rlkernels import reference as ref  # noqa: E402
from rlkernels.config import PolicyLossConfig  # noqa: E402
from rlkernels.engines import torch_engine  # noqa: E402
from rlkernels.objective import ChunkObjective, TokenBatch, metrics, prepare, token_loss  # noqa: E402

from conftest import BACKENDS, DEVICE, assert_matches, make_problem, stable_seed  # noqa: E402

TRITON = "triton" in BACKENDS
pytestmark = pytest.mark.skipif(not TRITON, reason="the Triton engine needs CUDA or TRITON_INTERPRET=1")

if TRITON:
    import triton
    import triton.language as tl

    from rlkernels.engines import triton_engine
    from rlkernels.triton_ops import objective as F
    from rlkernels.triton_ops.tl_utils import expm1

    @triton.jit
    def _expm1_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, expm1(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

# every branch of the kernel at least once: each policy loss and KL estimator, straight-through and IS-corrected KL,
# entropy shaping and bonus, no log-ratio clamp, no old log-probs, IS weights, dual clip, one-sided clips
CONFIGS = {
    "grpo k3": dict(kl_coef=0.04),
    "dapo": dict(clip_high=0.28, kl_coef=0.0),
    "ppo dual clip, k1, entropy bonus": dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
    "ppo no clamp, abs": dict(log_ratio_clamp=None, kl_coef=0.1, kl_estimator="abs"),
    "ppo one-sided clips, k2": dict(clip_low=None, kl_coef=0.1, kl_estimator="k2"),
    "ppo no high clip, low_var_kl corrected": dict(clip_high=None, kl_coef=0.1, kl_estimator="low_var_kl",
                                                   kl_is_corrected=True),
    "ppo entropy shaping, k3 straight-through": dict(entropy_shaping_alpha=0.4, kl_coef=0.1,
                                                     kl_straight_through=True),
    "cispo": dict(policy_loss="cispo", clip_low=None, clip_high=4.0, kl_coef=0.1, kl_estimator="k2"),
    "cispo shaping, entropy bonus": dict(policy_loss="cispo", entropy_shaping_alpha=0.4, entropy_coef=-0.02),
    "sapo": dict(policy_loss="sapo", kl_coef=0.1, kl_estimator="low_var_kl", kl_straight_through=True),
    "sapo corrected k1, entropy bonus": dict(policy_loss="sapo", kl_coef=0.1, kl_estimator="k1",
                                            kl_is_corrected=True, entropy_coef=0.01),
    "reinforce": dict(policy_loss="reinforce", kl_coef=0.1, kl_estimator="abs", kl_is_corrected=True),
}
# (old log-probs given, IS weights given)
DATA = {"old + IS weights": (True, True), "no old log-probs": (False, False)}


def _batch(n: int, dtype: torch.dtype, seed: int, old: bool, is_weights: bool, ref_spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    randn = lambda: torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    mask = rand() < 0.75
    zero = lambda x: torch.where(mask, x, torch.zeros_like(x)).to(dtype).to(DEVICE)  # noqa: E731
    logp = -5.0 * rand()
    batch = TokenBatch(mask=mask.to(DEVICE), seq_ids=(torch.arange(n) // 50).to(DEVICE), num_seqs=-(-n // 50),
                       advantages=zero(randn()), old_logprobs=zero(logp + 0.4 * randn()) if old else None,
                       ref_logprobs=zero(logp + ref_spread * randn()),
                       is_weights=zero(2.0 * rand()) if is_weights else None)
    return batch, zero(logp), zero(3.0 * rand())


def _cast(batch: TokenBatch, dtype: torch.dtype) -> TokenBatch:
    to = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return TokenBatch(mask=batch.mask, seq_ids=batch.seq_ids, num_seqs=batch.num_seqs,
                      advantages=to(batch.advantages), old_logprobs=to(batch.old_logprobs),
                      ref_logprobs=to(batch.ref_logprobs), is_weights=to(batch.is_weights))


def _both(cfg, batch, logp, ent, r0, r1):
    """(autograd over token_loss, the kernel) on rows [r0, r1)."""
    obj = ChunkObjective(batch, prepare(batch, cfg), cfg)
    rows = slice(r0, r1)
    return (torch_engine.chunk_upstream(obj, r0, r1, logp[rows], ent[rows]),
            F.chunk_upstream(obj, r0, r1, logp[rows], ent[rows]))


@pytest.mark.parametrize("data", list(DATA), ids=list(DATA))
@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_kernel_matches_autograd_of_token_loss(name, data):
    """fp64: the kernel equals autograd over token_loss to fp64 tolerance (its constants carry 48 bits). fp32: within
    the tolerance table of the fp64 result, as close as the fp32 torch ops are. Rows [100, 1337) of 1500: a chunk
    that starts inside a block and ends in a partial one."""
    cfg = PolicyLossConfig(**CONFIGS[name])
    batch64, logp, ent = _batch(1500, torch.float64, stable_seed(name, data), *DATA[data],
                                ref_spread=3.0 if cfg.kl_estimator == "low_var_kl" else 0.5)
    exact, fused = _both(cfg, batch64, logp, ent, 100, 1337)
    assert (fused[2] is None) == (cfg.entropy_coef == 0) == (exact[2] is None)
    for what, ours, want in zip(("loss", "g_logp", "g_ent"), fused, exact):
        if want is not None:
            assert ours.dtype == torch.float64 and ours.shape == want.shape
            assert_matches(f"{name}: {what}", ours, want, scale=float(want.abs().max()) or 1.0)
    eager32, fused32 = _both(cfg, _cast(batch64, torch.float32), logp.float(), ent.float(), 100, 1337)
    for what, ours, eager, want in zip(("loss", "g_logp", "g_ent"), fused32, eager32, exact):
        if want is not None:
            assert ours.dtype == torch.float32
            # the loss is a sum of terms of both signs: scaled by the sum of their sizes, as its rounding is
            scale = float(want.abs().max()) if what != "loss" else float(eager32[1].double().abs().sum()) + 1.0
            assert_matches(f"{name}: {what}", ours, want, eager, dtype=torch.float32, scale=scale)


def _tokens(logp, old, ref, adv, dtype):
    """A one-sequence batch of the given per-token values, every token kept, and its (logp, entropy)."""
    as_t = lambda x: torch.tensor(x, dtype=dtype, device=DEVICE)  # noqa: E731
    n = len(logp)
    batch = TokenBatch(mask=torch.ones(n, dtype=torch.bool, device=DEVICE),
                       seq_ids=torch.zeros(n, dtype=torch.long, device=DEVICE), num_seqs=1, advantages=as_t(adv),
                       old_logprobs=as_t(old), ref_logprobs=as_t(ref))
    return batch, as_t(logp), torch.linspace(0.1, 2.0, n, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("policy_loss", ["ppo", "cispo", "sapo"])
def test_clips_are_inclusive(dtype, policy_loss):
    """torch.clamp passes the gradient at its bounds, so a ratio on a clip bound and a log-ratio on the clamp keep
    theirs. Bounds hit exactly in any dtype and with any exp: clip_low = clip_high = 0 puts both bounds at 1 =
    exp(0) (logp == old), and logp - old = +-5 = the clamp; past it (7, -9) the gradient through the ratio stops.
    No KL or entropy term: g_logp is the policy term's."""
    cfg = PolicyLossConfig(policy_loss=policy_loss, clip_low=0.0, clip_high=0.0, log_ratio_clamp=5.0)
    logp = [-1.5, -1.5, 0.0, -5.0, 0.0, -5.0, 0.0, -9.0]
    old = [-1.5, -1.5, -5.0, 0.0, -5.0, 0.0, -7.0, 0.0]
    adv = [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
    batch, logp, ent = _tokens(logp, old, [0.0] * 8, adv, dtype)
    eager, fused = _both(cfg, batch, logp, ent, 0, 8)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    # the metrics count a ratio on a bound as not clipped (strict), and approx_kl takes the unclamped gap
    prep = prepare(batch, cfg)
    ours, want = F.token_metrics(logp, ent, batch, prep, cfg), metrics(token_loss(logp, ent, batch, prep, cfg),
                                                                        logp, ent, batch, prep, cfg)
    assert ours.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(ours[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    if policy_loss != "cispo":  # (cispo's gradient is -w A: the ratio is sg)
        # ppo clips tokens 2 and 3 (ratio e^5 with A > 0, e^-5 with A < 0), sapo's gate saturates at e^5 (2, 4);
        # the clamp stops 6 and 7
        kept = [0, 1, 4, 5] if policy_loss == "ppo" else [0, 1, 3, 5]
        assert fused[1][kept].ne(0).all() and fused[1][[i for i in range(8) if i not in kept]].eq(0).all(), fused[1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("estimator", ["k3", "low_var_kl", "k1", "abs", "k2"])
def test_kl_gradient_at_small_and_large_differences(dtype, estimator):
    """The KL term alone (zero advantages), d = logp - ref from 3e-7 to 30 in size: each token's gradient within
    4e-6 (fp32; 1e-13 fp64) of the float64 one, relatively. k3's and low_var_kl's gradient is -expm1(-d): computed
    as e^-d - 1 it would be 6% off at d = 1e-6 in fp32 (as eager's autograd, 1 - (expm1(-d) + 1), is); past
    low_var_kl's clamps (|d| > 20, or a value past 10) the gradient is 0."""
    cfg = PolicyLossConfig(kl_coef=0.5, kl_estimator=estimator)
    gaps = [1e-6, -3e-7, 1e-4, -2e-3, 0.5, -3.0, 11.0, -11.0, 25.0, -30.0, 0.0]
    n = len(gaps)
    batch, logp, ent = _tokens([-2.0] * n, [-2.0] * n, [-2.0 - g for g in gaps], [0.0] * n, dtype)
    fused = F.chunk_upstream(ChunkObjective(batch, prepare(batch, cfg), cfg), 0, n, logp, ent)
    # the exact gradient at the d the kernel sees (logp - ref rounded in dtype), in fp64 from torch.expm1 (fp64
    # autograd's 1 - (expm1(-d) + 1) is itself 4e-10 off at d = 3e-7)
    d = (logp - batch.ref_logprobs).double()
    em = torch.expm1(-d)
    dk = {"k1": torch.ones_like(d), "abs": torch.sign(d), "k2": d, "k3": -em,
          "low_var_kl": torch.where((d.abs() <= 20) & ((em + d).abs() <= 10), -em, torch.zeros_like(d))}[estimator]
    tol = 4e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(fused[1].double(), (0.5 / n) * dk, rtol=tol, atol=0)


def test_expm1_helper():
    """tl_utils.expm1 (libdevice's is not in the interpreter) against torch.expm1 in fp64, relatively, over 80
    decades, across its switch at |x| = 0.5, and at 0, +-inf and NaN: fp64 to 3 ulp; fp32 to 16 ulp (2e-6, the fp32
    floor of the tolerance table). Compiled fp32 tl.exp is the hardware 2^x after a multiply by log2 e, whose
    rounding grows with |x|: 8.2 ulp at worst on an H100 (2026-11-28); the interpreter's numpy exp gives under 3."""
    mags = torch.logspace(-40, 1.5, 200, dtype=torch.float64)
    xs = torch.cat([mags, -mags, torch.tensor([0.4999999, 0.5, 0.5000001, -0.5, 0.0, math.inf, -math.inf, math.nan],
                                              dtype=torch.float64)])
    for dtype, ulp, allowed in ((torch.float64, 2.0 ** -52, 3), (torch.float32, 2.0 ** -23, 16)):
        x = xs.to(dtype).to(DEVICE)
        y = torch.empty_like(x)
        _expm1_kernel[(1,)](x, y, x.numel(), BLOCK=512)
        want = torch.expm1(x.double())
        err = ((y.double() - want).abs() / want.abs().clamp(min=1e-300)).nan_to_num(0.0)
        assert float(err.max()) <= allowed * ulp, f"{dtype}: {float(err.max()) / ulp:.1f} ulp"
        same = torch.isnan(y.double()) == torch.isnan(want)
        assert bool(same.all()) and bool((y.double()[torch.isinf(want)] == want[torch.isinf(want)]).all())


def _assert_metrics(name, ours, want, dtype, eager=None):
    assert set(ours) == set(want), f"{name}: keys {sorted(set(ours) ^ set(want))}"
    for key, value in want.items():
        assert ours[key].dtype == torch.float32 and ours[key].dim() == 0, key
        scale = max(1.0, abs(float(value)))
        assert_matches(f"{name}: {key}", ours[key], value, None if eager is None else eager[key], dtype, scale)


@pytest.mark.parametrize("data", list(DATA), ids=list(DATA))
@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_metrics_match_the_torch_metrics(name, data):
    """token_metrics (one launch in METRICS mode, then a few reductions) against objective.metrics of token_loss,
    every key: fp64 to fp64 tolerance, fp32 as close to the fp64 values as the fp32 torch ops are."""
    cfg = PolicyLossConfig(**CONFIGS[name])
    batch, logp, ent = _batch(2500, torch.float64, stable_seed(name, data, "metrics"), *DATA[data])
    prep = prepare(batch, cfg)
    want = metrics(token_loss(logp, ent, batch, prep, cfg), logp, ent, batch, prep, cfg)
    _assert_metrics(name, F.token_metrics(logp, ent, batch, prep, cfg), want, torch.float64)
    b32, lp32, en32 = _cast(batch, torch.float32), logp.float(), ent.float()
    p32 = prepare(b32, cfg)
    eager = metrics(token_loss(lp32, en32, b32, p32, cfg), lp32, en32, b32, p32, cfg)
    _assert_metrics(name, F.token_metrics(lp32, en32, b32, p32, cfg), want, torch.float32, eager)


@pytest.mark.parametrize("correction", ["token_tis", "seq_mis"])
def test_metrics_with_rollout_correction(correction):
    """Rollout correction's weights and rejected tokens (is_weight_mean / max, rollout_masked_frac), and a batch
    with every token masked (every metric 0, no NaN from an empty mean or an empty max)."""
    cfg = PolicyLossConfig(rollout_correction=correction, rollout_cap_low=0.5, rollout_cap_high=1.5, kl_coef=0.1)
    batch, logp, ent = _batch(700, torch.float64, stable_seed(correction), True, False)
    batch.rollout_logprobs = batch.old_logprobs + 0.5 * torch.randn(700, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(1)
                                                                    ).to(DEVICE) * batch.mask
    for b in (batch, TokenBatch(**{**batch.__dict__, "mask": torch.zeros_like(batch.mask)})):
        prep = prepare(b, cfg)
        assert prep.rejected is not None
        want = metrics(token_loss(logp, ent, b, prep, cfg), logp, ent, b, prep, cfg)
        ours = F.token_metrics(logp, ent, b, prep, cfg)
        _assert_metrics(correction, ours, want, torch.float64)
        if not bool(b.mask.any()):
            assert all(float(v) == 0 for v in ours.values()), ours


def test_rejects_sequence_level_ratios():
    batch, logp, ent = _batch(8, torch.float64, 0, True, False)
    cfg = PolicyLossConfig(ratio_level="sequence")
    assert not F.fusable(cfg) and F.fusable(cfg.replace(ratio_level="token"))
    prep = prepare(batch, cfg)
    for run in (F.token_objective, F.token_metrics):
        with pytest.raises(ValueError, match="ratio_level='sequence'"):
            run(logp, ent, batch, prep, cfg)


def test_float_hyperparameters_are_runtime_arguments():
    """Clip bounds, clamps and coefficients change between runs (and schedules change them between steps): runtime
    arguments, never constexprs (STYLE.md practice 6); each travels as (hi, lo), and an fp64 launch rebuilds it to
    48 bits."""
    import inspect

    import triton.language as tl

    params = inspect.signature(F._token_objective_kernel.fn).parameters.values()
    constexpr = {p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")}
    runtime = {p.name for p in params} - constexpr
    floats = ("low", "high", "upper", "clamp", "alpha", "kappa", "tau_pos", "tau_neg", "kl_coef", "ent_coef")
    assert {f for f in floats} | {f + "_lo" for f in floats} | {"n"} <= runtime
    assert constexpr == {"POLICY", "HAS_OLD", "CLAMP", "SHAPING", "HAS_ISW", "HAS_REF", "KL_TERM", "KL_EST",
                         "KL_ST", "KL_CORR", "ENT_TERM", "METRICS", "HAS_REJ", "ACC", "BLOCK"}
    cfg = PolicyLossConfig(clip_high=0.28, kl_coef=0.001)
    args = F._float_args(cfg)
    assert len(args) == 2 * len(floats)
    for i, want in ((1, 1.28), (8, 0.001)):  # (hi, lo) of high and kl_coef
        hi, lo = args[2 * i], args[2 * i + 1]
        assert hi == float(torch.tensor(want, dtype=torch.float32)) and abs(hi + lo - want) <= 2.0 ** -47 * want
    assert F._float_args(PolicyLossConfig(clip_high=None, dual_clip=None))[2:6] == (math.inf, 0.0, math.inf, 0.0)


# ------------------------------------------------------------------------------------------------------------------
# the engine takes the kernel exactly where it applies
# ------------------------------------------------------------------------------------------------------------------
def _count_autograd_chunks(monkeypatch):
    calls = []
    real = triton_engine.chunk_upstream

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_engine, "chunk_upstream", counted)
    return calls


@pytest.mark.parametrize("config, fused", [("dapo", True), ("cispo", True), ("gspo", False)])
@pytest.mark.parametrize("setting", ["", "off"])
def test_single_pass_takes_the_kernel(monkeypatch, config, fused, setting):
    """The Triton engine's single pass runs the kernel for a token-level ratio (no autograd per chunk, the metrics
    in its METRICS mode), torch ops for GSPO's sequence-level one and with ``RLKERNELS_FUSED_OBJECTIVE=off``; each
    loss, gradient and metric matches the float64 reference (fp64 inputs, 3 row chunks)."""
    monkeypatch.setenv("RLKERNELS_FUSED_OBJECTIVE", setting)
    calls = _count_autograd_chunks(monkeypatch)
    fused_metrics = []
    real_metrics = F.token_metrics
    monkeypatch.setattr(F, "token_metrics", lambda *a: fused_metrics.append(1) or real_metrics(*a))
    p = make_problem(B=4, T=7, H=16, V=45, seed=3, bias=True)
    kw = dict(config=config, old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.02,
              entropy_coef=0.01)
    leaves = [p["hidden"], p["weight"], p["bias"]]
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            backend="triton", single_pass=True, chunk_size=14, **kw)
    ours = torch.autograd.grad(out.loss, leaves)
    assert bool(calls) == (not fused or setting == "off")
    assert bool(fused_metrics) == (fused and setting != "off")
    want, want_metrics = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                                bias=p["bias"], **kw)
    assert_matches("loss", out.loss, want, scale=max(1.0, abs(float(want.detach()))))
    assert set(want_metrics) <= set(out.metrics)
    for key, value in want_metrics.items():
        assert_matches(key, out.metrics[key], value, scale=max(1.0, abs(float(value))))
    for name, a, b in zip(("hidden", "weight", "bias"), ours, torch.autograd.grad(want, leaves)):
        assert_matches(f"grad_{name}", a, b)


def test_setting_is_checked(monkeypatch):
    monkeypatch.setenv("RLKERNELS_FUSED_OBJECTIVE", "maybe")
    p = make_problem(B=2, T=5, H=16, V=37, dtype=torch.float32)
    with pytest.raises(ValueError, match="RLKERNELS_FUSED_OBJECTIVE"):
        R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], backend="triton",
                          single_pass=True, config="dapo", old_logprobs=p["old_logprobs"])


# ------------------------------------------------------------------------------------------------------------------
# the two-stage path and policy_loss: the loss as an autograd Function over the kernel, the metrics by its METRICS mode
# ------------------------------------------------------------------------------------------------------------------
# configs only the two-stage path takes (the step constants read the log-probs), plus single-pass ones
TWO_STAGE = {
    "dapo": dict(config="dapo", kl_coef=0.02, entropy_coef=0.01),
    "entropy quantile (top 20%)": dict(config="grpo", top_entropy_quantile=0.2, kl_coef=0.05),
    "off-policy sequence mask": dict(config="grpo", opsm_delta=0.05, kl_coef=0.05, kl_estimator="low_var_kl"),
    "rollout correction from sg(logp)": dict(config="cispo", rollout_correction="token_tis"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(TWO_STAGE), ids=list(TWO_STAGE))
def test_policy_loss_on_the_kernel(name, dtype):
    """rlkernels.policy_loss with backend="triton" (the kernel) against backend="torch" (autograd over the torch
    ops) and the float64 reference: loss, d/dlogp, d/dentropy and every metric, on a padded (B, T) batch."""
    kw = dict(TWO_STAGE[name])
    p = make_problem(B=5, T=12, seed=stable_seed(name))
    with torch.no_grad():
        lp64, ent64 = ref.linear_logprobs(p["hidden"], p["weight"], p["labels"])
    if kw.get("rollout_correction"):
        kw.update(rollout_logprobs=p["rollout_logprobs"])
    else:
        kw.update(old_logprobs=p["old_logprobs"])
    kw.update(ref_logprobs=p["ref_logprobs"])
    runs = {}
    for backend in ("triton", "torch"):
        lp, ent = (x.detach().to(dtype).requires_grad_() for x in (lp64, ent64))
        out = R.policy_loss(lp, ent, p["advantages"], p["mask"], backend=backend, **kw)
        runs[backend] = (out, torch.autograd.grad(out.loss, (lp, ent), allow_unused=True))
    lp_r, ent_r = (x.detach().requires_grad_() for x in (lp64, ent64))
    want, want_metrics = ref.policy_loss(lp_r, ent_r, p["advantages"], p["mask"], **kw)
    want_grads = torch.autograd.grad(want, (lp_r, ent_r), allow_unused=True)
    (ours, ours_grads), (eager, eager_grads) = runs["triton"], runs["torch"]
    assert_matches("loss", ours.loss, want, eager.loss, dtype, scale=max(1.0, abs(float(want.detach()))))
    for what, a, e, w in zip(("d/dlogp", "d/dentropy"), ours_grads, eager_grads, want_grads):
        if w is None or not bool(w.ne(0).any()):
            assert a is None or not bool(a.ne(0).any()), what
            continue
        assert_matches(what, a, w, e, dtype)
    assert set(ours.metrics) == set(eager.metrics)
    for key, value in want_metrics.items():
        assert_matches(key, ours.metrics[key], value, eager.metrics[key], dtype, scale=max(1.0, abs(float(value))))


def test_policy_loss_backend_choice(monkeypatch):
    """policy_loss takes the kernel for backend="triton", not for "torch" or "auto" on CPU tensors (where "auto"
    resolves no engine at all: no native build for the objective), and not for GSPO's sequence-level ratio; a bad
    backend is named."""
    launches = []
    real = F._FusedTokenLoss.apply
    monkeypatch.setattr(F._FusedTokenLoss, "apply", lambda *a: launches.append(1) or real(*a))
    p = make_problem(B=3, T=6, seed=1)
    lp = -torch.rand(3, 6, dtype=torch.float64, device=DEVICE)
    for backend, config, fused in (("triton", "dapo", True), ("torch", "dapo", False), ("triton", "gspo", False),
                                   ("auto", "dapo", DEVICE.type == "cuda")):
        launches.clear()
        R.policy_loss(lp, None, p["advantages"], p["mask"], old_logprobs=p["old_logprobs"], config=config,
                      backend=backend)
        assert bool(launches) == fused, (backend, config)
    with pytest.raises(ValueError, match="backend='nope'"):
        R.policy_loss(lp, None, p["advantages"], p["mask"], backend="nope")
    with pytest.raises(TypeError, match="backend"):
        R.policy_loss(lp, None, p["advantages"], p["mask"], backend=3)


def test_second_derivative_raises():
    """The fused loss's backward scales gradients formed in forward: their own gradient is not there, so a backward
    that builds a graph for a second derivative raises (naming the way out) instead of returning a graph without
    it."""
    p = make_problem(B=2, T=5, seed=2)
    lp = (-torch.rand(2, 5, dtype=torch.float64, device=DEVICE)).requires_grad_()
    out = R.policy_loss(lp, None, p["advantages"], p["mask"], old_logprobs=p["old_logprobs"], config="dapo",
                        backend="triton")
    with pytest.raises(RuntimeError, match="once differentiable.*backend='torch'"):
        torch.autograd.grad(out.loss, lp, create_graph=True)
    (g,) = torch.autograd.grad(out.loss, lp)  # the graph is intact for a plain backward
    assert bool(g.ne(0).any())


def test_two_stage_fused_grpo_loss_takes_the_kernel(monkeypatch):
    """fused_grpo_loss's two-stage path (single_pass=False: recompute mode) runs the objective on the kernel too."""
    launches = []
    real = F._FusedTokenLoss.apply
    monkeypatch.setattr(F._FusedTokenLoss, "apply", lambda *a: launches.append(1) or real(*a))
    p = make_problem(B=3, T=6, seed=4)
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], backend="triton",
                            single_pass=False, config="dapo", old_logprobs=p["old_logprobs"])
    want, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                     config="dapo", old_logprobs=p["old_logprobs"])
    assert launches == [1]
    assert_matches("loss", out.loss, want, scale=max(1.0, abs(float(want.detach()))))
    for name, a, b in zip(("hidden", "weight"), torch.autograd.grad(out.loss, (p["hidden"], p["weight"])),
                          torch.autograd.grad(want, (p["hidden"], p["weight"]))):
        assert_matches(f"grad_{name}", a, b)


def test_bench_policy_op_on_the_kernel(tmp_path, capsys):
    """The benchmark's policy op with the rlkernels-triton provider (policy_loss on the kernel) passes the bench's
    float64 check (STYLE practice 11, in norms) and is timed, beside eager."""
    import json

    from rlkernels.bench import cli

    out = tmp_path / "rows.json"
    code = cli.main(["--tokens", "48", "--seq-len", "12", "--hidden", "16", "--vocab", "64", "--check-tokens", "24",
                     "--warmup", "1", "--repeat", "2", "--no-progress", "--in-process", "--op", "policy",
                     "--mode", "full", "--preset", "dapo", "--set", "entropy_coef=0.01", "--pad-frac", "0.25",
                     "--device", DEVICE.type, "--provider", "eager,rlkernels-triton", "--json", str(out)])
    capsys.readouterr()
    assert code == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["rlkernels-triton"]["status"] == "ok" and rows["eager"]["status"] == "ok", rows
