"""The implementations the benchmark compares, behind one small interface.

A :class:`Provider` says whether it can run a :class:`~rlkernels.bench.workloads.Case` (and if not, why), and builds a
:class:`Runner` for given inputs: ``forward()`` returns a state, ``backward(state)`` runs the gradient, and
``result(state)`` gives the tensors the correctness check compares (loss, outputs, gradients).

Providers: ``eager`` (the executable spec :mod:`rlkernels.reference`, logits materialised), ``compile``
(``torch.compile`` of the same functions), ``rlkernels-<engine>`` for every engine :func:`rlkernels.available_backends`
knows (unavailable ones are skipped with the engine's own reason), ``liger`` (Liger-Kernel's
``LigerFusedLinearGRPOLoss``), ``cce`` (Cut Cross-Entropy's log-probs under the eager objective), ``trl`` (TRL's own
kernels: its fused LM head's log-probs under the eager objective, its logits kernel) and ``gemm-roofline`` (the bare
matmuls of the op). Others can be added with :func:`register_provider`, e.g. from a module named by
``rlkernels-bench --plugin``.

Nothing heavy is imported here: ``liger_kernel``, ``cut_cross_entropy`` and ``trl`` load inside their providers'
``build``.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .. import engines
from ..engines import BACKENDS, available_backends
from .workloads import LINEAR_OPS, OBJECTIVE_OPS, Case, leaves, scalar

Outputs = Dict[str, Tensor]


class Runner:
    """One provider bound to one set of inputs."""

    has_backward = True

    def forward(self) -> Any:
        raise NotImplementedError

    def backward(self, state: Any) -> None:
        raise NotImplementedError

    def result(self, state: Any) -> Outputs:
        """Loss, outputs and gradients of the last call (empty when there is nothing to check)."""
        return {}

    def zero_grad(self) -> None:
        """Drop gradients, so that the next backward creates them afresh."""


class AutogradRunner(Runner):
    """A forward function returning a dict of outputs; the backward is autograd on the case's scalar."""

    def __init__(self, case: Case, inputs: Dict[str, Any], fn: Callable[[], Outputs]):
        self.case, self.inputs, self.fn = case, inputs, fn
        self.leaves = leaves(inputs)
        self.has_backward = bool(self.leaves)

    def forward(self) -> Tuple[Optional[Tensor], Outputs]:
        out = self.fn()
        return scalar(self.case, out, self.inputs), out

    def backward(self, state) -> None:
        state[0].backward()

    def result(self, state) -> Outputs:
        loss, out = state
        res = {k: v for k, v in out.items()}
        if loss is not None:
            res["loss"] = loss
        for name, leaf in self.leaves.items():
            if leaf.grad is not None:
                res[f"grad_{name}"] = leaf.grad
        return res

    def zero_grad(self) -> None:
        for leaf in self.leaves.values():
            leaf.grad = None


class Provider:
    """Base class. ``name`` is what ``--provider`` takes; ``checked=False`` providers skip the correctness check
    (they compute no loss)."""

    name = "abstract"
    description = ""
    checked = True

    def unavailable(self, case: Case) -> Optional[str]:
        """None when this provider can run ``case``, else the reason it cannot (cheap: imports nothing heavy)."""
        return None

    def build(self, case: Case, inputs: Dict[str, Any]) -> Callable[[], Outputs]:
        """The forward function: no arguments, returns the op's outputs (``loss`` / ``logp``+``entropy`` / ...)."""
        raise NotImplementedError

    def runner(self, case: Case, inputs: Dict[str, Any]) -> Runner:
        return AutogradRunner(case, inputs, self.build(case, inputs))


