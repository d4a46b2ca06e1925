"""Any memory layout of any tensor argument gives the answer of its contiguous copy: strided views, transposed
views, expanded (stride 0) hidden states, column-major weights. The kernels index by pointer, so a layout they do
not expect would read the wrong values silently (a strided bias did, on the Triton engine)."""
import pytest
import torch

import rlkernels as R

from conftest import DEVICE, make_problem, pack

B, T, H, V = 3, 7, 12, 37


def spread(x):
    """x's values in a view whose every stride is doubled: not contiguous, same shape, dtype and device."""
    if x is None or not isinstance(x, torch.Tensor):
        return x
    view = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]  # differentiable: gradients reach x
    assert view.numel() <= 1 or not view.is_contiguous()
    return view


def transposed(x):
    """x's values in a column-major view (2-D and up: the first two dimensions swapped in memory)."""
    if x is None or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return spread(x)
    view = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous()
    return view


def _same(name, got, want):
    if want is None:
        assert got is None, name
        return
    assert got is not None, name
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")


def _loss_and_grads(backend, p, layout, names, **kw):
    """fused_grpo_loss on p, the arguments in ``names`` given through ``layout``; -> loss, metrics, grads of the
    leaves (hidden, weight, bias)."""
    args = {k: (layout(v) if k in names else v) for k, v in p.items()}
    out = R.fused_grpo_loss(args["hidden"], args["weight"], args["labels"], args["advantages"], args["mask"],
                            bias=args["bias"], temperature=args["temperature"], old_logprobs=args["old_logprobs"],
                            ref_logprobs=args["ref_logprobs"], rollout_logprobs=args["rollout_logprobs"],
                            backend=backend, **kw)
    leaves = [t for t in (p["hidden"], p["weight"], p["bias"]) if t is not None]
    return out.loss, out.metrics, torch.autograd.grad(out.loss, leaves)


ARGUMENTS = ["hidden", "weight", "bias", "labels", "mask", "temperature", "advantages", "old_logprobs",
             "ref_logprobs", "rollout_logprobs"]


@pytest.mark.parametrize("layout", [spread, transposed], ids=["strided", "transposed"])
@pytest.mark.parametrize("name", ARGUMENTS + ["all", "all unmasked"])
@pytest.mark.parametrize("config", ["dapo", "gspo"])
def test_fused_grpo_loss_any_layout(backend, layout, name, config):
    """"all unmasked": every argument a view and no mask, so that no row gather copies the per-token inputs."""
    p = make_problem(B, T, H, V, bias=True, per_token_temperature=True, per_token_advantages=name == "advantages",
                     seed=len(name))
    if name == "all unmasked":
        name, p["mask"] = "all", None
    kw = dict(config=config, kl_coef=0.05, rollout_correction="token_tis")
    names = set(ARGUMENTS) if name == "all" else {name}
    loss, metrics, grads = _loss_and_grads(backend, p, layout, names, **kw)
    loss_c, metrics_c, grads_c = _loss_and_grads(backend, p, lambda x: x, set(), **kw)
    _same("loss", loss, loss_c)
    for key in metrics_c:
        _same(key, metrics[key], metrics_c[key])
    for g, g_c, leaf in zip(grads, grads_c, ("hidden", "weight", "bias")):
        _same(f"grad {leaf}", g, g_c)


def test_expanded_hidden_and_single_pass_paths(backend):
    """Hidden states with a zero stride (one row broadcast over a sequence), and a single pass against the two-stage
    path, both on the expanded view."""
    p = make_problem(B, T, H, V, bias=True, seed=5)
    row = p["hidden"][:, :1]
    hidden = row.expand(B, T, H)
    assert hidden.stride(1) == 0
    outs = []
    for h in (hidden, hidden.contiguous()):
        for single_pass in (None, False):
            out = R.fused_grpo_loss(h, p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                                    old_logprobs=p["old_logprobs"], config="dapo", single_pass=single_pass,
                                    backend=backend)
            outs.append((out.loss, *torch.autograd.grad(out.loss, [row, p["weight"], p["bias"]])))
    for other in outs[1:]:
        for a, b in zip(other, outs[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layout", [spread, transposed], ids=["strided", "transposed"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no mask"])
