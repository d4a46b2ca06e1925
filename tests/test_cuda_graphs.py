"""CUDA graphs: while a CUDA graph is captured nothing may read device data back (the capture would end with an
error), so the public functions then skip their value checks and compute dropped rows neutralised instead of
gathering the kept ones (whose count is read back), as under torch.compile.

On the CPU the capture is simulated (``_checks.capturing`` patched to True) under a guard that fails on any host read
of tensor data; the results must equal the float64 reference. On a GPU (``bench/device_check.sh``) real captures,
``torch.cuda.graph`` and ``torch.compile(mode="reduce-overhead")``, replay new data to eager's results.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkernels as R
import rlkernels._checks as C
import rlkernels.ops as ops
from rlkernels import reference as ref

from conftest import DEVICE, as_fp64, assert_matches, grads, leaves, make_problem, pack

# lift_fresh: a tensor made from host data (torch.tensor, as_tensor of a number), which on a GPU is a copy with a
# stream sync (PyTorch's blocking host-to-device copy), an error in a capture
_READS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::lift_fresh")


class HostReadGuard(TorchDispatchMode):
    """Fails on every op that reads a tensor's values back to the host (a sync on a GPU): ``nonzero`` (its size),
    ``item`` / ``bool()``, or makes one from host data (``lift_fresh``); ``tolist`` and the value checks'
    ``read_back`` are patched to fail too. ``reads``: the ops it fails on."""

    def __init__(self, reads=_READS):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.reads:
            raise AssertionError(f"host read while capturing: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def capture(monkeypatch):
    """Enter to run as if a CUDA graph were captured: reads of device data fail."""
    def read(*_):
        raise AssertionError("host read while capturing: tolist / read_back")

    class Capture:
        def __enter__(self):
            monkeypatch.setattr(C, "capturing", lambda: True)
            monkeypatch.setattr(torch.Tensor, "tolist", read)
            monkeypatch.setattr(C, "read_back", read)
            self.guard = HostReadGuard()
            self.guard.__enter__()
            return self

        def __exit__(self, *exc):
            self.guard.__exit__(*exc)
            monkeypatch.undo()
    return Capture()


def _packed(p):
    """The problem's rows as a packed batch of sequences of 5, 0, T and 3 tokens (B = 4)."""
    B, T = p["labels"].shape
    return pack(B, T, [5, 0, T, 3])


@pytest.mark.parametrize("config,layout,extras", [("dapo", "padded", False), ("dapo", "padded", True),
                                                  ("gspo", "padded", False), ("gspo", "packed", True),
                                                  ("grpo", "padded", False)])
def test_the_loss_reads_nothing_back_while_capturing(backend, capture, monkeypatch, config, layout, extras):
    """fused_grpo_loss on a masked batch, forward and backward, with no host read: dropped rows neutralised, the
    value checks skipped; a sequence-level ratio on a padded batch keeps the single pass (its T rows per sequence
    need no read), on a packed one takes the two-stage path. ``extras``: per-token temperatures and a final-logit
    cap too; grpo: a normaliser given as a device tensor. Loss, gradients and metrics equal the reference."""
    p = make_problem(4, 9, 16, 41, seed=31, bias=True, mask_frac=0.3, per_token_temperature=extras)
    cap = 2.0 if extras else None
    norm = 5.5 if config == "grpo" else None  # grpo: the normaliser given, as a device tensor to the fused call
    kw = dict(old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.05, normalizer=norm)
    q = as_fp64(p)
    mask_r, temp, temp_r = q["mask"], p["temperature"], q["temperature"]
    if layout == "packed":
        keep, cu, pick = _packed(p)
        mask_r = q["mask"] & keep.reshape(q["mask"].shape)
        hidden = pick(p["hidden"].detach()).requires_grad_()
        args = (hidden, p["weight"], pick(p["labels"]), p["advantages"], pick(p["mask"]))
        temp = pick(temp) if extras else temp
    else:
        hidden = p["hidden"]
        args = (hidden, p["weight"], p["labels"], p["advantages"], p["mask"])
    loss_r, metrics_r = ref.linear_policy_loss(q["hidden"], q["weight"], q["labels"], q["advantages"], mask_r,
                                               bias=q["bias"], config=config, temperature=temp_r, softcap=cap, **kw)
    if layout == "packed":
        kw = dict(old_logprobs=pick(p["old_logprobs"]), ref_logprobs=pick(p["ref_logprobs"]), kl_coef=0.05,
                  cu_seqlens=cu)
    kw.update(temperature=temp, softcap=cap, normalizer=None if norm is None else torch.tensor(norm, device=DEVICE))
    g_r = grads(loss_r, leaves(q))
    lengths = []
    aligned = ops.sequence_aligned
    monkeypatch.setattr(ops, "sequence_aligned", lambda *a: (lengths.append(a[3]), aligned(*a))[1])
    with capture:
        out = R.fused_grpo_loss(*args, bias=p["bias"], config=config, backend=backend, chunk_size=10, **kw)
        g = grads(out.loss, [hidden, p["weight"], p["bias"]])
    if config == "gspo":  # padded: the single pass, planned from T; packed: nothing read, the two-stage path
        assert lengths == ([(9,) * 4] if layout == "padded" else []), lengths
    assert_matches("loss", out.loss, loss_r, scale=1.0)
    if layout == "packed":
        g_r = (pick(g_r[0]),) + g_r[1:]
    for name, a, b in zip(("hidden", "weight", "bias"), g, g_r):
        assert_matches(f"grad_{name}", a, b)
    for k, v in metrics_r.items():
        assert_matches(k, out.metrics[k], v, scale=max(1.0, abs(float(v))), dtype=torch.float32)