def _grpo_kwargs(inputs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: inputs[k] for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs") if k in inputs}


def _policy_args(inputs: Dict[str, Any]):
    """The policy op's positional arguments (logp, entropy, advantages, mask) and keyword inputs."""
    return (inputs["logp"], inputs["entropy"], inputs["advantages"], inputs["mask"]), _grpo_kwargs(inputs)


# ------------------------------------------------------------------------------------------------------------------
# eager and compile: the reference module, as it is or compiled
# ------------------------------------------------------------------------------------------------------------------
class EagerProvider(Provider):
    name = "eager"
    description = "rlkernels.reference (the executable spec): logits materialised, plain PyTorch"

    def _functions(self) -> Dict[str, Callable]:
        return {"grpo": reference.linear_policy_loss, "logprobs": reference.linear_logprobs,
                "logits": reference.logprobs_from_logits, "advantages": reference.group_advantages,
                "policy": reference.policy_loss}

    def build(self, case, inputs):
        fns = self._functions()
        i = inputs
        cap = case.softcap
        if case.op == "grpo":
            cfg, kw = case.config, _grpo_kwargs(i)
            f = fns["grpo"]
            return lambda: {"loss": f(i["hidden"], i["weight"], i["labels"], i["advantages"], i["mask"],
                                      config=cfg, softcap=cap, **kw)[0]}
        if case.op == "logprobs":
            f = fns["logprobs"]
            return lambda: dict(zip(("logp", "entropy"), f(i["hidden"], i["weight"], i["labels"], softcap=cap)))
        if case.op == "logits":
            f = fns["logits"]
            return lambda: dict(zip(("logp", "entropy"), f(i["logits"], i["labels"])))
        if case.op == "policy":
            f, (args, kw), cfg = fns["policy"], _policy_args(i), case.config
            return lambda: {"loss": f(*args, config=cfg, **kw)[0]}
        f, G = fns["advantages"], case.group_size
        return lambda: {"advantages": f(i["rewards"], group_size=G, method="grpo")}


class CompileProvider(EagerProvider):
    name = "compile"
    description = "torch.compile(dynamic=False) of the eager reference functions"
    _compiled: Dict[str, Callable] = {}

    def _functions(self):
        # one compiled wrapper per function and process; dynamic=False specialises on each shape, as a trainer with
        # fixed padded shapes would (the check shape and the bench shape compile separately)
        if not self._compiled:
            for op, fn in super()._functions().items():
                self._compiled[op] = torch.compile(fn, dynamic=False)
        return self._compiled


# ------------------------------------------------------------------------------------------------------------------
# rlkernels, one provider per engine
# ------------------------------------------------------------------------------------------------------------------
def engine_status(name: str, device: str) -> str:
    """``"available"`` or the reason engine ``name`` cannot run on ``device``. Loads that engine only (it may import
    triton or build the native extension), so it is asked per case at run time, never at import."""
    load = getattr(engines, "load_engine", None)
    if load is None:  # an engines module without per-engine loading: ask about all of them
        return available_backends().get(name, "unknown engine")
    try:
        engine = load(name)
    except engines.BackendUnavailable as exc:
        return str(exc)
    except KeyError:
        return "unknown engine"
    supports = getattr(engine, "supports", None)
    reason = supports(torch.device(device)) if supports is not None else None
    return reason or "available"


class RlkernelsProvider(Provider):
    def __init__(self, engine: str):
        self.engine = engine
        self.name = f"rlkernels-{engine}"
        self.description = f"rlkernels public API with backend={engine!r}"

    def unavailable(self, case):
        if case.op == "policy" and self.engine == "native":  # (before the status: that may build the engine)
            return "policy_loss runs torch ops on the native engine: it is measured once, as rlkernels-torch"
        status = engine_status(self.engine, case.device)
        if status != "available":
            return status
        if case.op == "advantages" and self.engine != "torch":
            return "group_advantages has no engine-specific code; it is measured once, as rlkernels-torch"
        return None

    def build(self, case, inputs):
        import rlkernels  # the package itself; imported here to keep this module's import graph flat

        i, be, cap = inputs, self.engine, case.softcap
        if case.op == "grpo":
            cfg, kw = case.config, _grpo_kwargs(i)
            return lambda: {"loss": rlkernels.fused_grpo_loss(i["hidden"], i["weight"], i["labels"], i["advantages"],
                                                               i["mask"], config=cfg, backend=be, softcap=cap,
                                                               **kw).loss}
        if case.op == "logprobs":
            return lambda: dict(zip(("logp", "entropy"), rlkernels.fused_logprobs(
                i["hidden"], i["weight"], i["labels"], return_entropy=True, backend=be, softcap=cap)))
        if case.op == "logits":
            return lambda: dict(zip(("logp", "entropy"), rlkernels.logprobs_from_logits(
                i["logits"], i["labels"], return_entropy=True, backend=be)))
        if case.op == "policy":
            (args, kw), cfg = _policy_args(i), case.config
            return lambda: {"loss": rlkernels.policy_loss(*args, config=cfg, backend=be, **kw).loss}
        G = case.group_size
        return lambda: {"advantages": rlkernels.group_advantages(i["rewards"], group_size=G, method="grpo")}


class RlkernelsCompileProvider(RlkernelsProvider):
    """The same calls under ``torch.compile(fullgraph=True, dynamic=False)``, as in a compiled trainer step: the
    engine's custom ops in the graph, the objective and metrics compiled around them (the loss's single pass is then
    the ``rlkernels::linear_fused_loss`` op)."""

    def __init__(self, engine: str):
        super().__init__(engine)
        self.name = f"rlkernels-{engine}-compile"
        self.description = f"torch.compile(fullgraph=True) of the rlkernels public API with backend={engine!r}"
        self._compiled: Dict[Tuple[str, Any], Callable] = {}  # (op, config of the grpo op) -> compiled wrapper

    def unavailable(self, case):
        if case.op == "advantages":
            return "group_advantages has no engine-specific code; the compile provider measures it compiled"
        return super().unavailable(case)

    def build(self, case, inputs):
        import rlkernels

        i, be, cfg, cap = inputs, self.engine, case.config, case.softcap
        key = (case.op, cfg if case.op in OBJECTIVE_OPS else None, cap)
        if key not in self._compiled:  # one wrapper per op (and config, cap) and process, specialised per shape
            def grpo(hidden, weight, labels, advantages, mask, **kw):
                return rlkernels.fused_grpo_loss(hidden, weight, labels, advantages, mask, config=cfg, backend=be,
                                                 softcap=cap, **kw).loss

            def logprobs(hidden, weight, labels):
                return rlkernels.fused_logprobs(hidden, weight, labels, return_entropy=True, backend=be, softcap=cap)

            def logits(x, labels):
                return rlkernels.logprobs_from_logits(x, labels, return_entropy=True, backend=be)

            def policy(logp, entropy, advantages, mask, **kw):
                return rlkernels.policy_loss(logp, entropy, advantages, mask, config=cfg, backend=be, **kw).loss

            fn = {"grpo": grpo, "logprobs": logprobs, "logits": logits, "policy": policy}[case.op]
            self._compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False)
        f = self._compiled[key]
        if case.op == "grpo":
            kw = _grpo_kwargs(i)
            return lambda: {"loss": f(i["hidden"], i["weight"], i["labels"], i["advantages"], i["mask"], **kw)}
        if case.op == "logprobs":
            return lambda: dict(zip(("logp", "entropy"), f(i["hidden"], i["weight"], i["labels"])))
        if case.op == "policy":
            args, kw = _policy_args(i)
            return lambda: {"loss": f(*args, **kw)}
        return lambda: dict(zip(("logp", "entropy"), f(i["logits"], i["labels"])))


