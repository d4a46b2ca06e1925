"""Parity with TRL's own loss code: ``GRPOTrainer._compute_loss`` of trl 1.16.0 (pinned in the dev extras), run on
the same per-token log-probs and entropies, against ``fused_grpo_loss`` with the README's "Coming from TRL" mapping:
loss and gradients (hidden states and LM head) to float64 precision, and the metrics both log.

TRL's method is called unbound on a stand-in for the trainer: the attributes it reads, a one-process accelerator,
and the model's forward replaced by eager float64 log-probs and entropies from the same hidden states and weight
(what TRL computes from the logits its model returns). What differs by design is tested as a difference:
TRL's entropy bonus is a token mean whatever the loss type, rlkernels' is aggregated like the policy term.
"""
import collections
import types

import pytest
import torch

import rlkernels as R
from rlkernels import reference as ref

from conftest import DEVICE, make_problem, stable_seed

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402  (a dev dependency, pinned: the code under comparison)

B, T, H, V = 4, 9, 16, 53


class _OneProcess:
    """The accelerator calls TRL's loss makes, for one process."""
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _eager_logprobs(p):
    """Per-token log-probs and entropies as TRL gets them from its model's logits (float64, differentiable): the
    reference's, from the logits it materialises."""
    return ref.linear_logprobs(p["hidden"], p["weight"], p["labels"])


def trl_loss(p, inputs, *, loss_type, epsilon, epsilon_high, beta=0.0, delta=None, bias_correction=False,
             level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None, is_ratio=False,
             entropy_coef=0.0, sapo_temperature_neg=1.05, max_completion_length=T):
    """TRL's loss on problem ``p`` and its metrics (name -> list of logged values)."""
    metrics = collections.defaultdict(list)
    trainer = types.SimpleNamespace(
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, beta=beta,
        importance_sampling_level=level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, use_vllm=is_ratio,
        vllm_importance_sampling_correction=is_ratio, aux_loss_enabled=False,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=_OneProcess(), model=types.SimpleNamespace(training=True), _metrics={"train": metrics},
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=sapo_temperature_neg, steps_per_generation=1),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (*_eager_logprobs(p), None),
    )
    trainer.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    return GRPOTrainer._compute_loss(trainer, None, inputs), metrics


def _problem(seed):
    p = make_problem(B, T, H, V, seed=seed, mask_frac=0.25)
    p["mask"][:, 0] = True  # no empty completion (TRL's per-sequence clip metrics divide by its length)
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long, device=DEVICE),
        prompt_mask=torch.ones(B, 2, dtype=torch.long, device=DEVICE),
        completion_ids=p["labels"], completion_mask=p["mask"].long(), advantages=p["advantages"],
        old_per_token_logps=p["old_logprobs"], ref_per_token_logps=p["ref_logprobs"],
        sampling_per_token_logps=p["rollout_logprobs"],
        importance_sampling_ratio=(0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)).to(DEVICE),
        num_items_in_batch=p["mask"].sum().double() + 3.0)  # dapo / cispo: not this micro-batch's token count
    return p, inputs


# (case, TRL settings, rlkernels call: preset and overrides, the inputs it takes by TRL's name)
CASES = [
    ("grpo", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2), dict(config="grpo"), ()),
    ("bnpo", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.2), dict(config="bnpo"), ()),
    ("dr_grpo", dict(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.2), dict(config="dr_grpo", norm_length=T), ()),
    ("dapo", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28), dict(config="dapo"), ("normalizer",)),
    ("cispo", dict(loss_type="cispo", epsilon=0.2, epsilon_high=1.2), dict(config="cispo", clip_high=0.2),
     ("normalizer",)),
    # TRL picks its SAPO temperatures with torch.where of two Python floats: fp32, 1.05 off by 4e-8 (the loss then
    # differs by as much); 1.0625 is exact in fp32
    ("sapo", dict(loss_type="sapo", epsilon=0.2, epsilon_high=0.2, sapo_temperature_neg=1.0625),
     dict(config="sapo", sapo_tau_neg=1.0625), ()),
    ("gspo", dict(loss_type="grpo", epsilon=3e-2, epsilon_high=4e-2, level="sequence"),
     dict(config="gspo", clip_low=3e-2, clip_high=4e-2), ()),
    ("luspo", dict(loss_type="luspo", epsilon=2e-2, epsilon_high=2.5e-2, level="sequence"),
     dict(config="luspo", clip_low=2e-2, clip_high=2.5e-2), ()),
    ("kl", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, beta=0.04), dict(config="grpo", kl_coef=0.04),
     ("ref",)),
    ("kl bias-corrected", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.1, bias_correction=True),
     dict(config="dapo", kl_coef=0.1, kl_is_corrected=True), ("ref", "normalizer")),
    ("two-sided clip", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.2, delta=1.5),
     dict(config="bnpo", dual_clip=1.5), ()),
    ("top entropy quantile", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, top_entropy_quantile=0.6),
     dict(config="grpo", top_entropy_quantile=0.6), ()),
    ("off-policy mask", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.2, off_policy_mask_threshold=0.02),
     dict(config="grpo", opsm_delta=0.02), ("sampling",)),
    ("vllm IS ratio", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, is_ratio=True),
     dict(config="dapo"), ("is", "normalizer")),
    ("entropy bonus, token mean", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.2, entropy_coef=0.05),
     dict(config="bnpo", entropy_coef=0.05), ()),
    ("entropy bonus, dapo", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, entropy_coef=0.05),
     dict(config="dapo", entropy_coef=0.05), ("local normalizer",)),
]

