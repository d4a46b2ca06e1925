"""fused_grpo_loss vs the float64 reference for every preset and every knob: loss, gradients and metrics."""
import pytest
import torch

import rlkernels as R
from rlkernels import PRESETS
from rlkernels import reference as ref

from conftest import DEVICE, as_fp64, assert_matches, grads, leaves, make_problem, pack, stable_seed

NEEDS = {"dr_grpo": dict(norm_length=9)}

# (name, overrides, which optional inputs to pass)
KNOBS = [
    ("on_policy", {}, ()),
    ("old", {}, ("old",)),
    ("dual_clip", dict(dual_clip=3.0), ("old",)),
    ("dual_clip_tight", dict(dual_clip=1.25, clip_high=0.2), ("old",)),
    ("no_low_clip", dict(clip_low=None), ("old",)),
    ("no_high_clip", dict(clip_high=None), ("old",)),
    ("clip_low_ge_1", dict(clip_low=1.5, clip_high=1.0), ("old",)),
    ("no_log_ratio_clamp", dict(log_ratio_clamp=None), ("old",)),
    ("active_log_ratio_clamp", dict(log_ratio_clamp=0.1), ("old",)),
    ("kl_k1", dict(kl_coef=0.05, kl_estimator="k1"), ("old", "ref")),
    ("kl_abs", dict(kl_coef=0.05, kl_estimator="abs"), ("old", "ref")),
    ("kl_k2", dict(kl_coef=0.05, kl_estimator="k2"), ("old", "ref")),
    ("kl_k3", dict(kl_coef=0.05, kl_estimator="k3"), ("old", "ref")),
    ("kl_low_var", dict(kl_coef=0.05, kl_estimator="low_var_kl"), ("old", "ref")),
    ("kl_k3_straight_through", dict(kl_coef=0.1, kl_straight_through=True), ("old", "ref")),
    ("kl_is_corrected", dict(kl_coef=0.1, kl_is_corrected=True), ("old", "ref")),
    ("kl_metric_only", {}, ("old", "ref")),
    ("entropy_bonus", dict(entropy_coef=0.01), ("old",)),
    ("entropy_penalty", dict(entropy_coef=-0.02), ("old",)),
    ("entropy_shaping", dict(entropy_shaping_alpha=0.4), ("old",)),
    ("top_entropy_quantile", dict(top_entropy_quantile=0.5, entropy_coef=0.01), ("old",)),
    ("token_tis", dict(rollout_correction="token_tis", rollout_cap_high=1.2), ("old", "roll")),
    ("seq_tis", dict(rollout_correction="seq_tis", rollout_cap_high=1.5), ("old", "roll")),
    ("token_mis", dict(rollout_correction="token_mis", rollout_cap_low=0.8, rollout_cap_high=1.2),
     ("old", "roll")),
    ("seq_mis", dict(rollout_correction="seq_mis", rollout_cap_low=0.5, rollout_cap_high=2.0), ("old", "roll")),
    ("seq_tis_on_policy", dict(rollout_correction="seq_tis", rollout_cap_high=1.5), ("roll",)),
    ("token_tis_on_policy", dict(rollout_correction="token_tis", rollout_cap_high=1.5), ("roll",)),
    ("is_weights", {}, ("old", "isw")),
    ("opsm", dict(opsm_delta=0.0), ("old", "roll")),
    ("opsm_without_rollout", dict(opsm_delta=-0.05), ("old",)),
    ("token_mean_normalizer", dict(loss_agg="token-mean"), ("old", "norm")),
    ("seq_mean_token_mean_normalizer", dict(loss_agg="seq-mean-token-mean"), ("old", "norm")),
    ("seq_mean_token_sum", dict(loss_agg="seq-mean-token-sum"), ("old",)),
    ("dr_grpo_norm", dict(loss_agg="seq-mean-token-sum-norm", norm_length=5.0), ("old", "norm")),
    ("sapo_taus", dict(policy_loss="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5), ("old",)),
    ("cispo_two_sided", dict(policy_loss="cispo", clip_low=0.1, clip_high=0.1), ("old",)),
    ("reinforce_tis", dict(policy_loss="reinforce", rollout_correction="token_tis"), ("old", "roll")),
    ("gspo_token", dict(ratio_level="sequence_token", clip_low=0.05, clip_high=0.05), ("old",)),
    ("sequence_cispo", dict(ratio_level="sequence", policy_loss="cispo", clip_low=None, clip_high=0.1), ("old",)),
    ("everything", dict(dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01, entropy_shaping_alpha=0.1,
                        rollout_correction="token_mis", rollout_cap_low=0.7, opsm_delta=0.1),
     ("old", "ref", "roll")),
]


def _inputs(p, which, seed=0):
    g = torch.Generator().manual_seed(seed + 101)
    kw = {}
    if "old" in which:
        kw["old_logprobs"] = p["old_logprobs"]
    if "ref" in which:
        kw["ref_logprobs"] = p["ref_logprobs"]
    if "roll" in which:
        kw["rollout_logprobs"] = p["rollout_logprobs"]
    if "isw" in which:
        kw["is_weights"] = (0.5 + torch.rand(p["labels"].shape, generator=g, dtype=torch.float64)).to(DEVICE)
    if "norm" in which:
        kw["normalizer"] = 7.0
    return kw


def _compare(p, config, overrides, kw, backend, single_pass=None, dtype=torch.float64, chunk_size=5):
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            temperature=p["temperature"], config=config, backend=backend, chunk_size=chunk_size,
                            single_pass=single_pass, **kw, **overrides)
    q = as_fp64(p)
    loss_r, metrics_r = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"],
                                               bias=q["bias"], temperature=q["temperature"], config=config,
                                               **kw, **overrides)
    assert out.loss.dim() == 0
    assert_matches("loss", out.loss, loss_r, scale=max(1.0, abs(float(loss_r.detach()))))
    g_ours = grads(out.loss, leaves(p))
    g_ref = grads(loss_r, leaves(q))
    for name, a, b in zip(("hidden", "weight", "bias"), g_ours, g_ref):
        assert a is not None, f"no gradient for {name}"
        assert_matches(f"grad_{name}", a, b)
    assert set(out.metrics) == set(metrics_r), set(out.metrics) ^ set(metrics_r)
    for k, v in out.metrics.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
        assert_matches(f"metric {k}", v, metrics_r[k], scale=max(1.0, abs(float(metrics_r[k]))),
                       dtype=torch.float32)  # metrics are fp32 scalars
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("extras", ["plain", "bias_temperature", "per_token_adv"])
def test_presets(backend, preset, extras):
    p = make_problem(3, 9, 16, 37, bias=extras == "bias_temperature", per_token_temperature=extras == "bias_temperature",
                     per_token_advantages=extras == "per_token_adv", seed=len(preset))
    _compare(p, preset, NEEDS.get(preset, {}), _inputs(p, ("old",)), backend)