# ------------------------------------------------------------------------------------------------------------------
# Liger-Kernel
# ------------------------------------------------------------------------------------------------------------------
def liger_arguments(cfg) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Map a :class:`~rlkernels.PolicyLossConfig` onto ``LigerFusedLinearGRPOLoss`` arguments: ``(kwargs, None)``, or
    ``(None, reason)`` when Liger has no identical objective.

    Identical where mapped: the PPO clipped surrogate ``max(-r A, -clip(r, 1-eps_low, 1+eps_high) A)`` (token or
    sequence-level ratio), CISPO (Liger's ratio cap is the bound itself, ours is ``1 + clip_high``), SAPO, the k3 KL
    with ``beta = kl_coef``, and the aggregations token-mean (Liger ``dapo``: sum over kept tokens / their count),
    seq-mean-token-mean (``grpo``) and seq-mean-token-sum-norm (``dr_grpo`` with ``max_completion_length``).
    Not identical: we clamp the log-ratio to +-``log_ratio_clamp`` (20) before ``exp`` and Liger does not (equal
    while |log r| < 20, as in every benchmark input); Liger's metrics differ (only loss and gradients are compared);
    Liger has no entropy terms, dual clip, rollout correction or off-policy sequence mask, and its ``luspo``
    normalises by ``B * T`` including padding, so those configurations are skipped rather than approximated.
    """
    unsupported = []
    if cfg.entropy_coef != 0 or cfg.entropy_shaping_alpha > 0 or cfg.top_entropy_quantile < 1.0:
        unsupported.append("entropy terms")
    if cfg.dual_clip is not None:
        unsupported.append("dual clip")
    if cfg.rollout_correction != "none" or cfg.opsm_delta is not None:
        unsupported.append("rollout correction / off-policy sequence mask")
    if cfg.kl_coef > 0 and (cfg.kl_estimator != "k3" or cfg.kl_straight_through):
        unsupported.append(f"KL estimator {cfg.kl_estimator}{'+' if cfg.kl_straight_through else ''} (Liger: k3)")
    if cfg.ratio_level == "sequence_token" or (cfg.ratio_level == "sequence" and cfg.policy_loss != "ppo"):
        unsupported.append(f"ratio_level={cfg.ratio_level} with policy_loss={cfg.policy_loss}")
    kw: Dict[str, Any] = {"beta": float(cfg.kl_coef), "use_bias_correction_kl": bool(cfg.kl_is_corrected),
                          "importance_sampling_level": "sequence" if cfg.ratio_level == "sequence" else "token"}
    agg = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
    if cfg.policy_loss == "ppo":
        if cfg.clip_low is None or cfg.clip_high is None:
            unsupported.append("one-sided clipping")
        elif cfg.loss_agg not in agg:
            unsupported.append(f"loss_agg={cfg.loss_agg}")
        else:
            kw.update(loss_type=agg[cfg.loss_agg], epsilon_low=cfg.clip_low, epsilon_high=cfg.clip_high)
            if cfg.loss_agg == "seq-mean-token-sum-norm":
                kw["max_completion_length"] = cfg.norm_length
    elif cfg.policy_loss == "cispo" and cfg.loss_agg == "token-mean" and cfg.clip_low is None:
        kw.update(loss_type="cispo", epsilon_high=1.0 + cfg.clip_high)
    elif cfg.policy_loss == "sapo" and cfg.loss_agg == "seq-mean-token-mean":
        kw.update(loss_type="sapo", sapo_temperature_pos=cfg.sapo_tau_pos, sapo_temperature_neg=cfg.sapo_tau_neg)
    else:
        unsupported.append(f"policy_loss={cfg.policy_loss} with loss_agg={cfg.loss_agg}")
    if unsupported:
        return None, "Liger's GRPO loss has no identical form for " + ", ".join(unsupported)
    return kw, None


class LigerProvider(Provider):
    name = "liger"
    description = ("liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss, all sequences in one chunk (gradients formed "
                   "in its forward)")

    def unavailable(self, case):
        if case.op != "grpo":
            return f"Liger-Kernel has no fused op for '{case.op}' (only its GRPO loss is compared)"
        if case.softcap is not None:
            return "Liger's GRPO loss takes no final-logit softcap"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (pip install liger-kernel)"
        _, reason = liger_arguments(case.config)
        return reason

    def build(self, case, inputs):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        kw, _ = liger_arguments(case.config)
        # Liger at its fastest, not its defaults, so that the comparison never flatters us:
        # - chunk_size = all sequences (Liger's default is 1 sequence per chunk, which TRL keeps): each chunk zeroes
        #   and adds a V x H fp32 gradient buffer and runs its own autograd pass, and on the 2-core CPU machine
        #   (cpu-small, fp32) one chunk of 8 sequences took 12.9 s against 21.3 s for 8 chunks, same results. Its
        #   memory stays bounded by its own 2048-row x 4096-vocab blocks either way.
        # - compiled=True (torch.compile of its loss math) is its default, kept on CUDA. On the CPU it would add an
        #   inductor C++ build (tens of seconds) for a few N-sized elementwise ops next to seconds of matmuls.
        # - if its compiled path fails (Liger 0.8.5 under torch 2.11 on an H100: a dynamo "sources must not be
        #   empty for symbol" assertion), the warm-up falls back to compiled=False and says so in the row's notes.
        def make(compiled: bool):
            return LigerFusedLinearGRPOLoss(use_ref_model=kw["beta"] > 0, compiled=compiled,
                                            chunk_size=inputs["labels"].shape[0], **kw)

        state = {"fn": make(case.device == "cuda")}
        i = inputs

        def call():
            return state["fn"](i["hidden"], i["weight"], i["labels"], i["mask"], i["advantages"],
                               ref_per_token_logps=i.get("ref_logprobs"), old_per_token_logps=i.get("old_logprobs"))[0]

        def run():
            try:
                return {"loss": call()}
            except Exception as exc:  # noqa: BLE001 - any failure of its compiled path
                if not state["fn"].compiled:
                    raise
                note(f"liger: its torch.compile path failed ({type(exc).__name__}: {str(exc)[:160]}); "
                     "measured with compiled=False")
                state["fn"] = make(False)
                return {"loss": call()}

        return run


# ------------------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy
# ------------------------------------------------------------------------------------------------------------------
class CCEProvider(Provider):
    """Apple's Cut Cross-Entropy (``pip install cut-cross-entropy``) for the per-token log-probs, the objective in
    eager PyTorch on them: how a trainer builds a GRPO loss on CCE, which fuses the LM head with the cross-entropy
    but computes neither entropies nor a policy loss.

    ``linear_cross_entropy(hidden, weight, labels, reduction="none")`` is ``-logp`` per token (masked positions get
    its ignore index, -100, and come back 0); :func:`rlkernels.reference.policy_loss` then makes the loss of the
    case's preset from ``logp``. Its gradient filtering is off (``filter_eps=None``, its exact mode): with its
    default (``filter_eps="high"``: in CCE's words, softmax entries too small to change a bf16 gradient are skipped)
    the gradient of the hidden states failed the bench's float64 check on an H100 (relative error 2.0e-2 against an
    allowance of 1.06e-2, the qwen2.5-7b check shape in bf16, the dapo preset; the loss and the weight's gradient
    passed), and a row that fails its check is not timed. Only the grpo op, presets without entropy terms, on CUDA
    (its Triton kernels fail under the interpreter: Triton 3.9, CCE 25.1.1)."""

    name = "cce"
    description = ("cut_cross_entropy.linear_cross_entropy (exact: filter_eps=None) for the log-probs, the objective "
                   "in eager PyTorch")
    devices = ("cuda",)  # where its kernels run (tests add "cpu" with a stand-in module)

    def unavailable(self, case):
        if case.op == "policy":
            return "Cut Cross-Entropy computes log-probs, not the policy objective"
        if case.op != "grpo":
            return (f"Cut Cross-Entropy has no '{case.op}' op: it gives per-token log-probs without entropies, "
                    "compared on the grpo op")
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut_cross_entropy is not installed (pip install cut-cross-entropy)"
        if case.device not in self.devices:
            return f"Cut Cross-Entropy's Triton kernels need CUDA (got {case.device})"
        cfg = case.config
        if cfg.entropy_coef != 0 or cfg.entropy_shaping_alpha > 0 or cfg.top_entropy_quantile < 1.0:
            return "Cut Cross-Entropy computes no entropy: this preset's entropy terms need it"
        return None

    def build(self, case, inputs):
        from cut_cross_entropy import linear_cross_entropy

        i, cfg, kw = inputs, case.config, _grpo_kwargs(inputs)
        targets = torch.where(i["mask"], i["labels"], -100)  # its ignore index: those positions come back 0

        cap = {} if case.softcap is None else {"softcap": case.softcap}  # its own argument, the same math

        def run():
            logp = -linear_cross_entropy(i["hidden"], i["weight"], targets, reduction="none", filter_eps=None,
                                         **cap).float()
            loss, _ = reference.policy_loss(logp, torch.zeros_like(logp), i["advantages"], i["mask"], config=cfg,
                                            **kw)
            return {"loss": loss}

        return run


# ------------------------------------------------------------------------------------------------------------------
# TRL's own kernels
# ------------------------------------------------------------------------------------------------------------------
TRL_VOCAB_CHUNK = 32768  # the vocabulary tile of TRL's fused LM head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _trl_version() -> Optional[Tuple[int, ...]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(x) for x in version("trl").split(".")[:2] if x.isdigit())
    except PackageNotFoundError:
        return None


def _trl_trainer_utils_or_stand_in() -> None:
    """``ChunkedLogProbFunction.backward`` imports ``maybe_gather_lm_head_ctx`` from ``trl.trainer.utils``, a module
    that imports TRL's training stack (datasets, accelerate, pandas), which a GPU image may lack (the lent H100's has
    no datasets). Without DeepSpeed ZeRO-3 that function returns ``contextlib.nullcontext()``; where the module cannot
    be imported, a module holding just that stands in for it, and the row's notes say so."""
    import contextlib
    import sys
    import types

    why = getattr(sys.modules.get("trl.trainer.utils"), "rlkernels_stand_in", None)  # set by an earlier case
    if why is None:
        try:
            import trl.trainer.utils  # noqa: F401
            return
        except ImportError as exc:
            why = f"{type(exc).__name__}: {exc}"
            stand_in = types.ModuleType("trl.trainer.utils")
            stand_in.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
            stand_in.rlkernels_stand_in = why
            sys.modules["trl.trainer.utils"] = stand_in
    note(f"trl: trl.trainer.utils is not importable here ({why}); its maybe_gather_lm_head_ctx (a null context "
         "without DeepSpeed ZeRO-3) stood in for the backward's import")


