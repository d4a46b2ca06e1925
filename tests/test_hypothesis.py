"""Random configurations x random shapes, against the float64 reference."""
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkernels as R
from rlkernels import reference as ref

from conftest import BACKENDS, DEVICE, as_fp64, assert_matches, grads, leaves, make_problem, pack

optional_clip = st.one_of(st.none(), st.floats(0.01, 0.5))


@st.composite
def configs(draw):
    kw = dict(
        policy_loss=draw(st.sampled_from(["ppo", "cispo", "sapo", "reinforce"])),
        ratio_level=draw(st.sampled_from(["token", "sequence", "sequence_token"])),
        clip_low=draw(optional_clip),
        clip_high=draw(optional_clip),
        log_ratio_clamp=draw(st.sampled_from([None, 20.0, 0.2])),
        kl_coef=draw(st.sampled_from([0.0, 0.05])),
        kl_estimator=draw(st.sampled_from(["k1", "abs", "k2", "k3", "low_var_kl"])),
        kl_straight_through=draw(st.booleans()),
        kl_is_corrected=draw(st.booleans()),
        entropy_coef=draw(st.sampled_from([0.0, 0.01, -0.01])),
        entropy_shaping_alpha=draw(st.sampled_from([0.0, 0.3])),
        top_entropy_quantile=draw(st.sampled_from([1.0, 0.6])),
        loss_agg=draw(st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm"])),
        norm_length=7.0,
        rollout_correction=draw(st.sampled_from(["none", "token_tis", "seq_tis", "token_mis", "seq_mis"])),
        rollout_cap_low=draw(st.sampled_from([0.0, 0.5])),
        opsm_delta=draw(st.sampled_from([None, 0.0])),
    )
    if kw["policy_loss"] == "ppo" and draw(st.booleans()):
        kw["dual_clip"] = 1.0 + (kw["clip_high"] or 0.0) + draw(st.floats(0.05, 2.0))
    return kw


# derandomized so CI is reproducible; set RLKERNELS_HYPOTHESIS_SEARCH=1 to explore new examples locally
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=not os.environ.get("RLKERNELS_HYPOTHESIS_SEARCH"))
@given(cfg=configs(), B=st.integers(1, 4), T=st.integers(1, 9), H=st.integers(1, 12), V=st.integers(2, 90),
       seed=st.integers(0, 10**6), with_old=st.booleans(), bias=st.booleans(), chunk=st.integers(1, 12),
       mask_frac=st.sampled_from([0.0, 0.3, 1.0]), per_token_adv=st.booleans(),
       softcap=st.sampled_from([None, None, 0.5, 2.0, 30.0]),  # caps fp32 holds exactly (the Triton argument)
       normalizer=st.sampled_from([None, None, 2.5, 11.0, "tensor"]))  # "tensor": 6.0 as a 0-dim tensor
def test_random_configs_match_reference(cfg, B, T, H, V, seed, with_old, bias, chunk, mask_frac, per_token_adv,
                                        softcap, normalizer):
    p = make_problem(B, T, H, V, seed=seed, bias=bias, mask_frac=mask_frac, per_token_advantages=per_token_adv)
    kw = dict(ref_logprobs=p["ref_logprobs"])
    given_norm = torch.tensor(6.0, device=DEVICE) if normalizer == "tensor" else normalizer
    normalizer = 6.0 if normalizer == "tensor" else normalizer
    if with_old:
        kw["old_logprobs"] = p["old_logprobs"]
    if cfg["rollout_correction"] != "none" or cfg["opsm_delta"] is not None:
        kw["rollout_logprobs"] = p["rollout_logprobs"]
    q = as_fp64(p)
    loss_r, metrics_r = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"],
                                               bias=q["bias"], config=R.PolicyLossConfig(**cfg), softcap=softcap,
                                               normalizer=normalizer, **kw)
    g_ref = grads(loss_r, leaves(q))
    for backend in BACKENDS:
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                                config=R.PolicyLossConfig(**cfg), backend=backend, chunk_size=chunk, softcap=softcap,
                                normalizer=given_norm, **kw)
        assert_matches("loss", out.loss, loss_r, scale=max(1.0, abs(float(loss_r.detach()))))
        for name, a, b in zip(("hidden", "weight", "bias"), grads(out.loss, leaves(p)), g_ref):
            assert_matches(f"grad_{name}", a, b, scale=max(1e-3, float(b.abs().max())))
        for k, v in metrics_r.items():
            assert_matches(k, out.metrics[k], v, scale=max(1.0, abs(float(v))), dtype=torch.float32)