# every knob on top of a token-level preset (dapo, token-mean), a sequence-mean one (grpo) and a sequence-ratio one
# (gspo; knobs that set their own ratio level are not combined with it)
KNOB_CASES = [(base, *k) for base in ("grpo", "dapo", "gspo") for k in KNOBS
              if not (base == "gspo" and "ratio_level" in k[1])]


@pytest.mark.parametrize("base,name,overrides,which", KNOB_CASES, ids=[f"{c[0]}-{c[1]}" for c in KNOB_CASES])
def test_knobs(backend, base, name, overrides, which):
    p = make_problem(3, 9, 16, 37, bias=True, seed=stable_seed(base, name))
    _compare(p, base, overrides, _inputs(p, which), backend)


@pytest.mark.parametrize("name,overrides,which", KNOBS, ids=[k[0] for k in KNOBS])
def test_single_pass_equals_two_stage(backend, name, overrides, which):
    p = make_problem(3, 9, 16, 37, bias=True, per_token_temperature=True, seed=stable_seed(name))
    cfg = R.PolicyLossConfig.from_preset("dapo", **overrides)
    kw = _inputs(p, which)
    # rollout correction needs the current log-probs when old_logprobs are absent; sequence-level ratios need row
    # chunks of whole sequences (9 rows here)
    rollout_needs_logp = cfg.rollout_correction != "none" and "old_logprobs" not in kw
    if not cfg.sequence_separable or rollout_needs_logp:
        with pytest.raises(ValueError, match="single_pass=True"):
            R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                              config=cfg, single_pass=True, backend=backend, **kw)
        return
    outs = []
    for sp in (True, False):
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                                temperature=p["temperature"], config=cfg, single_pass=sp, backend=backend,
                                chunk_size=4 if cfg.token_separable else 12, **kw)
        outs.append((out, grads(out.loss, leaves(p))))
    (a, ga), (b, gb) = outs
    assert_matches("loss", a.loss, b.loss, scale=1.0)
    for x, y in zip(ga, gb):
        assert_matches("grad", x, y)
    for k in a.metrics:
        assert_matches(k, a.metrics[k], b.metrics[k], scale=1.0, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["dapo", "gspo", "grpo"])
