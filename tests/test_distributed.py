"""Scale-out on torch.distributed (gloo, 2 processes spawned here): a vocab-sharded LM head gives the single-process
results, the global normaliser makes data parallelism exact, and bad inputs on one rank fail every rank promptly."""
import os
import socket
import sys
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlkernels as R
from rlkernels.distributed import global_normalizer

from conftest import BACKENDS, pack

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, *args, backend="torch"):
    port = _free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(rank, port, errors, fn, args, backend)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise AssertionError("a rank hung")
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), f"a rank exited with {[p.exitcode for p in procs]}"


def _entry(rank, port, errors, fn, args, backend="torch"):
    torch.set_num_threads(1)
    os.environ["RLKERNELS_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        fn(rank, *args)
    except BaseException:  # (pytest.raises' "DID NOT RAISE" too) to the parent, which fails with the rank's traceback
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's worker thread frees a finished collective's work (and with it
    # the last C++ references to its Python tensors, which takes the GIL) a moment after the waiter returns, and
    # during Py_Finalize that thread is made to exit inside a noexcept destructor: std::terminate, SIGABRT, for about
    # 1 in 5 runs of the vocab-blocked test on the native engine (a core dump: ~AsyncAllreduceWork in
    # ProcessGroupGloo::runLoop, the main thread in Py_FinalizeEx). A barrier first only moves the release into the
    # barrier's work. The errors were put on the queue above (SimpleQueue writes at once).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _problem(seed=0, B=3, T=7, H=8, V=38):
    g = torch.Generator().manual_seed(seed)
    p = dict(hidden=torch.randn(B, T, H, generator=g, dtype=torch.float64),
             weight=torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5,
             bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.3,
             labels=torch.randint(0, V, (B, T), generator=g),
             mask=torch.rand(B, T, generator=g) > 0.25,
             advantages=torch.randn(B, generator=g, dtype=torch.float64))
    with torch.no_grad():
        lp = torch.log_softmax(p["hidden"] @ p["weight"].T + p["bias"], -1).gather(-1, p["labels"][..., None])[..., 0]
    p["old"] = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    p["ref"] = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return p


def _close(name, a, b, tol=1e-10):
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * max(1.0, float(b.abs().max()) if b.numel() else 1.0), f"{name}: max error {err}"


def _shard(p, rank):
    """This rank's rows of the LM head, and fresh leaves (hidden, weight, bias) for the full and the sharded head."""
    V = p["weight"].shape[0]
    rows = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
    leaves_full = [p["hidden"].clone().requires_grad_(), p["weight"].clone().requires_grad_(),
                   p["bias"].clone().requires_grad_()]
    leaves_tp = [p["hidden"].clone().requires_grad_(), p["weight"][rows].clone().requires_grad_(),
                 p["bias"][rows].clone().requires_grad_()]
    return rows, leaves_full, leaves_tp


def _tp_worker(rank, config, kw):
    p = _problem()
    rows, leaves_full, leaves_tp = _shard(p, rank)
    group = dist.group.WORLD

    # per-token log-probs and entropies
    cap = kw.get("softcap")
    full = R.fused_logprobs(leaves_full[0], leaves_full[1], p["labels"], bias=leaves_full[2], return_entropy=True,
                            temperature=0.8, chunk_size=4, softcap=cap)
    tp = R.fused_logprobs(leaves_tp[0], leaves_tp[1], p["labels"], bias=leaves_tp[2], return_entropy=True,
                          temperature=0.8, chunk_size=4, tp_group=group, softcap=cap)
    _close("logp", tp[0], full[0])
    _close("entropy", tp[1], full[1])

    # the loss and its gradients: full hidden gradient, this rank's shard of the weight and bias gradients
    _tp_loss(rank, p, config, kw, rows, leaves_full, leaves_tp, dict(single_pass=False), fused=False)
    _tp_loss(rank, p, config, kw, rows, leaves_full, leaves_tp, dict(single_pass=None), fused=True)
    # the single pass over several row chunks (for gspo, chunks of whole sequences, at most 9 rows)
    _tp_loss(rank, p, config, kw, rows, leaves_full, leaves_tp, dict(chunk_size=4 if config == "dapo" else 9),
             fused=True, chunks=2)


def _tp_loss(rank, p, config, kw, rows, leaves_full, leaves_tp, call_kw, fused, chunks=1, blocked=False):
    """The TP loss against the single-process one; with ``fused``, the single pass ran once per call over ``chunks``
    row chunks (at least), its vocabulary ``blocked`` or not."""
    from rlkernels import distributed

    calls = []
    original = distributed._TPFusedEngine.linear_fused
    distributed._TPFusedEngine.linear_fused = (  # a[5]: the plan
        lambda self, *a, **k: calls.append(a[5]) or original(self, *a, **k))
    try:
        group = dist.group.WORLD
        args = (p["labels"], p["advantages"], p["mask"])
        common = dict(old_logprobs=p["old"], ref_logprobs=p["ref"], config=config, temperature=0.8, **kw)
        a = R.fused_grpo_loss(leaves_full[0], leaves_full[1], *args, bias=leaves_full[2], **common)
        b = R.fused_grpo_loss(leaves_tp[0], leaves_tp[1], *args, bias=leaves_tp[2], tp_group=group, **common,
                              **call_kw)
        assert len(calls) == int(fused), (call_kw, calls)
        for plan in calls:
            assert len(plan.ranges(leaves_tp[0][p["mask"]].shape[0])) >= chunks and plan.vocab_blocked == blocked, \
                (call_kw, plan)
        _close("loss", b.loss, a.loss)
        for k in a.metrics:
            _close(k, b.metrics[k].double(), a.metrics[k].double(), tol=1e-6)
        ga = torch.autograd.grad(a.loss, leaves_full)
        gb = torch.autograd.grad(b.loss, leaves_tp)
        _close("grad_hidden", gb[0], ga[0])
        _close("grad_weight shard", gb[1], ga[1][rows])
        _close("grad_bias shard", gb[2], ga[2][rows])

        # reduce_hidden_grad=False leaves the partial sums; their sum over ranks is the full gradient
        c = R.fused_grpo_loss(leaves_tp[0], leaves_tp[1], *args, bias=leaves_tp[2], tp_group=group,
                              reduce_hidden_grad=False, **common, **call_kw)
        (partial,) = torch.autograd.grad(c.loss, [leaves_tp[0]])
        dist.all_reduce(partial)
        _close("grad_hidden from partial sums", partial, ga[0])
    finally:
        distributed._TPFusedEngine.linear_fused = original


@pytest.mark.parametrize("config,kw", [
    ("dapo", dict(kl_coef=0.05, entropy_coef=0.01)),
    ("gspo", dict(kl_coef=0.05, entropy_coef=0.01, clip_low=0.02, clip_high=0.02)),
    ("dapo", dict(kl_coef=0.05, entropy_coef=0.01, softcap=0.7)),  # each shard caps its logits (Gemma)
])
def test_tensor_parallel_matches_single_process(backend, config, kw):
    """fused_logprobs, and fused_grpo_loss on the two-stage path and in the single pass (one chunk, several)."""
    _launch(_tp_worker, config, kw, backend=backend)


def _tp_blocked_worker(rank):
    """The single pass with the shard's vocabulary blocked too (300 rows per rank, 256-entry blocks)."""
    p = _problem(seed=5, V=600)
    rows, leaves_full, leaves_tp = _shard(p, rank)
    os.environ["RLKERNELS_MEMORY_BUDGET_MB"] = str(16 * 256 * 4 / 2**20)  # 16 rows x 256 entries
    _tp_loss(rank, p, "dapo", dict(kl_coef=0.05, entropy_coef=0.01), rows, leaves_full, leaves_tp,
             dict(chunk_size=16), fused=True, blocked=True)


def test_tensor_parallel_single_pass_vocab_blocked(backend):
    _launch(_tp_blocked_worker, backend=backend)


def _dp_worker(rank, loss_agg):
    """Ranks hold unequal token counts and two micro-batches each; after DDP-style averaging the gradient equals the
    single-process gradient of the whole batch."""
    p = _problem(seed=3, B=6, T=9)
    p["mask"][0, 2:] = False  # a short sequence ...
    p["mask"][4] = False  # ... and an empty one
    cfg = dict(config="dapo", loss_agg=loss_agg, old_logprobs=p["old"])
    full_w = p["weight"].clone().requires_grad_()
    full = R.fused_grpo_loss(p["hidden"], full_w, p["labels"], p["advantages"], p["mask"], **cfg)
    (g_full,) = torch.autograd.grad(full.loss, [full_w])

    mine = [0, 1, 2, 3] if rank == 0 else [4, 5]  # unequal shares
    micro = [mine[: len(mine) // 2], mine[len(mine) // 2:]]
    norm = global_normalizer([p["mask"][m] for m in micro], mode=loss_agg)
    w = p["weight"].clone().requires_grad_()
    for m in micro:  # gradient accumulation: micro-batch gradients are summed
        out = R.fused_grpo_loss(p["hidden"][m], w, p["labels"][m], p["advantages"][m], p["mask"][m],
                                normalizer=norm, **dict(cfg, old_logprobs=p["old"][m]))
        out.loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= WORLD  # what DDP does
    _close(f"{loss_agg} gradient", w.grad, g_full)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_data_parallel_global_normalizer(loss_agg):
    _launch(_dp_worker, loss_agg, backend=BACKENDS[0])


def _bad_rank_worker(rank, kind):
    p = _problem()
    V = p["weight"].shape[0]
    if kind == "labels":
        weight = p["weight"][rank * V // 2:(rank + 1) * V // 2]
        labels = p["labels"] if rank == 0 else torch.full_like(p["labels"], V)  # out of range on rank 1 only
        expected = (RuntimeError, "rank 1 of the process group rejected") if rank == 0 else (ValueError, "labels")
    elif kind == "plan":  # the ranks plan different row chunks: the single pass (a gradient asked for) would merge
        # different chunks
        with pytest.raises(ValueError, match="disagree on row chunks"):
            R.fused_grpo_loss(p["hidden"].requires_grad_(), p["weight"][rank * V // 2:(rank + 1) * V // 2],
                              p["labels"], p["advantages"], p["mask"], old_logprobs=p["old"], config="dapo",
                              chunk_size=4 * (rank + 1), tp_group=dist.group.WORLD)
        return
    elif kind == "sequences":  # gspo's sequence-aligned chunks differ: the ranks were given different cu_seqlens
        g = torch.Generator().manual_seed(3)
        h, lab = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randint(0, V, (12,), generator=g)
        cu = torch.tensor([0, 6, 12]) if rank == 0 else torch.tensor([0, 4, 8, 12])
        with pytest.raises(ValueError, match="disagree on chunk ends"):
            R.fused_grpo_loss(h.requires_grad_(), p["weight"][rank * V // 2:(rank + 1) * V // 2], lab,
                              torch.randn(12, generator=g, dtype=torch.float64), cu_seqlens=cu, config="gspo",
                              chunk_size=8, tp_group=dist.group.WORLD)
        return
    elif kind == "normalizer":  # rank 1 gives two packed masks but one cu_seqlens
        masks = [torch.ones(5, dtype=torch.bool)] * (1 if rank == 0 else 2)
        expected = (RuntimeError, "rank 1 of the process group rejected") if rank == 0 else (ValueError, "cu_seqlens")
        with pytest.raises(expected[0], match=expected[1]):
            global_normalizer(masks, mode="seq-mean-token-mean", cu_seqlens=[torch.tensor([0, 2, 5])])
        return
    else:
        weight = p["weight"][:20] if rank == 0 else p["weight"][20:]  # 20 and 18 rows
        labels = p["labels"]
        expected = (ValueError, "shards of \\[20, 18\\] rows")
    with pytest.raises(expected[0], match=expected[1]):
        R.fused_logprobs(p["hidden"], weight, labels, tp_group=dist.group.WORLD)


@pytest.mark.parametrize("kind", ["labels", "shards", "plan", "sequences", "normalizer"])
def test_bad_rank_fails_everywhere_without_hanging(kind):
    _launch(_bad_rank_worker, kind, backend=BACKENDS[0])


def test_global_normalizer_single_process():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert global_normalizer(mask) == 2.0
    assert global_normalizer([mask, mask], mode="seq-mean-token-mean") == 4.0
    assert global_normalizer(torch.ones(5, dtype=torch.bool), mode="grpo",
                             cu_seqlens=torch.tensor([0, 2, 5])) == 2.0
    with pytest.raises(ValueError, match="cu_seqlens"):
        global_normalizer(torch.ones(5, dtype=torch.bool), mode="seq-mean-token-mean")


@pytest.mark.parametrize("masks,cu,match", [
    ([torch.ones(5, dtype=torch.bool)] * 2, [torch.tensor([0, 2, 5])], "got 1 for 2 mask"),  # part of the step
    ([torch.ones(5, dtype=torch.bool)], torch.tensor([0, 2, 4]), "end at N=5"),
    ([torch.ones(2, 3, dtype=torch.bool)], torch.tensor([0, 6]), "packed"),
    ([torch.ones(5, dtype=torch.bool)], torch.tensor([[0, 5]]), "cu_seqlens 0 has shape"),
    ([torch.ones(2, 2, 2, dtype=torch.bool)], None, "mask 0 has shape"),
    ([torch.ones(5, dtype=torch.bool)], torch.tensor([0, 3, 2, 5]), "non-decreasing"),
])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_global_normalizer_rejects_what_does_not_pair_up(masks, cu, match, mode):
    """A cu_seqlens list shorter than the masks once counted only the paired masks; every mismatch now raises."""
    with pytest.raises(ValueError, match=match):
        global_normalizer(masks, mode=mode, cu_seqlens=cu)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_global_normalizer_rejects_wrong_types(mode):
    with pytest.raises(TypeError, match="mask 1 must be a torch.Tensor"):
        global_normalizer([torch.ones(3), [1, 1]], mode=mode)
    with pytest.raises(TypeError, match="cu_seqlens 0 must be a torch.Tensor"):
        global_normalizer(torch.ones(5, dtype=torch.bool), mode=mode, cu_seqlens=[0, 2, 5])
    with pytest.raises(TypeError, match="float32"):
        global_normalizer(torch.ones(5, dtype=torch.bool), mode=mode, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor or a list"):
        global_normalizer(None, mode=mode)
    with pytest.raises(ValueError, match="not a preset"):
        global_normalizer(torch.ones(5, dtype=torch.bool), mode="nope")


def test_readme_scale_out_example_runs():
    """The README's `torchrun --nproc_per_node 2 examples/scale_out.py` runs and reports matching gradients."""
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "scale_out.py")
    # --standalone: a free rendezvous port, not the fixed 29500 that another run may still hold
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    diffs = [float(x) for x in re.findall(r"difference(?: to the full-batch gradient)? ([0-9.e+-]+)", run.stdout)]
    assert len(diffs) == 4 and max(diffs) < 1e-5, run.stdout


def _compile_worker(rank):
    """Under torch.compile(fullgraph=True) a vocab-sharded call takes the custom ops (their merges are eager
    collectives inside them): rlkernels::tp_linear_logprobs for the log-probs, and for the loss the single pass
    (rlkernels::linear_fused_loss with the group; 3 GEMMs, each row chunk's statistics merged across the ranks) or,
    with single_pass=False, the two-stage path: the same values and gradients as the single-process eager call."""
    from rlkernels import distributed

    p = _problem(seed=5, V=1200)  # 600 rows per rank: a shard that 256-entry vocabulary blocks divide
    rows, leaves_full, leaves_tp = _shard(p, rank)
    group = dist.group.WORLD
    B, T = p["mask"].shape
    keep, cu, pick = pack(B, T, [5, 7, 3])
    kept = keep.nonzero()[:, 0]  # the hidden states' kept rows, by an index fixed outside the compiled function
    packed = dict(labels=pick(p["labels"]), advantages=p["advantages"], mask=None, cu_seqlens=cu,
                  old_logprobs=pick(p["old"]), ref_logprobs=pick(p["ref"]))
    padded = dict(labels=p["labels"], advantages=p["advantages"], mask=p["mask"], old_logprobs=p["old"],
                  ref_logprobs=p["ref"])
    plans, seen = [], []
    original = distributed._TPFusedEngine.linear_fused
    distributed._TPFusedEngine.linear_fused = (  # a[5]: the plan
        lambda self, *a, **k: plans.append(a[5]) or original(self, *a, **k))

    def recording(gm, _inputs):  # the ops of the traced graph, then aot_eager's autograd over it
        seen.extend(str(node.target) for node in gm.graph.nodes)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, _inputs)

    # (config, batch, single_pass, chunk_size, the single pass's vocabulary blocked): dapo's single pass over row
    # chunks; gspo's over whole sequences, of at most 9 rows or, with chunks of 4 rows, over vocabulary blocks
    # (T = 7); a packed gspo batch (the op that reads its lengths); and the two-stage path when asked
    # (the last two: grad_hidden left as each rank's partial sum, reduce_hidden_grad=False)
    cases = [("dapo", padded, None, 4, False), ("dapo", padded, True, 4, False), ("gspo", padded, None, 9, False),
             ("gspo", padded, None, 4, True), ("gspo", packed, None, 9, False), ("dapo", padded, False, 4, None),
             ("gspo", packed, False, 4, None), ("dapo", padded, None, 4, False), ("dapo", padded, False, 4, None)]
    try:
        for i, (config, data, single_pass, chunk_size, blocked) in enumerate(cases):
            reduce = i < len(cases) - 2
            what = (f"{config} {'packed' if data is packed else 'padded'} single_pass={single_pass} chunks "
                    f"{chunk_size} reduce_hidden_grad={reduce}")
            common = dict(kl_coef=0.05, config=config, temperature=0.8, chunk_size=chunk_size, softcap=2.0,
                          reduce_hidden_grad=reduce, **data)
            n = T * B if data is padded else int(cu[-1])

            def loss(h, w, b, tp=None, **kw):
                h = h if data is padded else h.reshape(B * T, -1)[kept]
                out = R.fused_grpo_loss(h, w, bias=b, tp_group=tp, **common, **kw)
                return out.loss, out.metrics

            torch._dynamo.reset()
            plans.clear()
            seen.clear()
            b, metrics = torch.compile(loss, fullgraph=True, backend=recording)(*leaves_tp, group,
                                                                                single_pass=single_pass)
            op = "rlkernels.linear_fused_loss" + ("_read_lengths" if data is packed else "") + ".default"
            if blocked is None:
                assert not plans and op not in seen and "rlkernels.tp_linear_logprobs.default" in seen, (what, seen)
            else:
                assert len(plans) == 1 and op in seen, (what, plans, seen)
                assert plans[0].vocab_blocked == blocked and len(plans[0].ranges(n)) >= 2, (what, plans[0])
            a, metrics_a = loss(*leaves_full)
            _close(f"{what}: loss", b, a)
            for k in metrics_a:
                _close(f"{what}: {k}", metrics[k].double(), metrics_a[k].double(), tol=1e-6)
            ga = torch.autograd.grad(a, leaves_full)
            gb = torch.autograd.grad(b, leaves_tp)
            if not reduce:  # this rank's partial sum: the ranks' sum is the full gradient
                dist.all_reduce(gb[0], group=group)
            _close(f"{what}: grad_hidden", gb[0], ga[0])
            _close(f"{what}: grad_weight shard", gb[1], ga[1][rows])
            _close(f"{what}: grad_bias shard", gb[2], ga[2][rows])
    finally:
        distributed._TPFusedEngine.linear_fused = original

    def logprobs(h, w, b, tp=None):
        return R.fused_logprobs(h, w, p["labels"], bias=b, mask=p["mask"], return_entropy=True, temperature=0.8,
                                chunk_size=4, tp_group=tp)

    seen.clear()
    torch._dynamo.reset()
    tp = torch.compile(logprobs, fullgraph=True, backend=recording)(*leaves_tp, group)
    assert "rlkernels.tp_linear_logprobs.default" in seen, seen
    full = logprobs(*leaves_full)
    _close("logp", tp[0], full[0])
    _close("entropy", tp[1], full[1])
    ga = torch.autograd.grad((full[0] + 0.5 * full[1]).sum(), leaves_full)
    gb = torch.autograd.grad((tp[0] + 0.5 * tp[1]).sum(), leaves_tp)
    _close("logprobs grad_hidden", gb[0], ga[0])
    _close("logprobs grad_weight shard", gb[1], ga[1][rows])


def test_tensor_parallel_under_compile(backend):
    """A vocab-sharded LM head under torch.compile(fullgraph=True), on every rank: loss, metrics, log-probs and
    gradients equal the single-process eager call's (dapo and gspo, padded and packed, the single pass and the
    two-stage path, a final-logit cap, a mask)."""
    _launch(_compile_worker, backend=backend)


def _uneven_compile_worker(rank, check_values):
    """Shards of 20 and 18 rows under torch.compile, where the traced call compares nothing: the custom ops check the
    sizes in their first merge and every rank raises, on the single pass and on the two-stage path, then the group
    still works (no rank left in a collective). With the value checks off the check and its read are skipped."""
    os.environ["RLKERNELS_CHECK_VALUES"] = "1" if check_values else "0"
    p = _problem(seed=2)
    weight = p["weight"][:20] if rank == 0 else p["weight"][20:]
    bias = p["bias"][:20] if rank == 0 else p["bias"][20:]
    group = dist.group.WORLD

    def logprobs(h, w, b):
        return R.fused_logprobs(h, w, p["labels"], bias=b, mask=p["mask"], chunk_size=8, tp_group=group)[0].sum()

    def loss(h, w, b, single_pass):
        return R.fused_grpo_loss(h, w, p["labels"], p["advantages"], bias=b, mask=p["mask"], config="dapo",
                                 old_logprobs=p["old"], chunk_size=8, single_pass=single_pass, tp_group=group).loss

    calls = [("logprobs", logprobs, ()), ("single pass", loss, (None,)), ("two-stage", loss, (False,))]
    for what, fn, extra in calls:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        h, w, b = (x.clone().requires_grad_() for x in (p["hidden"], weight, bias))
        if check_values:
            with pytest.raises(ValueError, match="shards of 18 to 20 rows"):
                compiled(h, w, b, *extra)
        else:
            assert torch.isfinite(compiled(h, w, b, *extra)), what
        flag = torch.ones(1)
        dist.all_reduce(flag, group=group)
        assert flag.item() == WORLD, what


@pytest.mark.parametrize("check_values", [True, False])
def test_uneven_shards_under_compile_fail_everywhere(check_values):
    _launch(_uneven_compile_worker, check_values, backend=BACKENDS[0])