def _worse(a, b, exact):
    """Of two eager results, the one further from the float64 value: the tolerances' baseline. One small batch's
    largest rounding error is a noisy measure, so two ways of writing the eager code are both measured."""
    def err(x):
        return float((x.double() - exact).abs().max()) if x.numel() else 0.0
    return a if err(a) >= err(b) else b


def _interpreter_bf16_baseline(exact, eager, dtype, ulps=1):
    """Triton's interpreter (3.9) rounds fp32 -> bf16 toward zero (a GPU to nearest) in everything a Triton kernel
    stores in bf16: up to one ulp in a stored value, not half, and more in a GEMM's sum over a stored bf16 block
    (dL/dz), whose terms all lean toward zero. There the baseline of a bf16 result is also measured against the
    float64 value moved ``ulps`` bf16 ulps toward zero (truncated, then ``ulps - 1`` more)."""
    if dtype != torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1":
        return eager
    bits = exact.float().view(torch.int32) & ~0xFFFF
    magnitude = bits & 0x7FFF0000
    bits = torch.where(magnitude >= (ulps - 1) * 0x10000, bits - (ulps - 1) * 0x10000, bits & ~0x7FFF0000)
    return _worse(eager, bits.view(torch.float32).to(torch.bfloat16), exact)


def _unit(x):
    """A tolerance scale with an absolute floor of 1: values near 0 (a near-certain token's log-prob) are held to
    the table's atol, not to atol times themselves."""
    return max(1.0, float(x.abs().max()) if x.numel() else 0.0)


# the logits path (logprobs_from_logits): random layouts, dtypes, temperatures, masks, -inf columns and scales
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=not os.environ.get("RLKERNELS_HYPOTHESIS_SEARCH"))
@given(B=st.integers(1, 3), T=st.integers(1, 7), V=st.integers(1, 300), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       layout=st.sampled_from(["2d", "3d", "3d view"]), temperature=st.sampled_from(["1", "0.7", "per-token"]),
       mask_frac=st.sampled_from([None, 0.0, 0.4, 1.0]), neg_inf=st.sampled_from([0, 1, 3]),
       scale=st.sampled_from([1.0, 30.0, 3e3]), chunk=st.one_of(st.none(), st.integers(1, 9)))