def test_low_precision_loss(backend, dtype, preset):
    p = make_problem(4, 16, 32, 301, dtype=dtype, bias=True, seed=23, logit_scale=3.0)
    kw = _inputs(p, ("old", "ref"))
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            config=preset, kl_coef=0.01, backend=backend, chunk_size=16, **kw)
    eager, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                      bias=p["bias"], config=preset, kl_coef=0.01, **kw)
    q = as_fp64(p)
    exact, _ = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], q["mask"],
                                      bias=q["bias"], config=preset, kl_coef=0.01, **kw)
    assert out.loss.dtype == torch.float32
    assert_matches("loss", out.loss, exact, eager, dtype, scale=max(1.0, abs(float(exact.detach()))))
    for name, a, e, x in zip(("hidden", "weight", "bias"), grads(out.loss, leaves(p)), grads(eager, leaves(p)),
                             grads(exact, leaves(q))):
        assert a.dtype == dtype
        assert_matches(f"grad_{name}", a, x, e, dtype)


def _packed(p):
    """The padded problem as a packed batch: each sequence keeps a random prefix of its positions."""
    B, T = p["labels"].shape
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[1] = 0  # an empty sequence
    keep, cu, pick = pack(B, T, lengths)
    return keep.reshape(B, T), dict(hidden=pick(p["hidden"]), labels=pick(p["labels"]), mask=pick(p["mask"]),
                                    old=pick(p["old_logprobs"]), ref=pick(p["ref_logprobs"]), cu=cu)


@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo", "luspo", "dr_grpo"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_packed_layout(backend, preset, per_token_adv):
    p = make_problem(4, 8, 8, 41, seed=29, per_token_advantages=per_token_adv)
    keep, k = _packed(p)
    adv = p["advantages"].reshape(-1)[keep.reshape(-1)] if per_token_adv else p["advantages"]
    out = R.fused_grpo_loss(k["hidden"], p["weight"], k["labels"], adv, k["mask"], cu_seqlens=k["cu"],
                            old_logprobs=k["old"], ref_logprobs=k["ref"], kl_coef=0.02, config=preset,
                            backend=backend, **NEEDS.get(preset, {}))
    loss_r, metrics_r = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"],
                                               p["mask"] & keep, old_logprobs=p["old_logprobs"],
                                               ref_logprobs=p["ref_logprobs"], kl_coef=0.02, config=preset,
                                               **NEEDS.get(preset, {}))
    assert_matches("loss", out.loss, loss_r, scale=1.0)
    gh, gw = grads(out.loss, [k["hidden"], p["weight"]])
    gh_r, gw_r = grads(loss_r, [p["hidden"], p["weight"]])
    assert_matches("grad_hidden", gh, gh_r.reshape(-1, 8)[keep.reshape(-1)])
    assert_matches("grad_weight", gw, gw_r)
    for key in metrics_r:
        assert_matches(key, out.metrics[key], metrics_r[key], scale=1.0, dtype=torch.float32)


