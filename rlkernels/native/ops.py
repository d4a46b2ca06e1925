"""The native row kernels as ``torch.library`` custom ops, so that ``torch.compile`` sees them as single ops.

``rlkernels::block_stats``  (z (R, n), labels (R,), v0, bias (n,)?, temperature, temp_rows (R,)?, softcap,
                             state (R, 4)?)
                             -> state (R, 4): per-row (M, S, C, z~_y) of the block merged into ``state``
``rlkernels::dlogits``      (..., m, log_s, cs (R,), g_logp (R,)?, g_ent (R,)?) -> dL/dz, a new (R, n) tensor in
                             z's dtype, from the saved statistics M, log S and C / S of the rows
``rlkernels::dlogits_``     the same written over ``z`` (the engine's GEMM output block)

with ``z~ = max((z + bias) / T, -1e20)`` and T the per-row ``temp_rows`` or else ``temperature`` (with ``softcap`` s >
0, ``z + bias`` capped to ``s tanh((z + bias) / s)`` first, and dz times the cap's derivative; 0: none); see
``csrc/row_kernels.h``. In PyTorch terms, for one full-vocabulary block without a cap::

    zt = ((z.float() + bias) / T[:, None]).clamp(min=-1e20); M = zt.amax(1)
    S = (zt - M[:, None]).exp().sum(1); C = ((zt - M[:, None]).exp() * (zt - M[:, None])).sum(1)
    state = torch.stack([M, S, C, zt_y], 1)   # zt_y gathered before the clamp
    logp = zt_y - M - S.log(); entropy = S.log() - C / S
    p = (zt - M[:, None] - S.log()[:, None]).exp()
    dz = (g_logp[:, None] * (onehot(y) - p) - g_ent[:, None] * p * (zt - M[:, None] - (C / S)[:, None])) / T

Importing this module registers the ops; their CPU implementation calls the extension that
:func:`rlkernels.native.load` returns (loaded before this module is imported by the engine).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import load


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("rlkernels::block_stats", mutates_args=(), device_types="cpu")
def block_stats(z: Tensor, labels: Tensor, v0: int, bias: Optional[Tensor], temperature: float,
                temp_rows: Optional[Tensor], softcap: float, state: Optional[Tensor]) -> Tensor:
    return load().block_stats(z, labels, v0, bias, temperature, temp_rows, softcap, state)


@block_stats.register_fake
def _(z, labels, v0, bias, temperature, temp_rows, softcap, state):
    return z.new_empty((z.shape[0], 4), dtype=_acc(z.dtype))


@torch.library.custom_op("rlkernels::dlogits", mutates_args=(), device_types="cpu")
def dlogits(z: Tensor, labels: Tensor, v0: int, bias: Optional[Tensor], temperature: float,
            temp_rows: Optional[Tensor], softcap: float, m: Tensor, log_s: Tensor, cs: Tensor,
            g_logp: Optional[Tensor], g_ent: Optional[Tensor]) -> Tensor:
    return load().dlogits(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent)


@dlogits.register_fake
def _(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.custom_op("rlkernels::dlogits_", mutates_args=("z",), device_types="cpu")
def dlogits_(z: Tensor, labels: Tensor, v0: int, bias: Optional[Tensor], temperature: float,
             temp_rows: Optional[Tensor], softcap: float, m: Tensor, log_s: Tensor, cs: Tensor,
             g_logp: Optional[Tensor], g_ent: Optional[Tensor]) -> None:
    load().dlogits_(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent)


@dlogits_.register_fake
def _(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent):
    return None


def finish(state: Tensor):
    """(logp, entropy, M, log S, C / S) of each row from its final (M, S, C, z~_y) state (B §1.1, through the engines'
    one ``finish_stats``); the last three are what backward needs."""
    from ..engines.torch_engine import finish_stats

    m, s, c, zy = state.unbind(1)
    log_s, cs, logp, ent = finish_stats(m, s, c, zy)
    # all five new contiguous tensors (M a copy, not a column view of the state): op outputs may not alias each
    # other, and fake kernels say stride 1
    return logp, ent, m.clone(memory_format=torch.contiguous_format), log_s, cs