class TRLProvider(Provider):
    """TRL's own kernels (``trl.kernels``, trl 1.16 and later), what a TRL trainer runs: ``ChunkedLogProbFunction``,
    the hidden+W log-probs and entropies of TRL's fused LM head (cuBLAS on 4096-token x 32768-vocabulary tiles, each
    folded into online statistics by a Triton kernel, or torch ops off CUDA; the tiles recomputed in backward: 4
    GEMMs), for the logprobs op and, under the eager objective (:func:`rlkernels.reference.policy_loss`, as the cce
    row), the grpo op on the kept rows as TRL scores them; its Triton ``selective_log_softmax_and_entropy`` for the
    logits op (CUDA only). Importing ``trl.kernels`` needs transformers but none of TRL's training dependencies."""

    name = "trl"
    description = ("trl.kernels: ChunkedLogProbFunction (TRL's fused LM head) for the log-probs, the objective in "
                   "eager PyTorch; selective_log_softmax_and_entropy for logits")

    def unavailable(self, case):
        if case.op == "advantages":
            return "TRL computes advantages inside its trainer's generation step: no op to time"
        if case.op == "policy":
            return "TRL's objective is eager PyTorch inside its trainer's compute_loss (the eager row)"
        found = _trl_version()
        if found is None:
            return "trl is not installed (pip install trl)"
        if found < (1, 16):
            return f"trl {'.'.join(map(str, found))} has no trl.kernels (1.16 has)"
        if case.op == "logits" and case.device != "cuda":
            return "TRL's fused logits kernel needs CUDA (elsewhere TRL runs eager PyTorch: the eager row)"
        return None

    def build(self, case, inputs):
        i, cap = inputs, case.softcap
        if case.op == "logits":
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

            return lambda: dict(zip(("logp", "entropy"), selective_log_softmax_and_entropy(i["logits"], i["labels"])))
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        _trl_trainer_utils_or_stand_in()
        H, shape = i["hidden"].shape[-1], i["labels"].shape

        def logprobs(rows: Optional[Tensor]):
            h, y = i["hidden"].reshape(-1, H), i["labels"].reshape(-1)
            if rows is not None:  # TRL scores the kept rows only (on Triton devices)
                h, y = h[rows], y[rows]
            logp, ent, *_ = ChunkedLogProbFunction.apply(h, i["weight"], None, y, 1.0, TRL_VOCAB_CHUNK, cap, 1.0,
                                                         ("entropy",))
            if rows is None:
                return logp.view(shape), ent.view(shape)
            mask = rows.view(shape)
            return (logp.new_zeros(shape).masked_scatter(mask, logp),
                    ent.new_zeros(shape).masked_scatter(mask, ent))  # as TRL's fused forward scatters them back

        if case.op == "logprobs":
            return lambda: dict(zip(("logp", "entropy"), logprobs(None)))
        cfg, kw = case.config, _grpo_kwargs(i)

        def run():
            logp, ent = logprobs(i["mask"].reshape(-1))
            loss, _ = reference.policy_loss(logp, ent, i["advantages"], i["mask"], config=cfg, **kw)
            return {"loss": loss}

        return run