@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_packed_advantages_as_many_tokens_as_sequences(backend, preset):
    """A packed batch of N tokens in S = N sequences (lengths 1, 2, 0): (N,) advantages are one per token, as
    anything shaped like labels, with a warning that points at the caller and names (S, 1); (S, 1) is one per
    sequence (as (S,) is in any other batch). Both against the padded reference."""
    import warnings

    p = make_problem(3, 3, 8, 41, seed=33, mask_frac=0.0)
    keep, cu, pick = pack(3, 3, [1, 2, 0])
    keep = keep.reshape(3, 3)
    kw = dict(old_logprobs=p["old_logprobs"], config=preset)
    per_seq = p["advantages"]  # (3,): one per sequence, and N = 3 tokens
    per_tok = per_seq[torch.tensor([0, 1, 1], device=per_seq.device)] + torch.tensor(
        [0.0, 0.5, -0.5], dtype=per_seq.dtype, device=per_seq.device)

    def packed(adv):
        return R.fused_grpo_loss(pick(p["hidden"]), p["weight"], pick(p["labels"]), adv, cu_seqlens=cu,
                                 backend=backend, old_logprobs=pick(p["old_logprobs"]), config=preset).loss

    def padded_reference(adv):
        return ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], adv, keep, **kw)[0]

    tok_padded = torch.zeros(3, 3, dtype=per_seq.dtype, device=per_seq.device)
    tok_padded[keep] = per_tok
    with pytest.warns(UserWarning, match=r"as many tokens as sequences \(3\).*advantages\[:, None\]") as seen:
        loss = packed(per_tok)
    assert all(w.filename == __file__ for w in seen), [w.filename for w in seen]
    assert_matches("per-token loss", loss, padded_reference(tok_padded), scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit per-sequence form warns about nothing
        loss = packed(per_seq[:, None])
    assert_matches("per-sequence loss", loss, padded_reference(per_seq), scale=1.0)


@pytest.mark.parametrize("preset", ["grpo", "dapo", "gspo"])
def test_masked_garbage_changes_nothing(backend, preset):
    """NaN/inf/out-of-range values at masked positions of every per-token input leave loss and gradients unchanged."""
    p = make_problem(3, 9, 16, 37, seed=31, per_token_advantages=True, per_token_temperature=True)
    kw = dict(old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"],
              rollout_logprobs=p["rollout_logprobs"], kl_coef=0.05, rollout_correction="token_tis", entropy_coef=0.01)
    clean = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                              temperature=p["temperature"], config=preset, backend=backend, **kw)
    g_clean = grads(clean.loss, leaves(p))
    m = ~p["mask"]

    def dirty(x, value):
        x = x.detach().clone()
        x[m] = value
        return x

    h = p["hidden"].detach().clone()
    h[m] = float("nan")
    h.requires_grad_()
    kw_dirty = dict(kw, old_logprobs=dirty(p["old_logprobs"], float("nan")),
                    ref_logprobs=dirty(p["ref_logprobs"], float("inf")),
                    rollout_logprobs=dirty(p["rollout_logprobs"], -float("inf")))
    out = R.fused_grpo_loss(h, p["weight"], dirty(p["labels"], -100), dirty(p["advantages"], float("nan")),
                            p["mask"], temperature=dirty(p["temperature"], 0.0), config=preset, backend=backend,
                            **kw_dirty)
    gh, gw = grads(out.loss, [h, p["weight"]])
    assert_matches("loss", out.loss, clean.loss, scale=1.0)
    assert torch.all(gh[m] == 0)
    assert_matches("grad_hidden", gh, g_clean[0])
    assert_matches("grad_weight", gw, g_clean[1])
    for k, v in out.metrics.items():
        assert torch.isfinite(v), k
        assert_matches(k, v, clean.metrics[k], scale=1.0, dtype=torch.float32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("single_pass", [None, False])
def test_all_masked_batch(backend, preset, single_pass):
    p = make_problem(2, 5, 8, 37, seed=37)
    mask = torch.zeros_like(p["mask"])
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], mask,
                            old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.1,
                            entropy_coef=0.1, config=preset, backend=backend, single_pass=single_pass,
                            **NEEDS.get(preset, {}))
    assert float(out.loss) == 0.0
    gh, gw = grads(out.loss, [p["hidden"], p["weight"]])
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_inputs_not_modified(backend):
    p = make_problem(3, 9, 16, 37, bias=True, per_token_temperature=True, seed=41)
    tensors = {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}
    before = {k: v.detach().clone() for k, v in tensors.items()}
    for sp in (True, False):
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                                temperature=p["temperature"], old_logprobs=p["old_logprobs"],
                                ref_logprobs=p["ref_logprobs"], rollout_logprobs=p["rollout_logprobs"],
                                rollout_correction="seq_tis", kl_coef=0.1, config="dapo", backend=backend,
                                single_pass=sp)
        out.loss.backward()
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]), f"{k} was modified in place"


@pytest.mark.parametrize("config,kw", [("dapo", dict(kl_coef=0.1, entropy_coef=0.01)),
                                       ("gspo", dict(top_entropy_quantile=0.6, entropy_coef=0.01)),
                                       ("grpo", dict(rollout_correction="seq_tis"))])