def test_random_logits_match_reference(B, T, V, seed, dtype, layout, temperature, mask_frac, neg_inf, scale, chunk):
    """Values and the logits' gradient against the float64 computation on the same (rounded) logits, within k x the
    error of the eager code in the input dtype plus atol (STYLE.md 11); masked rows give 0 and a zero gradient."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T + (layout == "3d view"), V, generator=g, dtype=torch.float64) * scale
    banned = torch.randperm(V, generator=g)[:min(neg_inf, V - 1)]  # -inf columns (banned tokens), never a label
    z[..., banned] = -float("inf")
    allowed = torch.isin(torch.arange(V), banned, invert=True).nonzero()[:, 0]
    labels = allowed[torch.randint(0, allowed.numel(), (B, T), generator=g)]
    mask = None if mask_frac is None else torch.rand(B, T, generator=g) >= mask_frac
    temp = {"1": 1.0, "0.7": 0.7, "per-token": 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)}[temperature]

    def as_laid_out(leaf):  # the logits the call takes, a view of the leaf the gradient lands in
        return leaf[:, :-1] if layout == "3d view" else (leaf.reshape(B * T, V) if layout == "2d" else leaf)

    full = z.to(dtype).to(DEVICE).requires_grad_()
    x = as_laid_out(full)
    shape = x.shape[:-1]
    lab, keep = labels.reshape(shape).to(DEVICE), None if mask is None else mask.reshape(shape).to(DEVICE)
    t = temp.reshape(shape).to(DEVICE) if isinstance(temp, torch.Tensor) else temp
    up_a = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    up_b = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    f64 = full.detach().double().requires_grad_()
    exact = ref.logprobs_from_logits(as_laid_out(f64), lab, t)
    kept = torch.ones(shape, dtype=torch.bool, device=DEVICE) if keep is None else keep
    zero = torch.zeros((), dtype=torch.float64, device=DEVICE)
    exact = [torch.where(kept, e, zero) for e in exact]
    (gx64,) = grads((up_a * exact[0]).sum() + (up_b * exact[1]).sum(), [f64])
    # the baseline of the tolerances: the eager code in the input dtype, written both ways users write the
    # temperature (logits / T, and logits * (1 / T), which our engines do), whichever is further from float64 (one
    # row's rounding is a noisy measure: at |z / T| ~ 1e4 the two differed by 2.5x in entropy on one row)
    def eager_code(divide):
        fe = full.detach().clone().requires_grad_()
        xe = as_laid_out(fe)
        if divide:
            out = ref.logprobs_from_logits(xe, lab, t.to(dtype) if isinstance(t, torch.Tensor) else t)
        else:
            xc = xe.to(torch.float64 if dtype == torch.float64 else torch.float32)
            inv = (1.0 / t.to(xc.dtype)).unsqueeze(-1) if isinstance(t, torch.Tensor) else 1.0 / t
            out = ref.logprobs_from_logits(xc * inv, lab)
        out = [torch.where(kept, e.double(), zero) for e in out]
        (ge,) = grads((up_a * out[0]).sum() + (up_b * out[1]).sum(), [fe])
        return [out[0].detach(), out[1].detach(), ge]

    eager = [_worse(a, b, e) for a, b, e in zip(eager_code(True), eager_code(False), (*exact, gx64))]
    eager[2] = _interpreter_bf16_baseline(gx64, eager[2], dtype)
    for backend in BACKENDS:
        logp, ent = R.logprobs_from_logits(x, lab, temperature=t, return_entropy=True, mask=keep, chunk_size=chunk,
                                           backend=backend)
        (gx,) = grads((up_a * logp.double()).sum() + (up_b * ent.double()).sum(), [full])
        # log-probs and entropies near 0 (a near-certain token) are held to an absolute floor of the tolerance
        assert_matches(f"{backend} logp", logp, exact[0], eager[0], dtype, scale=_unit(exact[0]))
        assert_matches(f"{backend} entropy", ent, exact[1], eager[1], dtype, scale=_unit(exact[1]))
        assert torch.all(logp[~kept] == 0) and torch.all(ent[~kept] == 0)
        assert_matches(f"{backend} grad_logits", gx, gx64, eager[2], dtype, scale=_unit(gx64))


# the hidden + weight path in the input dtypes: padded and packed batches, the single pass and the two-stage path
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=not os.environ.get("RLKERNELS_HYPOTHESIS_SEARCH"))
@given(B=st.integers(1, 3), T=st.integers(1, 8), H=st.integers(1, 24), V=st.integers(2, 300),
       seed=st.integers(0, 10**6), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       preset=st.sampled_from(["dapo", "grpo", "gspo", "cispo", "dr_grpo"]), kl=st.booleans(), entropy=st.booleans(),
       packed=st.booleans(), temperature=st.sampled_from(["1", "0.7", "per-token"]), bias=st.booleans(),
       softcap=st.sampled_from([None, 2.0, 30.0]), single_pass=st.sampled_from([None, False]),
       chunk=st.one_of(st.none(), st.integers(1, 12)))
def test_random_linear_paths_match_reference(B, T, H, V, seed, dtype, preset, kl, entropy, packed, temperature, bias,
                                             softcap, single_pass, chunk):
    """fused_grpo_loss from hidden states and the LM head in fp64, fp32 and bf16: loss and gradients against float64,
    within k x the error of the eager code in the input dtype plus atol (STYLE.md 11). A packed batch keeps a random
    prefix of each sequence (and its own mask); its reference is the padded batch with those positions kept."""
    p = make_problem(B, T, H, V, dtype=dtype, seed=seed, bias=bias, temperature=0.7 if temperature == "0.7" else 1.0,
                     per_token_temperature=temperature == "per-token")
    lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    keep, cu, pick = pack(B, T, lengths)
    kept = p["mask"] & keep.reshape(B, T) if packed else p["mask"]
    kw = dict(config=preset, old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"],
              kl_coef=0.05 if kl else 0.0, entropy_coef=0.01 if entropy else 0.0, softcap=softcap)
    if preset == "dr_grpo":
        kw["norm_length"] = T
    if preset == "cispo":
        kw["rollout_correction"] = "none"

    def reference(hidden, weight, b, cap_in_fp32=False):
        if not cap_in_fp32:  # the cap in the logits' dtype, as HF's Gemma computes it
            return ref.linear_policy_loss(hidden, weight, p["labels"], p["advantages"], kept, bias=b,
                                          temperature=p["temperature"], **kw)[0]
        z = ref.logits_from_hidden(hidden, weight, b).float()
        # s tanh(z / s) as the native and Triton engines write it, one exponential: s - 2 s / (e^(2 z / s) + 1),
        # within an ulp of s of the value (their docstrings), where tanh itself is exact to an ulp of the result
        z = z if softcap is None else softcap - 2 * softcap / (torch.exp(2 * z / softcap) + 1)
        logp, ent = ref.logprobs_from_logits(z, p["labels"], p["temperature"])
        return ref.policy_loss(logp, ent, p["advantages"], kept, **{k: v for k, v in kw.items() if k != "softcap"})[0]

    q = as_fp64(p)
    exact_loss = reference(q["hidden"], q["weight"], q["bias"])
    exact = grads(exact_loss, leaves(q))

    def eager_code(cap_in_fp32):
        eager_leaves = [t.detach().clone().requires_grad_() for t in leaves(p)]
        loss = reference(*eager_leaves, *([] if bias else [None]), cap_in_fp32=cap_in_fp32)
        return [loss.detach(), *grads(loss, eager_leaves)]

    # the baseline of the tolerances: the eager code in the input dtype, with the cap in that dtype (HF) and in fp32
    # in the engines' one-exponential form, whichever is further from float64: the largest error of a few dozen
    # bf16 elements is a noisy measure (a grad_weight 1.7 ulp off where the bf16-cap eager's worst was 0.3 ulp, its
    # mean error lower than eager's), and in fp32 the form's error (about s x 6e-8 per logit) exceeds tanh's for
    # small logits (Triton's grad_weight 5.1e-6 off at s = 30, where tanh's eager allowed 3.7e-6)
    eager = [_worse(a, b, x) for a, b, x in zip(eager_code(False), eager_code(True), (exact_loss, *exact))]
    eager_loss, eager = eager[0], [_interpreter_bf16_baseline(x, e, dtype, ulps=2) for x, e in zip(exact, eager[1:])]
    for backend in BACKENDS:
        if packed:
            t = p["temperature"]
            call = dict(kw, old_logprobs=pick(kw["old_logprobs"]), ref_logprobs=pick(kw["ref_logprobs"]))
            # (S, 1): one per sequence whatever N is ((S,) would read per token where N = S)
            out = R.fused_grpo_loss(pick(p["hidden"]), p["weight"], pick(p["labels"]), p["advantages"][:, None],
                                    pick(p["mask"]), bias=p["bias"], cu_seqlens=cu,
                                    temperature=pick(t) if isinstance(t, torch.Tensor) else t, backend=backend,
                                    chunk_size=chunk, single_pass=single_pass, **call)
        else:
            out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                    bias=p["bias"], temperature=p["temperature"], backend=backend, chunk_size=chunk,
                                    single_pass=single_pass, **kw)
        assert_matches(f"{backend} loss", out.loss, exact_loss, eager_loss, dtype, scale=_unit(exact_loss.detach()))
        for name, a, b, e in zip(("hidden", "weight", "bias"), grads(out.loss, leaves(p)), exact, eager):
            assert_matches(f"{backend} grad_{name}", a, b, e, dtype, scale=_unit(b))


# group_advantages: random group labels (any values, any sizes, not contiguous), NaN rewards, ties and binary rewards
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=not os.environ.get("RLKERNELS_HYPOTHESIS_SEARCH"))
@given(B=st.integers(0, 40), n_labels=st.integers(1, 8), seed=st.integers(0, 10**6),
       method=st.sampled_from(["grpo", "dr_grpo", "rloo", "lite_ppo", "rpp_baseline", "passk"]),
       kind=st.sampled_from(["normal", "binary", "few values"]), nan_frac=st.sampled_from([0.0, 0.2, 1.0]),
       contiguous=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_groups_match_reference(B, n_labels, seed, method, kind, nan_frac, contiguous, dtype):
    """group_advantages (torch, and the Triton kernel where it runs) against the loop-per-group reference."""
    g = torch.Generator().manual_seed(seed)
    r = {"normal": torch.randn(B, generator=g, dtype=torch.float64),
         "binary": torch.randint(0, 2, (B,), generator=g).double(),
         "few values": torch.randint(0, 3, (B,), generator=g).double() / 3}[kind]
    r[torch.rand(B, generator=g) < nan_frac] = float("nan")
    r = r.to(dtype)
    lengths = torch.randint(1, 100, (B,), generator=g)
    if contiguous:
        size = max(1, n_labels)
        B_used = B - B % size
        r, lengths = r[:B_used], lengths[:B_used]
        kw = dict(group_size=size)
    else:
        kw = dict(group_ids=torch.randint(-3, n_labels, (B,), generator=g) * 7)
    want = ref.group_advantages(r, method=method, lengths=lengths, **kw)
    for backend in sorted({"triton" if b == "triton" else "torch" for b in BACKENDS}):
        on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        got = R.group_advantages(r.to(DEVICE), method=method, lengths=lengths.to(DEVICE), backend=backend,
                                 **on_device).cpu()
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches(f"{backend} {method}", got.double(), want.double(), dtype=torch.float64 if
                       dtype == torch.float64 else torch.float32, scale=_unit(want))
        assert torch.all(got[torch.isnan(r)] == 0)