# ------------------------------------------------------------------------------------------------------------------
# the roofline: the op's matmuls alone, into preallocated outputs
# ------------------------------------------------------------------------------------------------------------------
class _GemmRunner(Runner):
    def __init__(self, case: Case, inputs: Dict[str, Any]):
        w = inputs["weight"].detach()
        h = inputs["hidden"].detach().reshape(-1, w.shape[1])[: inputs["kept"]]  # the kept tokens' worth of rows
        g = torch.Generator(device=h.device).manual_seed(7)
        self.h, self.w = h, w
        self.grad_logits = torch.randn(h.shape[0], w.shape[0], generator=g, device=h.device).to(h.dtype)
        self.logits = torch.empty_like(self.grad_logits)
        self.grad_h, self.grad_w = torch.empty_like(h), torch.empty_like(w)

    def forward(self):
        torch.matmul(self.h, self.w.T, out=self.logits)

    def backward(self, state):
        torch.matmul(self.grad_logits, self.w, out=self.grad_h)
        torch.matmul(self.grad_logits.T, self.h, out=self.grad_w)


class GemmRooflineProvider(Provider):
    name = "gemm-roofline"
    description = "the op's bare matmuls (1 forward, 2 backward) into preallocated outputs: the physical floor"
    checked = False

    def unavailable(self, case):
        if case.op not in LINEAR_OPS:
            return f"the {case.op} op has no matmul" + (" (read its GB/s instead)" if case.op == "logits" else "")
        return None

    def runner(self, case, inputs):
        return _GemmRunner(case, inputs)