def test_deterministic_mode_runs_and_repeats(backend, monkeypatch, config, kw):
    """Under torch.use_deterministic_algorithms(True), which RL trainers turn on for reproducible runs, the loss, its
    gradients (padded and packed, single pass and two-stage) and group_advantages raise no error for a missing
    deterministic implementation, and two calls give the same bits. (The point is on CUDA, in device_check.sh's
    suite, where PyTorch refuses nondeterministic kernels such as a float cumsum; on the CPU it runs as well.)"""
    if DEVICE.type == "cuda":  # cuBLAS needs a fixed workspace for deterministic GEMMs; PyTorch refuses without it
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    p = make_problem(4, 9, 16, 37, bias=True, seed=stable_seed(config), mask_frac=0.25)
    keep, cu, pick = pack(4, 9, [9, 3, 6, 1])
    padded = dict(labels=p["labels"], advantages=p["advantages"], mask=p["mask"], old_logprobs=p["old_logprobs"],
                  ref_logprobs=p["ref_logprobs"], rollout_logprobs=p["rollout_logprobs"])
    packed = dict(labels=pick(p["labels"]), advantages=p["advantages"], cu_seqlens=cu,
                  old_logprobs=pick(p["old_logprobs"]), ref_logprobs=pick(p["ref_logprobs"]),
                  rollout_logprobs=pick(p["rollout_logprobs"]))
    group_ids = torch.tensor([3, 1, 3, 1], device=DEVICE)

    def step(data, single_pass):
        h = p["hidden"] if data is padded else pick(p["hidden"])
        out = R.fused_grpo_loss(h, p["weight"], bias=p["bias"], config=config, backend=backend,
                                single_pass=single_pass, **data, **kw)
        adv = R.group_advantages(p["advantages"].double(), group_ids=group_ids,
                                 backend="triton" if backend == "triton" else "torch")
        return [out.loss.detach(), adv, *grads(out.loss, leaves(p))]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for data in (padded, packed):
            for single_pass in (None, False):
                first, second = step(data, single_pass), step(data, single_pass)
                for a, b in zip(first, second):
                    assert torch.equal(a, b), (config, data is packed, single_pass)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_grad_output_scaling_and_accumulation(backend):
    """The single pass saves gradients and scales them by grad_output; two micro-batches accumulate."""
    p = make_problem(3, 9, 16, 37, seed=43)
    kw = dict(old_logprobs=p["old_logprobs"], config="dapo", backend=backend)
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], single_pass=True,
                            **kw)
    g1 = grads(out.loss * 2.5, leaves(p))
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], single_pass=False,
                            **kw)
    g2 = grads(out.loss, leaves(p))
    for a, b in zip(g1, g2):
        assert_matches("scaled grad", a, 2.5 * b)


def test_policy_loss_from_logprobs(backend):
    """The objective alone (user-computed log-probs) equals the fused loss."""
    p = make_problem(3, 9, 16, 37, seed=47)
    logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], return_entropy=True, backend=backend)
    a = R.policy_loss(logp, ent, p["advantages"], p["mask"], old_logprobs=p["old_logprobs"], config="gspo",
                      entropy_coef=0.01)
    b = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                          old_logprobs=p["old_logprobs"], config="gspo", entropy_coef=0.01, backend=backend)
    assert_matches("loss", a.loss, b.loss, scale=1.0)
    c = R.policy_loss(logp, None, p["advantages"], p["mask"], old_logprobs=p["old_logprobs"], config="dapo")
    assert torch.isfinite(c.loss)
    with pytest.raises(ValueError, match="entropy_coef"):
        R.policy_loss(logp, None, p["advantages"], p["mask"], config="dapo", entropy_coef=0.1)


def test_grpo_loss_module(backend):
    p = make_problem(3, 9, 16, 37, seed=53)
    module = R.GRPOLoss("dapo", clip_high=0.3, backend=backend)
    assert module.config.clip_high == 0.3
    out = module(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], old_logprobs=p["old_logprobs"])
    direct = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                               old_logprobs=p["old_logprobs"], config="dapo", clip_high=0.3, backend=backend)
    assert isinstance(out, R.LossOutput)
    assert_matches("loss", out.loss, direct.loss, scale=1.0)