_BY_TRL_NAME = {"ref": ("ref_logprobs", "ref_per_token_logps"), "sampling": ("rollout_logprobs",
                                                                             "sampling_per_token_logps"),
                "is": ("is_weights", "importance_sampling_ratio"), "normalizer": ("normalizer", "num_items_in_batch")}

# TRL's metric -> rlkernels': token-weighted means over the kept tokens (TRL's clip fractions of a sequence-level
# ratio are means over sequences: not compared). rlkernels' clip_frac also counts the dual-clipped tokens (A < 0,
# ratio > dual_clip: TRL's delta), which TRL's region_mean leaves out
_METRICS = {"entropy": lambda m: m["entropy"], "kl": lambda m: m["kl"],
            "clip_ratio/low_mean": lambda m: m["clip_frac_low"], "clip_ratio/high_mean": lambda m: m["clip_frac_high"],
            "clip_ratio/region_mean": lambda m: m["clip_frac"] - m["dual_clip_frac"],
            "cispo_clip_ratio": lambda m: m["clip_frac_high"]}


@pytest.mark.parametrize("case,trl_kw,ours_kw,takes", CASES, ids=[c[0] for c in CASES])
def test_matches_trl(backend, case, trl_kw, ours_kw, takes):
    p, inputs = _problem(stable_seed(case))
    if "local normalizer" in takes:  # num_items_in_batch: this batch's token count (TRL's entropy bonus divides by it)
        inputs["num_items_in_batch"] = p["mask"].sum().double()
        takes = takes + ("normalizer",)
    loss_trl, metrics_trl = trl_loss(p, inputs, **trl_kw)
    kw = {ours: inputs[theirs] for key, (ours, theirs) in _BY_TRL_NAME.items() if key in takes}
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                            old_logprobs=p["old_logprobs"], backend=backend, **kw, **ours_kw)
    torch.testing.assert_close(out.loss, loss_trl, rtol=1e-10, atol=1e-12)
    for name, ours, theirs in zip(("hidden", "weight"), torch.autograd.grad(out.loss, [p["hidden"], p["weight"]]),
                                  torch.autograd.grad(loss_trl, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad_{name}: {m}")
    sequence_level = trl_kw.get("level") == "sequence"
    compared = [theirs for theirs in _METRICS if theirs in metrics_trl and not (sequence_level and "clip" in theirs)]
    for theirs in compared:
        ours = _METRICS[theirs](out.metrics).item()
        assert ours == pytest.approx(metrics_trl[theirs][0], rel=1e-6, abs=1e-7), theirs
    logs_clipping = not sequence_level and trl_kw["loss_type"] != "sapo"  # SAPO clips nothing
    assert "entropy" in compared and (not logs_clipping or any("clip" in name for name in compared))


@pytest.mark.parametrize("config,quantile", [("grpo", 1.0), ("bnpo", 0.6)], ids=["sequence mean", "entropy mask"])
def test_entropy_bonus_differs_from_trl(config, quantile):
    """TRL's entropy bonus is the mean entropy of the tokens it acts on, whatever the loss type; rlkernels aggregates
    it like the policy term (LOSSES.md B 5.1, verl's convention). They differ with grpo's sequence mean (unless every
    completion has the same length) and, with top_entropy_quantile < 1, with a token mean too: TRL divides by the
    tokens the entropy mask keeps, rlkernels by the kept tokens, as its policy term. The policy terms agree. The
    README's mapping says so."""
    p, inputs = _problem(5)
    assert len(set(p["mask"].sum(1).tolist())) > 1  # unequal lengths
    trl_kw = dict(loss_type=config, epsilon=0.2, epsilon_high=0.2, top_entropy_quantile=quantile)
    loss_trl, _ = trl_loss(p, inputs, entropy_coef=0.05, **trl_kw)
    loss_trl_plain, _ = trl_loss(p, inputs, **trl_kw)
    ours = [R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                              old_logprobs=p["old_logprobs"], config=config, top_entropy_quantile=quantile,
                              entropy_coef=coef).loss for coef in (0.05, 0.0)]
    torch.testing.assert_close(ours[1], loss_trl_plain, rtol=1e-10, atol=1e-12)
    entropy = _eager_logprobs(p)[1].detach()
    m = p["mask"].double()
    acts = m * (entropy >= torch.quantile(entropy[p["mask"]], 1.0 - quantile))  # TRL's entropy mask
    trl_bonus = (entropy * acts).sum() / acts.sum()
    ours_bonus = ((entropy * acts).sum(1) / m.sum(1)).mean() if config == "grpo" else (entropy * acts).sum() / m.sum()
    torch.testing.assert_close(loss_trl_plain - loss_trl, 0.05 * trl_bonus, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1] - ours[0], 0.05 * ours_bonus, rtol=1e-10, atol=1e-12)
    assert abs(float(trl_bonus - ours_bonus)) > 1e-3


