"""What the benchmark measures: one :class:`Case` (op, mode, shape, dtype, ...), its inputs, its work model (FLOPs or
bytes) and the correctness comparison every provider must pass before it is timed.

The ops:

- ``logprobs``: hidden ``(B, T, H)`` and LM-head weight ``(V, H)`` -> per-token log-prob and entropy.
- ``logits``: logits ``(B, T, V)`` -> per-token log-prob and entropy.
- ``grpo``: hidden and weight -> the policy loss of ``--preset`` (a scalar).
- ``advantages``: rewards ``(M,)`` -> group-normalised advantages (no gradient).
- ``policy``: per-token log-probs and entropies ``(B, T)`` (fp32; fp64 for float64) -> the policy loss of
  ``--preset`` (:func:`rlkernels.policy_loss`: the objective alone, no LM head: ratios, clipping, KL, entropy
  bonus, aggregation, metrics), as after ``fused_logprobs`` or ``logprobs_from_logits``.

For ``logprobs`` and ``logits`` the backward runs on ``sum(g_logp * logp + g_ent * entropy)`` with fixed random
``g_logp``/``g_ent``, so both outputs' gradients are exercised exactly as a loss built on them would.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..config import PolicyLossConfig, resolve_config
from .shapes import Shape

OPS = ("logprobs", "logits", "grpo", "advantages", "policy")
OBJECTIVE_OPS = ("grpo", "policy")  # ops whose output is the loss of --preset
MODES = ("fwd", "bwd", "full")
LINEAR_OPS = ("logprobs", "grpo")  # ops that contain the LM-head matmul
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64", "half": "float16",
                 "float": "float32", "double": "float64"}

# GEMMs per mode for the linear ops: forward logits = h W^T; backward grad_h = G W and grad_W = G^T h.
GEMMS = {"fwd": 1, "bwd": 2, "full": 3}
# Passes over the N x V logits for the logits op: forward reads them once; backward reads them (to recompute the
# softmax) and writes the gradient.
LOGITS_PASSES = {"fwd": 1, "bwd": 2, "full": 3}
# Ops whose timed calls start without gradients (dropped in the untimed setup). The logits op's input is an
# activation: in a model its gradient flows on to the LM head, it is never added into a leaf's ``.grad``. Adding it
# there, as a leaf does from the second call on, reads the old gradient and the new one and writes the sum: 3 more
# passes over N x V, as many as the op itself makes, that the byte model does not count and no trainer pays. The
# linear ops keep accumulating: the LM-head weight's gradient does accumulate over micro-batches, and that add is
# small beside their GEMMs.
FRESH_GRAD_OPS = ("logits",)

# Correctness (STYLE practice 11, in norms): ||ours - fp64|| <= K * ||eager_same_dtype - fp64|| + FLOOR * ||fp64||.
# K and the floors are those of the test suite's tolerance table (tests/conftest.py). Measured at the check shape
# (H=1024, V=32000, fp32): eager and rlkernels-torch both sit at ~7e-7 relative, so the allowance is ~3.4e-6; in
# bf16 (H=256, V=8192) eager's gradients are off by ~0.35% and ours by the same, allowance ~1.1%.
CHECK_K = 2.0
CHECK_FLOOR = {"float64": 1e-10, "float32": 2e-6, "float16": 1e-3, "bfloat16": 4e-3}
# Bench-shape consistency (norms of loss, outputs and gradients vs the eager run of the same shape and dtype): loose,
# it catches gross errors of code paths that only the large shape takes (many chunks, vocabulary blocks).
FINGERPRINT_RTOL = {"float64": 1e-8, "float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}

# Logits of a real LM head have a standard deviation of a few units; weight ~ N(0, (2 / sqrt(H))^2) with hidden ~
# N(0, 1) gives std 2, so the softmax is neither uniform nor one-hot.
LOGIT_STD = 2.0
# Noise between the current and the "old" policy's log-probs: ratios spread around 1 by ~10%, so a few percent of the
# tokens hit the 0.2 / 0.28 clip bounds and the clipped branches are part of what is checked and timed.
OLD_LOGP_NOISE = 0.1


@dataclass(frozen=True)
class Case:
    """One benchmark configuration, serialisable to JSON for the worker subprocess."""

    op: str
    mode: str
    shape: Shape
    dtype: str = "float32"
    device: str = "cpu"
    preset: str = "dapo"
    overrides: Tuple[Tuple[str, Any], ...] = field(default_factory=tuple)
    on_policy: bool = False
    pad_frac: float = 0.0
    group_size: int = 16
    seed: int = 0
    softcap: Optional[float] = None  # the linear ops' final-logit cap (Gemma 2 / 4: 30.0); None: none

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def config(self) -> PolicyLossConfig:
        return resolve_config(self.preset, **dict(self.overrides))

    def label(self) -> str:
        extra = f" {self.preset}" if self.op in OBJECTIVE_OPS else ""
        cap = f" softcap={self.softcap:g}" if self.softcap is not None else ""
        return f"{self.op}{extra}{cap} {self.mode} | {self.shape.describe()} | {self.dtype} | {self.device}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Case":
        d = dict(d)
        d["shape"] = Shape(**d["shape"])
        d["overrides"] = tuple(tuple(kv) for kv in d.get("overrides", ()))
        return cls(**d)


def kept_lengths(batch: int, seq_len: int, pad_frac: float, gen: torch.Generator) -> Tensor:
    """Completion length of each sequence, uniform in ``[ceil((1 - pad_frac) T), T]`` (all ``T`` for 0)."""
    low = max(1, math.ceil((1.0 - pad_frac) * seq_len))
    return torch.randint(low, seq_len + 1, (batch,), generator=gen)


@torch.no_grad()
def _current_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, rows: int = 512,
                      softcap: Optional[float] = None) -> Tensor:
    """Log-probs of the inputs (``logit[label] - logsumexp``, the logits capped with ``softcap``), ``rows`` at a time
    so that setup never holds ``N x V``. Input making only: one matmul and a log-sum-exp, about a third of the
    reference's cost with its entropy."""
    h2, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out = []
    for i in range(0, h2.shape[0], rows):
        z = (h2[i:i + rows] @ weight.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out.append(z.gather(1, y[i:i + rows, None]).squeeze(1) - z.logsumexp(1))
    return torch.cat(out).reshape(labels.shape)


def make_inputs(case: Case, batch: Optional[int] = None, seq_len: Optional[int] = None,
                seed_offset: int = 0, pad_frac: Optional[float] = None, logprob_inputs: bool = True,
                cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Deterministic inputs of ``case`` (optionally at another ``batch x seq_len``), on its device and dtype.

    Returns a dict of tensors; leaves that take gradients have ``requires_grad``. ``"kept"`` is the number of tokens
    the mask keeps (an int), used by the work model. ``logprob_inputs=False`` leaves out the grpo inputs derived
    from the current log-probs (old / ref / rollout), which cost a forward pass to make; with ``cache_dir`` that pass
    runs once per run and case, and the providers' worker processes after the first load its result.
    """
    B = case.shape.batch if batch is None else batch
    T = case.shape.seq_len if seq_len is None else seq_len
    H, V = case.shape.hidden, case.shape.vocab
    dev, dt = torch.device(case.device), case.torch_dtype
    # generate on the target device: a 152k x 5k weight drawn on the CPU and copied would dominate setup time
    gen = torch.Generator(device=dev).manual_seed(case.seed * 1000 + seed_offset)
    cpu_gen = torch.Generator().manual_seed(case.seed * 1000 + seed_offset)

    def randn(*size, scale=1.0, dtype=dt):
        return (torch.randn(*size, generator=gen, device=dev, dtype=torch.float32) * scale).to(dtype)

    if case.op == "advantages":
        G = case.group_size
        M = B * T
        if M % G:
            raise ValueError(f"the advantages op needs tokens={M} to be a multiple of --group-size={G}")
        # 0/1 outcome rewards (the usual verifier reward): some groups come out all-equal, as in real batches
        rewards = torch.randint(0, 2, (M,), generator=gen, device=dev, dtype=torch.int64).to(torch.float32)
        return {"rewards": rewards, "kept": M}

    pad = case.pad_frac if pad_frac is None else pad_frac
    lengths = kept_lengths(B, T, pad, cpu_gen).to(dev)
    mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
    if case.op == "policy":
        return _policy_inputs(case, B, T, mask, randn, gen, int(lengths.sum()))
    labels = torch.randint(0, V, (B, T), generator=gen, device=dev)
    inputs: Dict[str, Any] = {"labels": labels, "kept": int(lengths.sum())}
    if case.op == "logits":
        inputs["logits"] = randn(B, T, V, scale=LOGIT_STD).requires_grad_()
    else:
        inputs["hidden"] = randn(B, T, H).requires_grad_()
        inputs["weight"] = randn(V, H, scale=LOGIT_STD / math.sqrt(H)).requires_grad_()
    if case.op in ("logprobs", "logits"):
        inputs["g_logp"] = randn(B, T, dtype=torch.float32)
        inputs["g_ent"] = randn(B, T, dtype=torch.float32)
        return inputs

    # grpo
    cfg = case.config
    inputs["mask"] = mask
    inputs["advantages"] = randn(B, dtype=torch.float32)
    needs_ref = cfg.kl_coef > 0
    needs_rollout = cfg.rollout_correction != "none"
    if logprob_inputs and (not case.on_policy or needs_ref or needs_rollout):
        path = None
        if cache_dir is not None:
            path = os.path.join(cache_dir, f"logp-{case.shape.tokens}-{B}x{T}-{H}-{V}-{case.dtype}-{case.device}-"
                                           f"{case.seed}-{seed_offset}-cap{case.softcap}.pt")
        if path is not None and os.path.exists(path):
            logp = torch.load(path).to(dev)
        else:
            logp = _current_logprobs(inputs["hidden"].detach(), inputs["weight"].detach(), labels,
                                     softcap=case.softcap)
            if path is not None:
                torch.save(logp.cpu(), path + ".tmp")
                os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
        if not case.on_policy:
            inputs["old_logprobs"] = logp + randn(B, T, scale=OLD_LOGP_NOISE, dtype=torch.float32)
        if needs_ref:
            inputs["ref_logprobs"] = logp + randn(B, T, scale=OLD_LOGP_NOISE, dtype=torch.float32)
        if needs_rollout:
            inputs["rollout_logprobs"] = logp + randn(B, T, scale=OLD_LOGP_NOISE, dtype=torch.float32)
    return inputs


def _policy_inputs(case: Case, B: int, T: int, mask: Tensor, randn, gen: torch.Generator, kept: int
                   ) -> Dict[str, Any]:
    """The policy op's inputs: log-probs of sampled tokens (-Exp(1): most near 0, a tail to -10 and below),
    entropies in [0, 4), the old / reference / rollout log-probs the preset needs near them (ratios spread by ~10%),
    one advantage per sequence, and the completion mask. fp32 (fp64 for float64): ``policy_loss``'s dtypes."""
    cfg, dt = case.config, torch.float64 if case.dtype == "float64" else torch.float32
    u = torch.rand(B, T, generator=gen, device=mask.device, dtype=torch.float32)
    logp = torch.log(u.clamp(min=1e-30)).to(dt)  # log U = -Exp(1)
    entropy = (4.0 * torch.rand(B, T, generator=gen, device=mask.device, dtype=torch.float32)).to(dt)
    inputs: Dict[str, Any] = {"logp": logp.requires_grad_(), "entropy": entropy.requires_grad_(), "mask": mask,
                              "advantages": randn(B, dtype=dt), "kept": kept}
    near = lambda: (logp.detach() + randn(B, T, scale=OLD_LOGP_NOISE, dtype=dt)).clamp(max=0.0)  # noqa: E731
    if not case.on_policy:
        inputs["old_logprobs"] = near()
    if cfg.kl_coef > 0:
        inputs["ref_logprobs"] = near()
    if cfg.rollout_correction != "none":
        inputs["rollout_logprobs"] = near()
    return inputs


def leaves(inputs: Dict[str, Any]) -> Dict[str, Tensor]:
    """The inputs that receive gradients."""
    return {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad}


def upcast(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """A float64 copy of ``inputs`` (new leaves), for the reference run."""
    out: Dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            out[k] = v.detach().double().requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def scalar(case: Case, outputs: Dict[str, Tensor], inputs: Dict[str, Any]) -> Optional[Tensor]:
    """The scalar the backward runs on (None for the advantages op, which has no gradient)."""
    if case.op in OBJECTIVE_OPS:
        return outputs["loss"]
    if case.op in ("logprobs", "logits"):
        return (outputs["logp"].float() * inputs["g_logp"] + outputs["entropy"].float() * inputs["g_ent"]).sum()
    return None


def work_model(case: Case, kept: int) -> Dict[str, Optional[float]]:
    """``flops`` (useful matmul FLOPs, 2 M H V per GEMM, M = kept tokens) and ``bytes`` (logits traffic) of a call."""
    H, V = case.shape.hidden, case.shape.vocab
    flops = bytes_ = None
    if case.op in LINEAR_OPS:
        flops = float(GEMMS[case.mode] * 2 * kept * H * V)
    elif case.op == "logits":
        bytes_ = float(LOGITS_PASSES[case.mode] * case.shape.tokens * V * case.torch_dtype.itemsize)
    return {"flops": flops, "bytes": bytes_}


# ------------------------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------------------------
def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().double().flatten()))


def compare(got: Dict[str, Tensor], base: Dict[str, Tensor], ref: Dict[str, Tensor], dtype: str
            ) -> Tuple[bool, Dict[str, Any]]:
    """Norm-wise check of every tensor in ``ref`` (the float64 reference): ``got`` (the provider) must satisfy
    ``||got - ref|| <= CHECK_K * ||base - ref|| + CHECK_FLOOR[dtype] * ||ref||`` where ``base`` is eager in the same
    dtype. Returns ``(ok, details)``; details name each tensor's relative error and what was allowed."""
    ok, details = True, {}
    floor = CHECK_FLOOR[dtype]
    for key, r in ref.items():
        if key not in got or got[key] is None:
            ok = False
            details[key] = "missing"
            continue
        g = got[key].detach().double().cpu()
        r = r.detach().double().cpu()
        if g.shape != r.shape:
            ok = False
            details[key] = f"shape {tuple(g.shape)} != {tuple(r.shape)}"
            continue
        if not bool(torch.isfinite(g).all()):
            ok = False
            details[key] = f"{int((~torch.isfinite(g)).sum())} non-finite values"
            continue
        scale = max(_norm(r), 1e-30)
        err = _norm(g - r)
        allowed = CHECK_K * _norm(base[key].detach().double().cpu() - r) + floor * scale
        details[key] = {"rel_err": err / scale, "allowed_rel": allowed / scale}
        if not err <= allowed:
            ok = False
    return ok, details


def describe_failure(details: Dict[str, Any]) -> str:
    """A one-line summary of what failed in :func:`compare`'s details."""
    parts = []
    for key, d in details.items():
        if isinstance(d, str):
            parts.append(f"{key}: {d}")
        elif d["rel_err"] > d["allowed_rel"]:
            parts.append(f"{key} rel err {d['rel_err']:.2e} > allowed {d['allowed_rel']:.2e}")
    return "; ".join(parts)


def fingerprint(result: Dict[str, Tensor]) -> Dict[str, float]:
    """Norms of each output and gradient of one call at the bench shape (the loss as its value)."""
    return {k: (float(v.detach().double()) if v.dim() == 0 else _norm(v)) for k, v in result.items() if v is not None}


def compare_fingerprints(got: Dict[str, float], eager: Dict[str, float], dtype: str) -> Optional[str]:
    """None when ``got`` matches ``eager`` within ``FINGERPRINT_RTOL``, else a description of the difference."""
    rtol = FINGERPRINT_RTOL[dtype]
    bad = []
    for key, e in eager.items():
        if key not in got:
            continue
        g = got[key]
        if not (math.isfinite(g) and abs(g - e) <= rtol * max(abs(e), 1e-6)):
            bad.append(f"{key} {g:.6g} vs eager {e:.6g}")
    return ("bench-shape values differ from eager (rtol %.0e): " % rtol + "; ".join(bad)) if bad else None
