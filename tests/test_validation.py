"""Bad input gets a clear TypeError / ValueError naming the argument, before any compute."""
import math
import re

import pytest
import torch

import rlkernels as R
from rlkernels import PolicyLossConfig

from conftest import check_events, make_problem


@pytest.fixture
def p():
    return make_problem(2, 5, 8, 37, dtype=torch.float32, seed=71)


def call(p, **changes):
    args = dict(hidden=p["hidden"], weight=p["weight"], labels=p["labels"], advantages=p["advantages"],
                mask=p["mask"])
    kwargs = {k: v for k, v in changes.items() if k not in args}
    args.update({k: v for k, v in changes.items() if k in args})
    return R.fused_grpo_loss(args["hidden"], args["weight"], args["labels"], args["advantages"], args["mask"],
                             **kwargs)


CASES = [
    # (changes, exception, message fragment)
    (lambda p: dict(hidden=p["hidden"].detach().numpy()), TypeError, "hidden must be a torch.Tensor"),
    (lambda p: dict(hidden=p["hidden"][0, 0]), ValueError, "hidden has shape"),
    (lambda p: dict(hidden=p["hidden"].long()), TypeError, "hidden has dtype"),
    (lambda p: dict(weight=p["weight"].double()), TypeError, "weight has dtype"),
    (lambda p: dict(weight=p["weight"][:, :5]), ValueError, "weight.shape\\[1\\]"),
    (lambda p: dict(labels=p["labels"].float()), TypeError, "labels has dtype"),
    (lambda p: dict(labels=p["labels"][:, :3]), ValueError, "labels has shape"),
    (lambda p: dict(labels=torch.full_like(p["labels"], 37)), ValueError, "labels must lie in \\[0, V=37\\)"),
    (lambda p: dict(labels=torch.full_like(p["labels"], -1)), ValueError, "labels must lie in"),
    (lambda p: dict(mask=p["mask"][:, :2]), ValueError, "mask has shape"),
    (lambda p: dict(mask=p["mask"].float() * 0.5), ValueError, "mask must hold only 0/1"),
    (lambda p: dict(advantages=p["advantages"][:1]), ValueError, "advantages has shape"),
    (lambda p: dict(advantages=torch.full_like(p["advantages"], float("nan"))), ValueError, "advantages holds NaN"),
    (lambda p: dict(advantages=p["advantages"].long()), TypeError, "advantages has dtype"),
    (lambda p: dict(old_logprobs=p["old_logprobs"].bfloat16()), TypeError, "old_logprobs has dtype"),
    (lambda p: dict(old_logprobs=p["old_logprobs"][:, :2]), ValueError, "old_logprobs has shape"),
    (lambda p: dict(old_logprobs=torch.full_like(p["old_logprobs"], float("nan"))), ValueError,
     "old_logprobs holds NaN"),
    (lambda p: dict(ref_logprobs=torch.full_like(p["ref_logprobs"], float("inf"))), ValueError,
     "ref_logprobs holds NaN or inf"),
    (lambda p: dict(temperature=0.0), ValueError, "temperature=0.0: must be finite and > 0"),
    (lambda p: dict(temperature=-1.0), ValueError, "temperature"),
    (lambda p: dict(temperature="hot"), TypeError, "temperature must be a float"),
    (lambda p: dict(temperature=torch.zeros(2, 5)), ValueError, "temperature must be finite and > 0"),
    (lambda p: dict(temperature=torch.ones(3)), ValueError, "temperature has shape"),
    (lambda p: dict(config="grpo_plus"), ValueError, "not a preset"),
    (lambda p: dict(config=3), TypeError, "config must be a preset name"),
    (lambda p: dict(clip_hgh=0.3), TypeError, "unknown PolicyLossConfig field"),
    (lambda p: dict(kl_coef=0.1), ValueError, "kl_coef=0.1 > 0 needs ref_logprobs"),
    (lambda p: dict(rollout_correction="token_tis"), ValueError, "needs rollout_logprobs"),
    (lambda p: dict(rollout_correction="token_tis", rollout_logprobs=p["rollout_logprobs"],
                    is_weights=torch.ones(2, 5)), ValueError, "use one"),
    (lambda p: dict(cu_seqlens=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "cu_seqlens is for packed"),
    (lambda p: dict(normalizer=0.0), ValueError, "normalizer"),
    (lambda p: dict(normalizer="all"), TypeError, "normalizer must be a number"),
    (lambda p: dict(backend="cuda-magic"), ValueError, "not a backend"),
    (lambda p: dict(chunk_size=0), ValueError, "chunk_size"),
    (lambda p: dict(bias=torch.zeros(36)), ValueError, "bias has shape"),
    (lambda p: dict(hidden=p["hidden"].detach().masked_fill(p["mask"][..., None], float("nan"))), ValueError,
     "hidden holds NaN"),
    (lambda p: dict(weight=p["weight"].detach().clone().index_fill_(0, torch.tensor([3]), float("inf"))),
     ValueError, "weight holds NaN or inf"),
    # -inf: only the row minima see it (the maxima alone suffice where -inf is allowed: logits, bias)
    (lambda p: dict(weight=p["weight"].detach().clone().index_fill_(0, torch.tensor([5]), -float("inf"))),
     ValueError, "weight holds NaN or inf in 1 row"),
    (lambda p: dict(hidden=p["hidden"].detach().masked_fill(p["mask"][..., None], -float("inf"))), ValueError,
     "hidden holds NaN or inf"),
    (lambda p: dict(bias=torch.zeros(37).index_fill_(0, torch.tensor([2]), float("inf"))), ValueError,
     "bias holds NaN or \\+inf"),
    (lambda p: dict(single_pass=True, config="gspo", top_entropy_quantile=0.5), ValueError,
     "single_pass=True cannot apply: it needs an objective"),
    (lambda p: dict(single_pass=True, config="gspo", chunk_size=2), ValueError, "row chunks that hold whole sequences"),
    (lambda p: dict(normalizer=torch.tensor(0.0)), ValueError, "normalizer must be > 0"),
    (lambda p: dict(normalizer=torch.tensor(float("nan"))), ValueError, "normalizer must be > 0"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_inputs(p, case):
    make, exc, msg = CASES[case]
    with pytest.raises(exc, match=msg):
        call(p, **make(p))


def test_packed_cu_seqlens_checks(p):
    h = p["hidden"].reshape(-1, 8)
    y = p["labels"].reshape(-1)
    cases = [
        (torch.tensor([0, 4, 9]), "end at N=10"),
        (torch.tensor([1, 4, 10]), "start at 0"),
        (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
        (torch.tensor([[0, 10]]), "cu_seqlens has shape"),
        (torch.tensor([0.0, 10.0]), "cu_seqlens has dtype"),
    ]
    for cu, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            R.fused_grpo_loss(h, p["weight"], y, torch.zeros(len(cu) - 1 if cu.dim() == 1 else 1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="advantages has shape"):
        R.fused_grpo_loss(h, p["weight"], y, torch.zeros(3), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))


def test_device_mismatch_is_named(p):
    meta = torch.empty(37, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        R.fused_logprobs(p["hidden"], meta, p["labels"])


def test_unavailable_backend_explains_why(p, monkeypatch):
    """An engine that cannot load, and one that cannot run on this device, both fail with their reason."""
    from rlkernels import engines

    def broken():
        raise engines.BackendUnavailable("no compiler found (install g++)")

    monkeypatch.setitem(engines._LOADERS, "native", broken)
    monkeypatch.setattr(engines, "_CACHE", {})
    assert R.available_backends()["native"] == "no compiler found (install g++)"
    with pytest.raises(ValueError, match="backend='native' is not available: no compiler found"):
        R.fused_logprobs(p["hidden"], p["weight"], p["labels"], backend="native")
    # auto falls back to the torch engine without complaint
    R.fused_logprobs(p["hidden"], p["weight"], p["labels"])

    class CudaOnly(engines.TorchEngine):
        name = "triton"

        def supports(self, device):
            return None if device.type == "cuda" else "needs CUDA tensors"

    monkeypatch.setitem(engines._LOADERS, "triton", CudaOnly)
    monkeypatch.setattr(engines, "_CACHE", {})
    if p["hidden"].device.type != "cuda":
        assert R.available_backends(p["hidden"].device)["triton"] == "needs CUDA tensors"
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu: needs CUDA tensors"):
            R.fused_logprobs(p["hidden"], p["weight"], p["labels"], backend="triton")


def test_env_backend_is_checked(p, monkeypatch):
    monkeypatch.setenv("RLKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RLKERNELS_BACKEND='nonsense'"):
        R.fused_logprobs(p["hidden"], p["weight"], p["labels"])
    monkeypatch.setenv("RLKERNELS_BACKEND", "torch")
    R.fused_logprobs(p["hidden"], p["weight"], p["labels"])


def test_logits_checks():
    with pytest.raises(TypeError, match="logits has dtype"):
        R.logprobs_from_logits(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits holds NaN"):
        R.logprobs_from_logits(torch.full((3, 5), float("nan")), torch.zeros(3, dtype=torch.long))
    # +inf is refused in exactly its row; -inf (a banned token) is allowed
    z = torch.zeros(3, 5).index_put_((torch.tensor([1]), torch.tensor([4])), torch.tensor(float("inf")))
    with pytest.raises(ValueError, match=r"logits holds NaN or \+inf in 1 row"):
        R.logprobs_from_logits(z, torch.zeros(3, dtype=torch.long))
    logp = R.logprobs_from_logits(torch.zeros(3, 5).index_fill_(1, torch.tensor([4]), -float("inf")),
                                  torch.zeros(3, dtype=torch.long))
    assert torch.allclose(logp, torch.full((3,), -math.log(4.0)))
    with pytest.raises(ValueError, match="labels must lie in"):
        R.logprobs_from_logits(torch.zeros(3, 5), torch.full((3,), 5))


@pytest.mark.parametrize("field,value,msg", [
    ("policy_loss", "trpo", "policy_loss='trpo': must be one of"),
    ("ratio_level", "token-level", "ratio_level"),
    ("clip_low", -0.1, "clip_low=-0.1: must be >= 0"),
    ("clip_high", float("nan"), "clip_high=nan: must be a finite number"),
    ("dual_clip", 1.1, "dual_clip=1.1: must be > 1 \\+ clip_high"),
    ("log_ratio_clamp", 0.0, "log_ratio_clamp=0.0: must be > 0"),
    ("kl_coef", -1.0, "kl_coef"),
    ("kl_estimator", "k4", "kl_estimator"),
    ("kl_straight_through", 1, "kl_straight_through=1: must be a bool"),
    ("entropy_shaping_kappa", 1.0, "entropy_shaping_kappa=1.0: must be > 1"),
    ("top_entropy_quantile", 1.5, "top_entropy_quantile"),
    ("top_entropy_quantile", 0.0, "top_entropy_quantile"),
    ("loss_agg", "mean", "loss_agg"),
    ("loss_agg", "seq-mean-token-sum-norm", "norm_length=None: is required"),
    ("rollout_correction", "tis", "rollout_correction"),
    ("rollout_cap_low", 3.0, "rollout_cap_low=3.0: must be < rollout_cap_high"),
    ("sapo_tau_pos", 0.0, "sapo_tau_pos"),
    ("opsm_delta", "big", "opsm_delta"),
])
def test_config_validation(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        PolicyLossConfig(**{field: value})


def test_presets_and_overrides():
    assert PolicyLossConfig.from_preset("dapo").clip_high == 0.28
    cfg = PolicyLossConfig.from_preset("gspo", clip_high=1e-3)
    assert cfg.ratio_level == "sequence" and cfg.clip_high == 1e-3 and not cfg.token_separable
    assert PolicyLossConfig.from_preset("dr_grpo", norm_length=512).norm_length == 512
    with pytest.raises(TypeError, match="unknown PolicyLossConfig field"):
        PolicyLossConfig().replace(beta=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig.from_preset("ppo").replace(clip_high=2.5)
    with pytest.raises(Exception):  # frozen
        cfg.clip_high = 0.5
    for name in R.PRESETS:
        extra = dict(norm_length=100) if name == "dr_grpo" else {}
        assert isinstance(PolicyLossConfig.from_preset(name, **extra), PolicyLossConfig)


class _HostReads:
    """Counts the reads of tensor data back to Python (each a host sync on a GPU) made inside rlkernels. The value
    checks' ``read_back`` counts once ("read_back"): on a GPU it copies every value without blocking and waits once;
    the reads of those copies are not syncs."""
    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        import traceback

        import rlkernels._checks as C

        self.where = []
        inside = []
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                frames = [f for f in traceback.extract_stack()[:-1] if "/rlkernels/" in f.filename]
                if frames and t.numel() > 0 and not inside:
                    self.where.append(f"{_name} at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}")
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        read_back = C.read_back

        def counted_read_back(values):
            self.where.append("read_back")
            inside.append(1)
            try:
                return read_back(values)
            finally:
                inside.pop()

        monkeypatch.setattr(C, "read_back", counted_read_back)


@pytest.mark.parametrize("op", ["fused_grpo_loss", "fused_grpo_loss gspo", "fused_logprobs", "logprobs_from_logits",
                                "policy_loss"])
def test_value_checks_cost_one_host_sync(p, monkeypatch, op):
    """With every value check on, the checks of a call are read back together: one sync, plus the row gather's
    nonzero (its size is data) where padding is dropped, plus for a sequence-level ratio's single pass one read of
    the sequence lengths (its chunk bounds). They were one sync per checked input (7 for a fused_grpo_loss with a
    mask and old_logprobs)."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "1")
    old = torch.randn(p["labels"].shape) - 3
    logits = torch.randn(*p["labels"].shape, 37)
    logp = torch.randn(p["labels"].shape).clamp(max=0)
    reads = _HostReads(monkeypatch)
    if op.startswith("fused_grpo_loss"):
        R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], old_logprobs=old,
                          ref_logprobs=old, config=op.split()[-1] if " " in op else "dapo", kl_coef=0.01,
                          normalizer=torch.tensor(7.0), backend="torch")
    elif op == "fused_logprobs":
        R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], backend="torch")
    elif op == "logprobs_from_logits":
        R.logprobs_from_logits(logits, p["labels"], mask=p["mask"], backend="torch")
    else:
        R.policy_loss(logp, None, p["advantages"], p["mask"], old_logprobs=old)
    checks = [w for w in reads.where if w == "read_back"]
    bounds = [w for w in reads.where if "chunking.py" in w]
    assert len(checks) == 1 and len(bounds) == (1 if "gspo" in op else 0), reads.where
    assert len(reads.where) <= 2 + len(bounds) and all(w.startswith(("read_back", "tolist", "nonzero"))
                                                       for w in reads.where), reads.where


@pytest.mark.parametrize("op", ["fused_grpo_loss", "fused_grpo_loss gspo", "fused_logprobs", "logprobs_from_logits"])
def test_no_host_sync_without_checks_or_mask(p, monkeypatch, op):
    """With value checks off and no mask (a packed batch, or one without padding), a call reads nothing back to the
    host: no sync in the hot path (the kept-row gather's nonzero ran even without a mask, gathering every row). A
    sequence-level ratio's single pass cuts its chunks at sequence ends: on this padded batch they are T rows apart,
    known without a read; on a packed batch it reads the sequence lengths once."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "0")
    old = torch.randn(p["labels"].shape) - 3
    reads = _HostReads(monkeypatch)
    h, w, y = p["hidden"], p["weight"], p["labels"]
    if op.startswith("fused_grpo_loss"):
        out = R.fused_grpo_loss(h, w, y, p["advantages"], old_logprobs=old, config=op.split()[-1] if " " in op
                                else "dapo", backend="torch")
        out.loss.backward()
    elif op == "fused_logprobs":
        R.fused_logprobs(h, w, y, backend="torch").sum().backward()
    else:
        logits = torch.randn(*y.shape, w.shape[0], requires_grad=True)
        R.logprobs_from_logits(logits, y, backend="torch").sum().backward()
    assert reads.where == [], reads.where
    if "gspo" in op:  # packed: the lengths from the device, once
        H = h.shape[-1]
        cu = torch.tensor([0, 4, y.numel()], dtype=torch.int32)
        R.fused_grpo_loss(h.reshape(-1, H), w, y.reshape(-1), p["advantages"], old_logprobs=old.reshape(-1),
                          cu_seqlens=cu, config="gspo", backend="torch").loss.backward()
        assert len(reads.where) == 1 and "chunking.py" in reads.where[0], reads.where


def test_packed_layout_is_checked_in_one_read(p, monkeypatch):
    """cu_seqlens' checks (start, end, order) read back together, once, before the other checks' one read: two reads
    in all for a packed call with every value check on (they were four)."""
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "1")
    H = p["hidden"].shape[-1]
    h, y = p["hidden"].reshape(-1, H), p["labels"].reshape(-1)
    cu = torch.tensor([0, 3, 3, y.shape[0]], dtype=torch.int32)
    reads = _HostReads(monkeypatch)
    R.fused_grpo_loss(h, p["weight"], y, torch.randn(3), cu_seqlens=cu, config="dapo", backend="torch")
    assert reads.where == ["read_back", "read_back"], reads.where
    for bad, message in ((torch.tensor([1, 3, y.shape[0]]), "must start at 0 and end at N"),
                         (torch.tensor([0, 3, y.shape[0] - 1]), "must start at 0 and end at N"),
                         (torch.tensor([0, 5, 3, y.shape[0]]), "must be non-decreasing")):
        with pytest.raises(ValueError, match=message):
            R.fused_grpo_loss(h, p["weight"], y, torch.randn(bad.numel() - 1), cu_seqlens=bad, backend="torch")


def test_deferred_checks_raise_the_first_failure_in_order(p):
    """Several bad inputs at once: the error is the one the checks meet first (labels, then the per-token inputs
    such as advantages, then hidden), as when each check raised at once."""
    hidden = p["hidden"].clone()
    hidden[0, 0, 0] = float("nan")
    nan_adv = torch.full_like(p["advantages"], float("nan"))
    bad_labels = torch.full_like(p["labels"], 37)
    with pytest.raises(ValueError, match="labels must lie"):
        call(p, labels=bad_labels, hidden=hidden, advantages=nan_adv)
    with pytest.raises(ValueError, match="advantages holds NaN"):
        call(p, hidden=hidden, advantages=nan_adv)
    with pytest.raises(ValueError, match="hidden holds NaN"):
        call(p, hidden=hidden, mask=torch.ones_like(p["mask"]))
    # a queued check that failed wins over an error raised at once by a later check (type, shape, config)
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        call(p, mask=p["mask"].long() * 2, labels=p["labels"].float())
    with pytest.raises(ValueError, match="labels must lie"):
        call(p, labels=bad_labels, advantages=p["advantages"][:1])
    with pytest.raises(ValueError, match="labels must lie"):
        call(p, labels=bad_labels, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages holds NaN"):
        call(p, advantages=nan_adv, old_logprobs=torch.zeros(p["labels"].shape, dtype=torch.bfloat16))
    logits = torch.randn(*p["labels"].shape, 37)
    with pytest.raises(ValueError, match="labels must lie"):
        R.logprobs_from_logits(logits, bad_labels, backend="nope")
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        R.policy_loss(torch.zeros(p["labels"].shape), torch.zeros(p["labels"].shape)[:, :2], p["advantages"],
                      p["mask"].long() * 2)


def test_nested_deferred_checks_read_their_own():
    """An op called inside another's deferred checks still checks its inputs before it computes."""
    import rlkernels._checks as C

    with C.deferred_checks():
        C.fail_if(torch.tensor([False]), lambda: "never")
        with pytest.raises(ValueError, match="labels must lie"):  # raised by the inner call, before it returns
            R.logprobs_from_logits(torch.randn(4, 5), torch.tensor([0, 1, 2, 5]), backend="torch")


@pytest.mark.parametrize("copy_after", [False, True], ids=["copies-before", "copies-after"])
def test_checks_read_after_a_launch(monkeypatch, copy_after):
    """DeferredChecks.read_after_launch: the checks are not read on leaving the block but once ``launched`` has run
    its launch, which always runs; the first failed check raises then (also in place of an error the launch
    raised), a passing set returns the launch's result, and a block that asks for nothing reads on leaving. Their
    copies queued before the launch or (COPY_AFTER_LAUNCH) after it. (With value checks off, test_triton's
    test_logits_kernel_is_queued_before_the_checks_are_read.)"""
    import rlkernels._checks as C

    monkeypatch.setattr(C, "COPY_AFTER_LAUNCH", copy_after)

    ran = []

    def start(fail=False):
        ran.append(1)
        if fail:
            raise RuntimeError("launch failed")
        return "out"

    def checked(first_bad: bool, second_bad: bool, after: bool):
        with C.deferred_checks() as checks:
            C.fail_when((torch.tensor(first_bad),), bool, lambda: "first")
            C.fail_when((torch.tensor([second_bad, False]),), lambda v: v[0], lambda: "second")
            if after:
                checks.read_after_launch()
        return checks

    assert checked(False, False, True).launched(start) == "out" and ran == [1]
    for first, second, want in ((True, True, "first"), (False, True, "second")):
        checks = checked(first, second, True)  # leaving the block raised nothing
        with pytest.raises(ValueError, match=f"^{want}$"):
            checks.launched(start)
        with pytest.raises(ValueError, match=f"^{want}$") as info:
            checked(first, second, True).launched(lambda: start(fail=True))
        assert isinstance(info.value.__cause__, RuntimeError)
    assert ran == [1] * 5
    with pytest.raises(RuntimeError, match="launch failed"):
        checked(False, False, True).launched(lambda: start(fail=True))
    with pytest.raises(ValueError, match="^second$"):  # not asked: read on leaving, as before
        checked(False, True, False)


@pytest.mark.parametrize("copy_after", [False, True], ids=["copies-before", "copies-after"])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_policy_loss_queues_its_objective_before_reading_its_checks_on_a_gpu(p, monkeypatch, on_gpu, copy_after):
    """On a GPU (here: CPU tensors said to run asynchronously), policy_loss queues its checks' copies, then its
    objective (torch ops, in bounds for any values), and only then waits for the checks: where logp comes from a
    kernel still running, the host no longer waits for it before queuing the objective. Bad input still raises the
    same error before anything is returned. Elsewhere the checks are read first, as before. With
    COPY_AFTER_LAUNCH the copies are queued after the objective."""
    import rlkernels._checks as C
    import rlkernels.ops as O

    monkeypatch.setattr(C, "COPY_AFTER_LAUNCH", copy_after)
    queued = ["objective", "copy", "wait"] if copy_after else ["copy", "objective", "wait"]
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "1")
    monkeypatch.setattr(C, "runs_async", lambda t: on_gpu)
    events = check_events(monkeypatch)
    flat = O.policy_loss_flat
    monkeypatch.setattr(O, "policy_loss_flat", lambda *a: (events.append("objective"), flat(*a))[1])
    logp = (torch.randn(p["labels"].shape) - 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(logp.shape)
    out = R.policy_loss(logp, None, p["advantages"], p["mask"], old_logprobs=old, config="dapo")
    assert events == (queued if on_gpu else ["sync", "objective"]), events
    monkeypatch.setattr(C, "runs_async", lambda t: False)
    want = R.policy_loss(logp, None, p["advantages"], p["mask"], old_logprobs=old, config="dapo")
    assert torch.equal(out.loss, want.loss)
    monkeypatch.setattr(C, "runs_async", lambda t: on_gpu)
    events.clear()
    with pytest.raises(ValueError, match="old_logprobs holds NaN"):
        R.policy_loss(logp, None, p["advantages"], p["mask"], old_logprobs=torch.full_like(old, float("nan")))
    assert events == (queued if on_gpu else ["sync"]), events


@pytest.fixture
def dtensor():
    """A function making a DTensor of a tensor (sharded on dim 0 over a one-process gloo group, as FSDP2 leaves a
    parameter), the group torn down after the test."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of this process's own")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    yield lambda t: distribute_tensor(t.detach(), mesh, [Shard(0)]).requires_grad_(t.requires_grad)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["hidden", "weight", "bias", "labels", "mask", "advantages", "old_logprobs"])
def test_a_dtensor_is_refused_with_what_to_pass(p, dtensor, name):
    """A DTensor (FSDP2's parameter outside its module's forward) gets a TypeError naming the argument and saying
    what to pass, where it failed inside with a message about .tolist()."""
    given = dict(bias=torch.zeros(37, requires_grad=True), old_logprobs=p["old_logprobs"].float())
    given[name] = dtensor(given.get(name, p[name]))
    with pytest.raises(TypeError, match=f"{name} is a DTensor .*{name}.full_tensor\\(\\).*{name}.to_local\\(\\)"):
        call(p, config="dapo", backend="torch", **given)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_zero3_partitioned_parameter_is_refused_with_what_to_do(p, name):
    """A DeepSpeed ZeRO-3 parameter outside its module's forward is an empty tensor (its data partitioned across
    ranks): a ValueError naming the argument, its whole shape and where to call, not a complaint about a 1-D weight
    or a bias of the wrong length."""
    whole = p[name] if name == "weight" else torch.zeros(37)
    empty = torch.nn.Parameter(torch.empty(0, dtype=whole.dtype))
    empty.ds_id, empty.ds_shape = 7, whole.shape  # what deepspeed.zero.Init sets on a partitioned parameter
    given = dict(bias=torch.zeros(37, dtype=whole.dtype, requires_grad=True))
    given[name] = empty
    shape = re.escape(str(tuple(whole.shape)))
    with pytest.raises(ValueError, match=rf"{name} is a DeepSpeed ZeRO-3 parameter .*shape \(0,\).*whole shape is "
                                         rf"{shape}.*GatheredParameters"):
        call(p, config="dapo", backend="torch", **given)


def test_numpy_scalars_are_taken_as_the_numbers_they_are(p):
    """NumPy scalars (np.float32 is not a float, np.int64 not an int) are taken for hyperparameters, temperature,
    softcap and normalizer, as the Python numbers they equal: the same loss as with those; the config stores them
    as Python numbers. A NumPy bool is still no bool flag."""
    np = pytest.importorskip("numpy")
    cfg = PolicyLossConfig(clip_high=np.float32(0.25), norm_length=np.int64(7), kl_coef=np.float64(0.05),
                           loss_agg="seq-mean-token-sum-norm")
    assert (type(cfg.clip_high), type(cfg.norm_length), type(cfg.kl_coef)) == (float, int, float)
    assert cfg == PolicyLossConfig(clip_high=float(np.float32(0.25)), norm_length=7, kl_coef=0.05,
                                   loss_agg="seq-mean-token-sum-norm")
    common = dict(config=cfg, ref_logprobs=p["ref_logprobs"], backend="torch")
    numpy_kw = dict(temperature=np.float32(0.75), softcap=np.float32(2.5), normalizer=np.int64(9))
    plain_kw = dict(temperature=0.75, softcap=2.5, normalizer=9)
    out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], **common, **numpy_kw)
    want = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], **common, **plain_kw)
    assert torch.equal(out.loss, want.loss)
    with pytest.raises(ValueError, match="kl_straight_through=.*must be a bool"):
        PolicyLossConfig(kl_straight_through=np.bool_(True))


@pytest.mark.parametrize("op", ["fused_grpo_loss", "fused_logprobs", "logprobs_from_logits"])
def test_kept_rows_are_counted_before_the_checks_reductions(p, monkeypatch, op):
    """A masked call that gathers its kept rows reads their count back (the gather's nonzero: a host sync that waits
    for every kernel queued before it) before it queues its value checks' reductions (the labels' range, the hidden
    states' and the weight's NaN scans, or the logits'): the sync then waits for none of them, and the GPU runs them
    while the host prepares the rest of the call."""
    import rlkernels._inputs as I

    order = []
    for name in ("kept_index", "check_labels", "check_finite_rows"):
        real = getattr(I, name)
        monkeypatch.setattr(I, name, lambda *a, _real=real, _name=name, **k: (order.append(_name), _real(*a, **k))[1])
    monkeypatch.setenv("RLKERNELS_CHECK_VALUES", "1")
    if op == "fused_grpo_loss":
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"], config="dapo",
                                backend="torch").loss
    elif op == "fused_logprobs":
        out = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], mask=p["mask"], backend="torch")
    else:
        logits = torch.randn(*p["labels"].shape, p["weight"].shape[0])
        out = R.logprobs_from_logits(logits, p["labels"], mask=p["mask"], backend="torch")
    assert order[0] == "kept_index" and order.count("kept_index") == 1, order
    assert {"check_labels", "check_finite_rows"} <= set(order[1:]), order
    assert torch.isfinite(out).all()