def test_the_log_probs_read_nothing_back_while_capturing(backend, capture):
    """fused_logprobs and logprobs_from_logits on a masked batch, forward and backward, with no host read: zeros
    and zero gradients at dropped positions, the reference elsewhere."""
    p = make_problem(3, 7, 16, 37, seed=32, mask_frac=0.4)
    q = as_fp64(p)
    logp_r, ent_r = ref.linear_logprobs(q["hidden"], q["weight"], q["labels"])
    keep = q["mask"]
    logits = (p["hidden"].detach() @ p["weight"].detach().T).requires_grad_()
    with capture:
        logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], return_entropy=True,
                                     backend=backend, chunk_size=4)
        g = grads((logp * 1.5 + ent * 0.5).sum(), [p["hidden"], p["weight"]])
        logp2, ent2 = R.logprobs_from_logits(logits, p["labels"], mask=p["mask"], return_entropy=True,
                                             backend=backend)
        (g_z,) = grads((logp2 * 1.5 + ent2 * 0.5).sum(), [logits])
    zero = torch.zeros((), dtype=torch.float64)
    for name, a, b in (("logp", logp, logp_r), ("entropy", ent, ent_r), ("logp (logits)", logp2, logp_r),
                       ("entropy (logits)", ent2, ent_r)):
        assert_matches(name, a, torch.where(keep, b, zero))
    g_r = grads((torch.where(keep, logp_r, zero) * 1.5 + torch.where(keep, ent_r, zero) * 0.5).sum(),
                [q["hidden"], q["weight"]])
    assert_matches("grad_hidden", g[0], g_r[0])
    assert_matches("grad_weight", g[1], g_r[1])
    z = (q["hidden"].detach() @ q["weight"].detach().T).requires_grad_()
    lp, en = ref.logprobs_from_logits(z, q["labels"])
    (g_zr,) = grads((torch.where(keep, lp, zero) * 1.5 + torch.where(keep, en, zero) * 0.5).sum(), [z])
    assert_matches("grad_logits", g_z, g_zr)


def test_the_guard_sees_host_reads(capture):
    """The guard is able to fail: the gather of kept rows reads their count back, except under a capture."""
    keep = make_problem(2, 5, 8, 11, seed=33, mask_frac=0.4)["mask"].reshape(-1)
    assert not bool(keep.all())
    rows = torch.ones(keep.numel(), 3, device=keep.device)
    labels = torch.ones(keep.numel(), dtype=torch.long, device=keep.device)
    with pytest.raises(AssertionError, match="host read"), HostReadGuard():
        ops._kept_index(keep, keep)
    with capture:
        rows_c, labels_c, _, index, computed = ops._kept_rows(rows, labels, 1.0, keep, keep,
                                                              ops._kept_index(keep, keep))
    assert index is None and torch.equal(computed, keep)  # every row computed, the dropped ones zeroed
    assert torch.equal(rows_c.sum(1), 3.0 * keep) and torch.equal(labels_c, keep.long())


