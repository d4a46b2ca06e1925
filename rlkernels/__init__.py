"""rlkernels: fused, memory-lean kernels for the losses of LLM reinforcement learning.

    from rlkernels import fused_grpo_loss
    loss, metrics = fused_grpo_loss(hidden, lm_head.weight, labels, advantages, mask, config="dapo")

Importing the package imports torch only: Triton, transformers and matplotlib load when an engine, the trainer or
the benchmark needs them.
"""
from ._version import __version__
from .advantages import group_advantages
from .config import PRESETS, PolicyLossConfig
from .engines import available_backends
from .objective import LossOutput, kl_penalty
from .ops import GRPOLoss, fused_grpo_loss, fused_logprobs, logprobs_from_logits, policy_loss

__all__ = [
    "__version__",
    "fused_logprobs",
    "logprobs_from_logits",
    "fused_grpo_loss",
    "policy_loss",
    "GRPOLoss",
    "LossOutput",
    "PolicyLossConfig",
    "PRESETS",
    "kl_penalty",
    "group_advantages",
    "available_backends",
]