@pytest.mark.parametrize("scale_rewards,method", [("group", "grpo"), ("batch", "lite_ppo"), ("none", "dr_grpo")])
def test_group_advantages_match_trl_scale_rewards(scale_rewards, method):
    """TRL's advantages (GRPOTrainer._generate_and_score_completions, its one reward function's branch, written out
    here around TRL's own nanstd) against group_advantages with TRL's eps, 1e-4. TRL's Bessel factor n / (n - 1) is
    an fp32 division of integer counts, so they agree to fp32 precision (2.2e-8 here), not to float64's."""
    from trl.trainer.utils import nanstd

    G = 4
    rewards = torch.randn(16, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(DEVICE)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = {"group": lambda: nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G),
           "batch": lambda: nanstd(rewards).expand_as(rewards), "none": lambda: None}[scale_rewards]()
    theirs = rewards - mean if std is None else (rewards - mean) / (std + 1e-4)
    ours = R.group_advantages(rewards, group_size=G, method=method, eps=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_match_trl(backend, temperature):
    """TRL's per-token log-probs and entropies from logits (trl.trainer.utils.selective_log_softmax_and_entropy: its
    eager path on the CPU, a Triton kernel of its own on CUDA) against logprobs_from_logits: values at every kept row,
    zeros at masked rows, and the logits' gradient of a loss on both."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4).to(DEVICE).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(DEVICE)
    weights = [torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    theirs = selective_log_softmax_and_entropy(logits, labels, temperature=temperature, row_mask=mask.long())
    ours = R.logprobs_from_logits(logits, labels, mask=mask, temperature=temperature, return_entropy=True,
                                  backend=backend)
    logit_grads = []
    for name, a, b in zip(("logp", "entropy"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for lp, ent in (ours, theirs):
        logit_grads.append(torch.autograd.grad((lp * weights[0]).sum() + (ent * weights[1]).sum(), [logits])[0])
    torch.testing.assert_close(logit_grads[0], logit_grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_logprobs_match_trl_fused_lm_head(backend, softcap):
    """TRL's fused LM head (trl.kernels.chunked_logprob.ChunkedLogProbFunction, what its trainer calls with
    fused_lm_head: hidden+W in tiles, online statistics in fp32) against fused_logprobs, with a bias, a temperature
    and TRL's softcap: log-probs, entropies and the gradients of a loss on both (hidden, weight, bias), to the fp32
    precision of TRL's statistics."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    p = make_problem(B, T, H, V, seed=13, bias=True)
    h, y = p["hidden"].reshape(-1, H), p["labels"].reshape(-1)
    g = torch.Generator().manual_seed(13)
    weights = [torch.randn(B * T, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2)]
    theirs = ChunkedLogProbFunction.apply(h, p["weight"], p["bias"], y, 0.7, 16, softcap, 1.0, ("entropy",))[:2]
    ours = R.fused_logprobs(h, p["weight"], y, bias=p["bias"], temperature=0.7, softcap=softcap,
                            return_entropy=True, backend=backend)
    leaves = [p["hidden"], p["weight"], p["bias"]]
    results = []
    for name, a, b in zip(("logp", "entropy"), ours, theirs):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for lp, ent in (ours, theirs):
        results.append(torch.autograd.grad((lp * weights[0]).sum() + (ent * weights[1]).sum(), leaves))
    for name, a, b in zip(("hidden", "weight", "bias"), *results):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=lambda m: f"grad_{name}: {m}")