@pytest.mark.parametrize("method", ["grpo", "passk", "rpp_baseline"])
def test_group_advantages_read_nothing_back_while_capturing(backend, capture, method):
    """group_advantages under a capture: labelled groups numbered on the device (no read of their count), the inf
    check skipped; contiguous and labelled groups with a singleton, an all-equal group and NaN rewards equal the
    reference."""
    impl = "triton" if backend == "triton" else "torch"  # its two implementations
    g = torch.Generator().manual_seed(35)
    r = torch.randn(20, generator=g, dtype=torch.float64)
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 5, 5, 5, 5, 2, 2, 2, 11, 11, 11, 11, 4, 4, 4])
    r[ids == 2] = 0.5
    r[[0, 14]] = float("nan")
    lengths = torch.randint(1, 50, (20,), generator=g)
    for kw in (dict(group_size=4), dict(group_ids=ids, lengths=lengths)):
        on_device = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        with capture:
            got = R.group_advantages(r.to(DEVICE), method=method, backend=impl, **on_device)
        assert_matches(method, got.cpu(), ref.group_advantages(r, method=method, **kw))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("normalizer", [None, 7.5])
@pytest.mark.parametrize("checks", ["1", "0"])
def test_no_tensor_is_made_from_host_data(backend, monkeypatch, loss_agg, normalizer, checks):
    """In eager mode too (value checks on or off), no call makes a tensor from host data: on a GPU torch.tensor /
    as_tensor of a number is a blocking copy, a stream sync per call (a float normalizer and the sequence count once
    took that path in every loss). The loss from hidden states (single pass and two-stage), from logits, from your
    log-probs, the KL penalty and the group advantages, forward and backward."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", checks)
    p = make_problem(3, 6, 8, 29, seed=36, mask_frac=0.3)
    kw = dict(old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.05, loss_agg=loss_agg,
              normalizer=normalizer, config="dapo", **({"norm_length": 6} if loss_agg.endswith("norm") else {}))
    logits = (p["hidden"].detach() @ p["weight"].detach().T).requires_grad_()
    with HostReadGuard(reads=("aten::lift_fresh",)):
        for single_pass in (None, False):
            out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                    backend=backend, single_pass=single_pass, **kw)
            out.loss.backward()
        lp, ent = R.logprobs_from_logits(logits, p["labels"], mask=p["mask"], return_entropy=True, backend=backend)
        loss = R.policy_loss(lp, ent, p["advantages"], p["mask"], **kw).loss
        (loss + R.kl_penalty(lp, p["ref_logprobs"]).sum()).backward()
        R.group_advantages(torch.randn(12, dtype=torch.float64, device=DEVICE), group_size=4,
                           backend="torch" if backend == "native" else backend)  # (no native group kernel)


def test_a_host_normalizer_for_device_inputs_is_read_as_its_number(capture):
    """A CPU scalar tensor as the normaliser of inputs on a GPU: copying it there would be a blocking copy (a stream
    sync per call), so it is read (host memory) and taken as the number it holds, checked as one; in a CUDA graph
    capture, whose replays would keep that number, it is an error. For CPU inputs, or under torch.compile, it stays
    a tensor. (The whole call on a GPU: test_no_stream_sync_with_the_checks_off.)"""
    import rlkernels._inputs as I

    cuda = torch.device("cuda")  # a device object only: nothing runs there
    got = I.check_normalizer(torch.tensor(6, dtype=torch.int32), cuda)
    assert got == 6.0 and isinstance(got, float)
    assert isinstance(I.check_normalizer(torch.tensor(6.0), torch.device("cpu")), torch.Tensor)
    with pytest.raises(ValueError, match="normalizer=-1.0: must be finite and > 0"):
        I.check_normalizer(torch.tensor([-1.0]), cuda)
    host = torch.tensor(6.0)
    with capture, pytest.raises(ValueError, match="normalizer is a CPU tensor and the inputs are on cuda"):
        I.check_normalizer(host, cuda)


def test_a_sharded_head_is_refused_while_capturing(capture):
    """tp_group's shard checks and merges are collectives with host reads: refused under a capture, before any."""
    p = make_problem(2, 5, 8, 11, seed=34)
    with capture, pytest.raises(ValueError, match="tp_group: .*CUDA graph capture"):
        R.fused_logprobs(p["hidden"], p["weight"], p["labels"], tp_group=object())


# ---------------------------------------------------------------------------------------------------------------
# real captures (bench/device_check.sh)
# ---------------------------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="captures a CUDA graph: a GPU test (device_check.sh)")


def _fresh(seed, dtype=torch.float32):
    p = make_problem(4, 33, 64, 1000, dtype=dtype, seed=seed, bias=True, mask_frac=0.3)
    # the step's normaliser as a device tensor, updated in place between replays (a number would be fixed into the
    # graph like any kernel argument)
    p["normalizer"] = torch.tensor(4.0 + seed % 5, dtype=dtype, device=DEVICE)
    return p


_INPUTS = ("hidden", "weight", "bias", "labels", "mask", "advantages", "old_logprobs", "ref_logprobs", "normalizer")