@pytest.mark.parametrize("config", ["grpo", "gspo"])
def test_packed_any_layout(backend, layout, masked, config):
    """Packed (N, H) hidden states, (N,) per-token inputs, (S+1,) cu_seqlens and (S,) advantages as strided views;
    without a mask no row gather copies them. fused_logprobs on the same rows."""
    p = make_problem(4, 6, H, V, seed=11, per_token_temperature=True)
    keep, cu, pick = pack(4, 6, [6, 2, 5, 1])
    results = []
    for lay in (layout, lambda x: x):
        args = dict(hidden=pick(p["hidden"]), weight=p["weight"], labels=pick(p["labels"]),
                    advantages=p["advantages"], mask=pick(p["mask"]) if masked else None, cu_seqlens=cu,
                    old_logprobs=pick(p["old_logprobs"]), temperature=pick(p["temperature"]))
        a = {k: lay(v) for k, v in args.items()}
        lp, ent = R.fused_logprobs(a["hidden"], a["weight"], a["labels"], mask=a["mask"],
                                   temperature=a["temperature"], return_entropy=True, backend=backend)
        out = R.fused_grpo_loss(a.pop("hidden"), a.pop("weight"), a.pop("labels"), a.pop("advantages"),
                                a.pop("mask"), config=config, backend=backend, **a)
        results.append((out.loss, lp, ent, *torch.autograd.grad(out.loss + lp.sum() + ent.sum(),
                                                                [p["hidden"], p["weight"]])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layout", [spread, transposed], ids=["strided", "transposed"])
@pytest.mark.parametrize("name", ["labels", "mask", "temperature", "all", "labels unmasked", "temperature unmasked"])
@pytest.mark.parametrize("rows", [(B, T), (B * T,)], ids=["3d", "2d"])
def test_logprobs_from_logits_any_layout(backend, layout, name, rows):
    """Without a mask no row gather copies the per-row inputs: a (rows,) view reaches the engine as it is."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(*rows, V, generator=g, dtype=torch.float64) * 3).to(DEVICE).requires_grad_()
    args = dict(labels=torch.randint(0, V, rows, generator=g).to(DEVICE),
                mask=(torch.rand(rows, generator=g) > 0.3).to(DEVICE),
                temperature=(0.5 + torch.rand(rows, generator=g, dtype=torch.float64)).to(DEVICE))
    if name.endswith("unmasked"):
        name, args["mask"] = name.split()[0], None
    results = []
    for lay in (layout, lambda x: x):
        a = {k: (lay(v) if name in (k, "all") else v) for k, v in args.items()}
        logp, ent = R.logprobs_from_logits(logits, a["labels"], mask=a["mask"], temperature=a["temperature"],
                                           return_entropy=True, backend=backend)
        results.append((logp, ent, *torch.autograd.grad(logp.sum() + ent.sum(), [logits])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["grpo", "rpp_baseline"])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_advantages_any_layout(method, labelled, dtype):
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(12, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    ids = torch.randint(0, 4, (12,), generator=g).to(DEVICE) if labelled else None
    lengths = torch.randint(1, 9, (12,), generator=g).to(DEVICE) if method == "rpp_baseline" else None
    kw = dict(group_ids=ids) if labelled else dict(group_size=4)
    backends = [b for b in ("torch", "triton") if R.available_backends(DEVICE).get(b) == "available"]
    for b in backends:
        got = R.group_advantages(spread(rewards), method=method, lengths=spread(lengths), backend=b,
                                 **{k: spread(v) for k, v in kw.items()})
        want = R.group_advantages(rewards, method=method, lengths=lengths, backend=b, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layout", [spread, transposed], ids=["strided", "transposed"])
def test_policy_loss_any_layout(layout):
    """The objective from log-probs: every per-token input and the advantages as views."""
    p = make_problem(B, T, H, V, seed=13, per_token_advantages=True)
    g = torch.Generator().manual_seed(13)
    logp = (p["old_logprobs"] + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)).requires_grad_()
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    is_weights = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64).to(DEVICE)
    results = []
    for lay in (layout, lambda x: x):
        out = R.policy_loss(lay(logp), lay(entropy), lay(p["advantages"]), lay(p["mask"]),
                            old_logprobs=lay(p["old_logprobs"]), ref_logprobs=lay(p["ref_logprobs"]),
                            is_weights=lay(is_weights),
                            config="dapo", kl_coef=0.05, entropy_coef=0.01)
        results.append((out.loss, *torch.autograd.grad(out.loss, [logp, entropy])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["transposed", "stride0", "slices"])
@pytest.mark.parametrize("path", ["linear", "logits"])
def test_upstream_gradient_any_layout(backend, kind, path):
    """The gradients that reach the log-probs and entropies from the caller's loss come in autograd's layout: a
    transposed one (a product with a transposed tensor), stride 0 (a sum), or zeros around a slice."""
    p = make_problem(B, T, H, V, seed=17)
    g = torch.Generator().manual_seed(17)
    G = [torch.randn(T, B, generator=g, dtype=torch.float64).to(DEVICE).t() for _ in range(2)]
    logits = (p["hidden"] @ p["weight"].T).detach().requires_grad_()
    leaves = [p["hidden"], p["weight"]] if path == "linear" else [logits]

    def upstream(lp, ent, contiguous):
        if kind == "transposed":
            return (lp * (G[0].contiguous() if contiguous else G[0])).sum() + (ent * G[1]).sum()
        if kind == "stride0":
            return (lp * 1.0).sum() + (ent * 2.0).sum() if contiguous else lp.sum() + 2 * ent.sum()
        if contiguous:  # the same upstream gradient, made contiguous: the slices' indicators
            every_other = (torch.arange(T, device=DEVICE) % 2 == 0).double().expand(B, T)
            return (lp * every_other.contiguous()).sum() + (ent * (1 - every_other).contiguous()).sum()
        return lp[:, ::2].sum() + ent[:, 1::2].sum()

    results = []
    for contiguous in (False, True):
        if path == "linear":
            lp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], return_entropy=True,
                                       backend=backend)
        else:
            lp, ent = R.logprobs_from_logits(logits, p["labels"], mask=p["mask"], return_entropy=True,
                                             backend=backend)
        results.append(torch.autograd.grad(upstream(lp, ent, contiguous), leaves))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
