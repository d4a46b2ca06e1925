"""Engines compute per-token log-probs and entropies (and their gradients) without materialising ``N x V`` logits.

Every engine offers the same three operations on flat inputs (see :class:`Engine`); the public functions choose one
per call: ``backend=`` argument, else ``RLKERNELS_BACKEND``, else the device default (``triton`` for CUDA tensors,
``native`` for CPU tensors when the C++ extension is available, else ``torch``).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import torch_engine
from .chunking import ChunkPlan, plan_chunks

BACKENDS = ("torch", "triton", "native")


class Engine:
    """The interface of an engine. Inputs are flat: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,)
    int64, temperature a float or an (N,) tensor in the compute dtype (fp32, fp64 for fp64 inputs)."""

    name = "abstract"
    default_budget_mb = 64.0

    def linear_logprobs(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                        temperature, plan: ChunkPlan) -> Tuple[Tensor, Tensor]:
        """(logp, entropy), each (N,) in the compute dtype, differentiable w.r.t. hidden, weight and bias."""
        raise NotImplementedError

    def logits_logprobs(self, logits: Tensor, labels: Tensor, temperature, plan: ChunkPlan) -> Tuple[Tensor, Tensor]:
        """(logp, entropy) from logits (N, V), differentiable w.r.t. logits (the gradient is a new tensor)."""
        raise NotImplementedError

    def linear_fused_loss(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature,
                          plan: ChunkPlan, chunk_loss) -> Tuple[Tensor, Tensor, Tensor]:
        """Single pass for token-separable losses: (loss, logp, entropy); gradients formed in forward."""
        raise NotImplementedError


class TorchEngine(Engine):
    name = "torch"
    default_budget_mb = 64.0

    def linear_logprobs(self, hidden, weight, bias, labels, temperature, plan):
        return torch_engine.LinearLogprobs.apply(hidden, weight, bias, labels, temperature, plan)

    def logits_logprobs(self, logits, labels, temperature, plan):
        return torch_engine.LogitsLogprobs.apply(logits, labels, temperature, plan)

    def linear_fused_loss(self, hidden, weight, bias, labels, temperature, plan, chunk_loss):
        return torch_engine.LinearFusedLoss.apply(hidden, weight, bias, labels, temperature, plan, chunk_loss)


_ENGINES: Dict[str, Engine] = {"torch": TorchEngine()}
_UNAVAILABLE = {
    "triton": "the Triton engine is not built yet (it is the CUDA path of a later release)",
    "native": "the native C++ engine is not built yet (it is the fast CPU path of a later release)",
}


def available_backends() -> Dict[str, str]:
    """Every backend name -> ``"available"`` or the reason it is not."""
    return {name: ("available" if name in _ENGINES else _UNAVAILABLE.get(name, "unknown")) for name in BACKENDS}


def resolve_backend(backend: Optional[str], device: torch.device) -> Engine:
    """The engine for this call: ``backend`` if not "auto", else ``RLKERNELS_BACKEND``, else the device default."""
    requested = backend if backend not in (None, "auto") else os.environ.get("RLKERNELS_BACKEND", "auto") or "auto"
    source = "backend" if backend not in (None, "auto") else "RLKERNELS_BACKEND"
    if requested == "auto":
        preferred = ("triton", "torch") if device.type == "cuda" else ("native", "torch")
        for name in preferred:
            if name in _ENGINES:
                return _ENGINES[name]
        return _ENGINES["torch"]
    if requested not in BACKENDS:
        raise ValueError(f"{source}={requested!r} is not a backend; choose 'auto' or one of {BACKENDS}")
    if requested not in _ENGINES:
        status = "; ".join(f"{k}: {v}" for k, v in available_backends().items())
        raise ValueError(f"{source}={requested!r} is not available ({status})")
    return _ENGINES[requested]


__all__ = ["Engine", "ChunkPlan", "plan_chunks", "available_backends", "resolve_backend", "BACKENDS"]