def test_kl_penalty_matches_reference():
    g = torch.Generator().manual_seed(59)
    lp = torch.randn(50, generator=g, dtype=torch.float64) * 3
    rp = torch.randn(50, generator=g, dtype=torch.float64) * 3
    for est in ["k1", "abs", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+"]:
        x = lp.clone().requires_grad_()
        y = lp.clone().requires_grad_()
        a = R.kl_penalty(x, rp, est)
        b = ref.kl_penalty(y, rp, est)
        assert_matches(est, a, b)
        assert_matches(est + " grad", grads(a.sum(), [x])[0], grads(b.sum(), [y])[0])
    with pytest.raises(ValueError, match="estimator"):
        R.kl_penalty(lp, rp, "k4")


def test_single_pass_backward_runs_once(backend):
    """The single pass keeps its gradients for one backward (they are scaled in place by grad_output): a second
    backward through the same graph is refused with the way out, not answered with rescaled gradients."""
    p = make_problem(2, 6, 8, 41, seed=31)
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], config="dapo",
                            backend=backend, single_pass=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single_pass=False"):
        out.loss.backward()


SEQUENCE_RATIOS = [("gspo", {}), ("luspo", {}), ("gspo", dict(ratio_level="sequence_token")),
                   ("gspo", dict(rollout_correction="seq_tis", kl_coef=0.05, entropy_coef=0.01))]


def _spy_fused(monkeypatch):
    """Records the plan of every single-pass call (Engine.linear_fused_loss)."""
    from rlkernels.engines import Engine

    plans, orig = [], Engine.linear_fused_loss

    def spy(self, hidden, weight, bias, labels, temperature, plan, chunk_loss, softcap=0.0):
        plans.append(plan)
        return orig(self, hidden, weight, bias, labels, temperature, plan, chunk_loss, softcap)

    monkeypatch.setattr(Engine, "linear_fused_loss", spy)
    return plans


@pytest.mark.parametrize("config,overrides", SEQUENCE_RATIOS,
                         ids=[f"{c}-{'-'.join(o) or 'plain'}" for c, o in SEQUENCE_RATIOS])
def test_sequence_ratio_single_pass(backend, monkeypatch, config, overrides):
    """Sequence-level ratios take the single pass (3 GEMMs) when a row chunk can hold any one sequence's kept tokens:
    the chunks then end at sequence boundaries, and the result is the fp64 reference's, as on the two-stage path."""
    p = make_problem(5, 9, 16, 37, bias=True, per_token_temperature=True, seed=83)
    kw = _inputs(p, ("old", "ref", "roll"))
    plans = _spy_fused(monkeypatch)
    _compare(p, config, overrides, kw, backend, single_pass=True, chunk_size=20)
    (plan,) = plans
    kept = p["mask"].sum(1).tolist()
    ends = {sum(kept[: i + 1]) for i in range(len(kept))}
    assert plan.bounds is not None and len(plan.bounds) > 2, plan  # several chunks ...
    assert set(plan.bounds[1:]) <= ends, (plan.bounds, kept)  # ... each ending where a sequence ends
    assert all(b - a <= 20 for a, b in zip(plan.bounds, plan.bounds[1:]))


def test_sequence_ratio_single_pass_unmasked_padded(backend, monkeypatch):
    """A padded batch without a mask: every sequence has T rows, so the chunks are cut T rows apart without reading
    the device (test_validation counts the reads), and the result is the fp64 reference's."""
    p = make_problem(5, 7, 16, 37, bias=True, seed=87)
    p["mask"] = None
    plans = _spy_fused(monkeypatch)
    _compare(p, "gspo", {}, _inputs(p, ("old", "ref")), backend, single_pass=True, chunk_size=16)
    (plan,) = plans
    assert plan.bounds == (0, 14, 28, 35), plan  # two sequences of 7 rows per chunk of at most 16


def test_sequence_ratio_falls_back_when_a_sequence_outgrows_the_chunk(backend, monkeypatch):
    p = make_problem(3, 9, 16, 37, mask_frac=0.0, seed=89)  # 9 kept tokens per sequence, chunks of 5 rows
    plans = _spy_fused(monkeypatch)
    auto = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], config="gspo",
                             old_logprobs=p["old_logprobs"], backend=backend, chunk_size=5)
    assert plans == []  # the two-stage (recompute) path
    _compare(p, "gspo", {}, _inputs(p, ("old",)), backend, chunk_size=5)
    assert torch.isfinite(auto.loss)
    with pytest.raises(ValueError, match="whole sequences: the longest has 9 kept tokens, the chunks 5 rows"):
        R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], config="gspo",
                          old_logprobs=p["old_logprobs"], backend=backend, chunk_size=5, single_pass=True)