# ------------------------------------------------------------------------------------------------------------------
# notes: what a provider did differently from its description (a fallback), kept in the row and printed under it
# ------------------------------------------------------------------------------------------------------------------
_NOTES: List[str] = []


def note(message: str) -> None:
    """Record ``message`` for the row being measured (and print it to stderr)."""
    if message not in _NOTES:
        _NOTES.append(message)
        print(message, file=sys.stderr, flush=True)


def drain_notes() -> List[str]:
    out = list(_NOTES)
    _NOTES.clear()
    return out


# ------------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------------
_EXTRA: Dict[str, Provider] = {}


def register_provider(provider: Provider) -> None:
    """Add (or replace) a provider under ``provider.name``; used by ``--plugin`` modules and tests."""
    _EXTRA[provider.name] = provider


def all_providers() -> List[Provider]:
    """Every provider in table order: eager, compile, rlkernels-<engine> for each engine, the same compiled
    (rlkernels-<engine>-compile), liger, cce, trl, gemm-roofline, then registered extras."""
    base: List[Provider] = [EagerProvider(), CompileProvider()]
    base += [RlkernelsProvider(engine) for engine in BACKENDS]  # names only: listing must not load engines
    base += [RlkernelsCompileProvider(engine) for engine in BACKENDS]
    base += [LigerProvider(), CCEProvider(), TRLProvider(), GemmRooflineProvider()]
    names = {p.name for p in base}
    return [_EXTRA.get(p.name, p) for p in base] + [p for n, p in _EXTRA.items() if n not in names]


def get_provider(name: str) -> Provider:
    """The provider called ``name``; ``KeyError`` listing the known names otherwise."""
    for p in all_providers():
        if p.name == name:
            return p
    raise KeyError(f"unknown provider {name!r}; known: {[p.name for p in all_providers()]}")


def provider_names() -> List[str]:
    return [p.name for p in all_providers()]


__all__ = ["Provider", "Runner", "AutogradRunner", "register_provider", "all_providers", "get_provider",
           "provider_names", "liger_arguments"]