def _step(p, config, backend):
    """One training step's loss work: forward and backward, the gradients left in .grad."""
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], bias=p["bias"],
                            old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.05,
                            normalizer=p["normalizer"], config=config, backend=backend)
    out.loss.backward()
    return out.loss


@cuda_only
@pytest.mark.parametrize("config", ["dapo", "gspo", "grpo"])
def test_torch_cuda_graph_replays_the_step(backend, config):
    """A step captured by torch.cuda.graph (after warm-up on a side stream, as PyTorch asks) and replayed on new
    data equals the eager step on that data: loss and every gradient (the normaliser a device tensor, new each
    replay)."""
    static = _fresh(40)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for t in leaves(static):
                t.grad = None
            _step(static, config, backend)
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves(static):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = _step(static, config, backend)
    for seed in (41, 42):
        new = _fresh(seed)
        with torch.no_grad():
            for name in _INPUTS:
                static[name].copy_(new[name])
        graph.replay()
        loss_e = _step(new, config, backend)
        assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
        for name, a, b in zip(("hidden", "weight", "bias"), leaves(static), leaves(new)):
            assert_matches(f"grad_{name}", a.grad, b.grad, dtype=torch.float32)


@cuda_only
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_reduce_overhead_compile_matches_eager(layout):
    """torch.compile(mode="reduce-overhead") over a GSPO loss (the single pass with sequence chunks) on the default
    engine (Triton): padded, its op plans from the shape and is captured; packed, its op reads the lengths and is
    kept out of the graphs by its cudagraph_unsafe tag. Three calls on new data each equal eager."""
    torch._dynamo.reset()
    backend = "auto"

    def f(hidden, weight, labels, advantages, mask, old_logprobs, cu_seqlens):
        out = R.fused_grpo_loss(hidden, weight, labels, advantages, mask, old_logprobs=old_logprobs,
                                cu_seqlens=cu_seqlens, config="gspo", backend=backend)
        return out.loss

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for seed in (43, 44, 45):
        p = _fresh(seed)
        hidden, labels, mask, old, cu = p["hidden"], p["labels"], p["mask"], p["old_logprobs"], None
        if layout == "packed":
            keep, cu, pick = _packed(p)
            hidden = pick(hidden.detach()).requires_grad_()
            labels, mask, old = pick(labels), pick(mask), pick(old)
        args = (hidden, p["weight"], labels, p["advantages"], mask, old, cu)
        loss = compiled(*args)
        g = grads(loss, [hidden, p["weight"]])
        loss_e = f(*args)
        g_e = grads(loss_e, [hidden, p["weight"]])
        assert_matches("loss", loss, loss_e, dtype=torch.float32, scale=1.0)
        for name, a, b in zip(("hidden", "weight"), g, g_e):
            assert_matches(f"grad_{name}", a, b, dtype=torch.float32)


@cuda_only
@pytest.mark.parametrize("normalizer", [None, 7.5, "cpu tensor", "device tensor"])
@pytest.mark.parametrize("config", ["dapo", "grpo"])
def test_no_stream_sync_with_the_checks_off(backend, monkeypatch, normalizer, config):
    """With the value checks off and no mask, a call waits for nothing on the GPU, forward and backward (PyTorch's
    sync debug mode fails on any stream or device sync, blocking copies included): the loss from hidden states
    (single pass and two-stage) and from logits, whatever the normaliser is; each equals the same call with the
    normaliser as a number."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    p = make_problem(3, 6, 32, 300, dtype=torch.float32, seed=47, bias=True)
    given = {"cpu tensor": torch.tensor(7.5), "device tensor": torch.tensor(7.5, device=DEVICE)}.get(normalizer,
                                                                                                       normalizer)
    as_number = 7.5 if isinstance(given, torch.Tensor) else given
    logits = (p["hidden"].detach() @ p["weight"].detach().T).requires_grad_()

    def calls(norm):
        kw = dict(old_logprobs=p["old_logprobs"], normalizer=norm, config=config)
        out = []
        for single_pass in (None, False):
            loss = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], bias=p["bias"],
                                     single_pass=single_pass, backend=backend, **kw).loss
            out += [loss, *grads(loss, leaves(p))]
        lp, ent = R.logprobs_from_logits(logits, p["labels"], return_entropy=True, backend=backend)
        loss = R.policy_loss(lp, ent, p["advantages"], **kw).loss
        return out + [loss, *grads(loss, [logits])]

    calls(given)  # warm-up: compilation and first allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = calls(given)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, calls(as_number)):
        torch.testing.assert_close(a, b)  # fp32 tolerances: a GPU's sums may take another order from call to call