def test_sequence_ratio_single_pass_packed(backend, monkeypatch):
    """Packed sequences of uneven lengths (one empty): chunk boundaries follow cu_seqlens."""
    p = make_problem(4, 8, 8, 41, seed=97)
    keep, k = _packed(p)
    plans = _spy_fused(monkeypatch)
    common = dict(cu_seqlens=k["cu"], old_logprobs=k["old"], config="gspo", backend=backend, chunk_size=8)
    out = R.fused_grpo_loss(k["hidden"], p["weight"], k["labels"], p["advantages"], k["mask"], single_pass=True,
                            **common)
    two = R.fused_grpo_loss(k["hidden"], p["weight"], k["labels"], p["advantages"], k["mask"], single_pass=False,
                            **common)
    loss_r, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"] & keep,
                                       old_logprobs=p["old_logprobs"], config="gspo")
    assert_matches("loss", out.loss, loss_r, scale=1.0)
    assert_matches("loss vs two-stage", out.loss, two.loss, scale=1.0)
    for name, a, b in zip(("hidden", "weight"), grads(out.loss, [k["hidden"], p["weight"]]),
                          grads(two.loss, [k["hidden"], p["weight"]])):
        assert_matches(f"grad_{name} vs two-stage", a, b)
    kept_ends = torch.cumsum((p["mask"] & keep).sum(1), 0).tolist()
    assert len(plans) == 1 and set(plans[0].bounds[1:]) <= set(kept_ends), (plans, kept_ends)


def test_sequence_aligned_plan():
    from rlkernels.engines.chunking import ChunkPlan, sequence_aligned

    plan = ChunkPlan(rows=8, vocab_block=100, vocab=100)
    ids = torch.tensor([0] * 3 + [1] * 7 + [2] * 2 + [4] * 8)  # sequence 3 (and 5) empty
    aligned, longest = sequence_aligned(plan, ids, 6)
    assert longest == 8
    assert aligned.bounds == (0, 3, 10, 12, 20) and aligned.ranges(20) == [(0, 3), (3, 10), (10, 12), (12, 20)]
    assert sequence_aligned(ChunkPlan(rows=12, vocab_block=100, vocab=100), ids, 6)[0].bounds == (0, 12, 20)
    assert sequence_aligned(ChunkPlan(rows=7, vocab_block=100, vocab=100), ids, 6) == (None, 8)  # sequence 4
    assert sequence_aligned(plan, torch.tensor([0, 1, 0]), 2)[0] is None  # sequence 0 not contiguous
    assert sequence_aligned(plan, torch.tensor([], dtype=torch.long), 3)[0].ranges(0) == []
    assert plan.ranges(20) == [(0, 8), (8, 16), (16, 20)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 65536.0), (torch.bfloat16, 1 / 3)],
                         ids=["fp16-gradscaler", "bf16-third"])
def test_the_single_pass_scales_its_gradients_by_the_upstream_gradient_in_fp32(backend, dtype, scale, compiled):
    """The single pass forms its gradients in the forward and scales them by the loss's upstream gradient in the
    backward. That factor is not rounded to the gradients' dtype: in fp16, GradScaler's default scale 65536 became inf
    (every gradient inf where eager's were finite); in bf16, 1/3 became 0.333984 (every gradient 0.2% too large).
    Here: (scale * loss).backward() gives finite gradients whose ratio to scale * (the unscaled call's) is 1 on
    average to rounding noise, eager and under torch.compile. (On CUDA a multiply by the 0-dim factor itself rounds
    it to the gradient's dtype, where the CPU's does not: the eager cases passed here and failed on an H100 until
    engines.autograd.scale_by_upstream.)"""
    if compiled:
        torch._dynamo.reset()
    p = make_problem(4, 9, 16, 37, dtype=dtype, seed=21)

    def loss_of(h, w):
        return R.fused_grpo_loss(h, w, p["labels"], p["advantages"], p["mask"], old_logprobs=p["old_logprobs"],
                                 config="dapo", backend=backend, single_pass=True).loss

    f = torch.compile(loss_of, fullgraph=True) if compiled else loss_of
    unit, scaled = [], []
    for factor, out in ((1.0, unit), (scale, scaled)):
        h, w = (p[k].detach().clone().requires_grad_() for k in ("hidden", "weight"))
        (f(h, w) * factor).backward()
        out += [h.grad, w.grad]
    for name, u, s in zip(("grad_hidden", "grad_weight"), unit, scaled):
        assert bool(torch.isfinite(s).all()), name
        want = u.double() * scale
        kept = want.abs() > want.abs().max() * 1e-2
        ratio = s.double()[kept] / want[kept]
        assert abs(float(ratio.mean()) - 1) < 2e-4, (name, float(ratio.mean()))
        assert float((ratio - 1).abs().max()) < 2 ** -7, name  # one rounding of the product in the input dtype


def test_fp16_takes_the_two_stage_path_where_the_single_pass_would_underflow(backend):
    """With fp16 inputs the default (single_pass=None) is the two-stage path: the single pass forms dL/dz in fp16
    before a GradScaler's scale reaches it, and the values below fp16's smallest (6e-8) flush to zero. Here 256
    tokens, V=4096, peaked logits, the loss scaled by 65536: the forced single pass zeroes whole rows of grad_weight
    (997 of them with the torch engine), the default and the two-stage path none, and the default is the two-stage
    path exactly."""
    p = make_problem(4, 64, 16, 4096, dtype=torch.float16, seed=5, logit_scale=8.0, mask_frac=0.0, device=DEVICE)

    def grad_weight(single_pass):
        w = p["weight"].detach().clone().requires_grad_()
        out = R.fused_grpo_loss(p["hidden"], w, p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config="dapo", backend=backend, single_pass=single_pass)
        (out.loss * 65536.0).backward()
        return w.grad

    zero_rows = lambda g: int((g.abs().sum(1) == 0).sum())  # noqa: E731
    forced, default, two_stage = grad_weight(True), grad_weight(None), grad_weight(False)
    assert zero_rows(forced) > 100 and zero_rows(default) == 0
    assert torch.equal(default, two_stage)


AUTOGRAD_CONTEXTS = ["frozen head", "frozen hidden", "checkpoint", "checkpoint reentrant", "save_on_cpu",
                     "two calls, one backward"]


@pytest.mark.parametrize("context", AUTOGRAD_CONTEXTS)
@pytest.mark.parametrize("config", ["dapo", "gspo"])
def test_autograd_contexts(backend, context, config):
    """The loss inside what trainers wrap around it: a frozen LM head or frozen hidden states (the single pass then
    forms one gradient), activation checkpointing (the forward, the single pass's gradients included, recomputed in
    backward), saved tensors offloaded to the CPU, two calls summed before one backward. Against the reference."""
    from torch.utils.checkpoint import checkpoint

    p = make_problem(3, 7, 12, 37, bias=True, seed=stable_seed(context, config))
    q = as_fp64(p)
    if context.startswith("frozen"):
        frozen = "weight" if context == "frozen head" else "hidden"
        for d in (p, q):
            d[frozen].requires_grad_(False)
    kw = dict(old_logprobs=p["old_logprobs"], config=config)

    def loss_of(d, fn):
        return fn(d["hidden"], d["weight"], d["labels"], d["advantages"], d["mask"], bias=d["bias"], **kw)[0]

    def ours(*args, **kwargs):
        return R.fused_grpo_loss(*args, backend=backend, **kwargs)

    if context.startswith("checkpoint"):
        loss = checkpoint(lambda h, w, b: ours(h, w, p["labels"], p["advantages"], p["mask"], bias=b, **kw)[0],
                          p["hidden"], p["weight"], p["bias"], use_reentrant=context.endswith("reentrant"))
    elif context == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            loss = loss_of(p, ours)
    elif context == "two calls, one backward":
        loss = loss_of(p, ours) + 0.5 * loss_of(p, ours)
    else:
        loss = loss_of(p, ours)
    loss_r = loss_of(q, ref.linear_policy_loss)
    if context == "two calls, one backward":
        loss_r = loss_r + 0.5 * loss_of(q, ref.linear_policy_loss)
    assert_matches("loss", loss, loss_r, scale=1.0)
    live = [k for k in ("hidden", "weight", "bias") if p[k].requires_grad]
    loss.backward()  # not autograd.grad: the reentrant checkpoint supports only backward()
    for name, b in zip(live, grads(loss_r, [q[k] for k in live])):
        assert_matches(f"grad_{name}", p[name].grad, b)
