"""Input checking and the flattening of padded or packed batches into a :class:`~rlkernels.objective.TokenBatch`.

Every check runs before any result is returned and raises ``TypeError`` (wrong type or dtype) or ``ValueError``
(wrong shape, device or value) naming the argument and the shapes involved. The checks of values (label range, NaN
at kept positions, ``cu_seqlens`` consistency) read data back to the host: when they run, and how they are queued and
read back together, is :mod:`rlkernels._checks`.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from ._checks import LateCheck, fail_if, fail_when, value_checks_enabled
from .config import PolicyLossConfig, as_number, is_finite_number
from .engines import AUTOCAST_DEVICES
from .objective import TokenBatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_linear_inputs(hidden, weight, bias):
    """hidden, weight and bias as ``torch.nn.functional.linear`` sees them inside a ``torch.autocast`` region of
    hidden's device type: each floating tensor that is not float64 cast to the region's dtype (differentiably: its
    gradient comes back in the caller's dtype), so that the GEMMs run in that dtype as the eager code's would. Outside
    such a region (and for anything that is not a tensor, which the checks then reject) as they are."""
    if not isinstance(hidden, Tensor):
        return hidden, weight, bias
    device_type = hidden.device.type
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)
        return t.to(dtype) if eligible else t
    return cast(hidden), cast(weight), cast(bias)



def env_choice(name: str, choices) -> str:
    """The value of environment variable ``name`` (read now), lower-cased, one of ``choices``; unset or empty gives
    ``choices[0]``. Anything else raises ValueError naming the variable."""
    mode = os.environ.get(name, "").strip().lower() or choices[0]
    if mode not in choices:
        raise ValueError(f"{name}={mode!r}: choose one of {tuple(choices)}")
    return mode


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def require_tensor(name: str, x, *, dtypes=None, dims=None, kind: str = "float") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if _is_dtensor(x):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(x.placements)}), as FSDP2 leaves a parameter outside its "
            f"module's forward; rlkernels takes plain tensors: the whole tensor ({name}.full_tensor(), or the "
            "parameter inside the module's forward, where FSDP has gathered it), or, for an LM head sharded over the "
            f"vocabulary across ranks that hold the same hidden states, this rank's rows ({name}.to_local()) with "
            "tp_group=")
    if hasattr(x, "ds_id") and x.numel() == 0:  # DeepSpeed ZeRO-3 leaves a partitioned parameter empty
        full = getattr(x, "ds_shape", None)
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 parameter whose data is partitioned across ranks: it holds shape "
            f"{_shape(x)} here" + (f" (its whole shape is {tuple(full)})" if full is not None else "") + "; "
            "rlkernels needs the whole tensor: call it where ZeRO-3 has gathered the parameter (inside the forward "
            "of the module that owns it, or inside deepspeed.zero.GatheredParameters)")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {kind} ({', '.join(str(d) for d in dtypes)})")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} has shape {_shape(x)}; expected {' or '.join(f'{d}-D' for d in dims)}")
    return x


def _is_dtensor(x: Tensor) -> bool:
    # by name: no import of torch.distributed.tensor (nothing else makes one)
    cls = type(x)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _require_int(name: str, x) -> Tensor:
    require_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {x.dtype}; expected an integer dtype (int64 or int32)")
    return x


def _same_device(name: str, x: Optional[Tensor], ref: Tensor, ref_name: str) -> None:
    if x is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def check_mask(mask, shape: torch.Size, ref: Tensor) -> Tensor:
    """mask of ``shape`` (bool, or 0/1 integers or floats) -> bool tensor; None -> all True."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=ref.device)
    require_tensor("mask", mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {_shape(mask)}; expected {tuple(shape)} (the shape of labels)")
    _same_device("mask", mask, ref, "labels")
    if mask.dtype == torch.bool:
        return mask
    if value_checks_enabled():
        fail_if((mask != 0) & (mask != 1), lambda: "mask must hold only 0/1 (or bool); found other values")
    return mask != 0


def check_labels(labels, shape: torch.Size, vocab: int, mask: Optional[Tensor], ref: Tensor,
                 range_check: bool = True) -> Tensor:
    """labels of ``shape`` (an integer dtype), in ``[0, vocab)`` where ``mask`` (None: everywhere) -> int64.
    ``range_check=False``: the type, shape and device only; the caller's kernel flags labels out of range
    (``Engine.flags_bad_labels``) and :func:`check_scanned_rows` raises :func:`label_range_error`'s message."""
    _require_int("labels", labels)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels has shape {_shape(labels)}; expected {tuple(shape)}")
    _same_device("labels", labels, ref, "hidden" if ref is not labels else "labels")
    if range_check and value_checks_enabled() and labels.numel() > 0:
        # the range from one min/max reduction (masked-out positions read as 0): one kernel before the sync, where
        # the elementwise flags (< 0, >= V, or, and, any) took five; both into one tensor, so one copy reads it back
        kept = labels if mask is None else torch.where(mask, labels, 0)
        bounds = torch.empty(2, dtype=kept.dtype, device=kept.device)
        torch.aminmax(kept, out=(bounds[0], bounds[1]))
        fail_when((bounds,), lambda lo_hi: lo_hi[0] < 0 or lo_hi[1] >= vocab,
                  lambda: label_range_error(labels, vocab, mask))
    return labels.long()


def label_range_error(labels: Tensor, vocab: int, mask: Optional[Tensor]) -> Optional[str]:
    """The error for the first kept label outside ``[0, vocab)`` (its value and index), or None if there is none.
    Reads the labels back: for an error's message, once a check has failed."""
    bad = (labels < 0) | (labels >= vocab)
    if mask is not None:
        bad &= mask
    if not bool(bad.any()):
        return None
    where = tuple(bad.nonzero()[0].tolist())
    return f"labels must lie in [0, V={vocab}) at kept positions; found {int(labels[where])} at index {where}"


def check_linear(hidden, weight, bias) -> Tuple[int, int]:
    """hidden (B, T, H) or (N, H), weight (V, H), bias (V,) -> (H, V)."""
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dims=(2, 3))
    require_tensor("weight", weight, dtypes=FLOAT_DTYPES, dims=(2,))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match "
                        "(the GEMM runs in the input dtype)")
    _same_device("weight", weight, hidden, "hidden")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden has shape {_shape(hidden)} but weight has {_shape(weight)}: the last dimension of "
                         f"hidden must equal weight.shape[1] = {H}")
    if V == 0:
        raise ValueError("weight has shape (0, H): the vocabulary is empty")
    if bias is not None:
        require_tensor("bias", bias, dtypes=FLOAT_DTYPES, dims=(1,))
        if bias.shape[0] != V:
            raise ValueError(f"bias has shape {_shape(bias)}; expected ({V},) to match weight {_shape(weight)}")
        _same_device("bias", bias, hidden, "hidden")
    return H, V


def check_finite_rows(name: str, x: Tensor, row_mask: Optional[Tensor] = None, allow_neg_inf: bool = False) -> None:
    """No NaN / inf in ``x`` (only in rows where ``row_mask`` is True, when given).

    Per-row min/max reductions instead of elementwise masks: NaN propagates through max, so a row is bad iff its max
    is NaN or +inf, or (unless -inf is allowed) its min is -inf. Measured on 4096 x 32000 fp32 logits (2-core CPU):
    16 ms (-inf allowed: the maxima alone), against ~1 s for ``isfinite(x[row_mask])``, which copies the tensor and
    builds full-size masks.
    """
    if not value_checks_enabled() or x.numel() == 0:
        return
    # one mask entry per element (per-token inputs), or per row (hidden states, logits); no mask: whole rows
    n_rows = row_mask.numel() if row_mask is not None else (x.shape[0] if x.dim() == 2 else x.numel())
    rows = x.reshape(n_rows, -1)
    # NaN propagates through amax and amin. -inf allowed: the row maxima alone. Else both: aminmax in one read on a
    # GPU; on the CPU amin and amax, as aminmax along a dimension is 4x slower there than the two together (torch
    # 2.13, 4096 x 32000 fp32 on the 2-core machine: 145 ms against 16 + 17 ms)
    if allow_neg_inf:
        hi = rows.amax(dim=-1)
    elif rows.device.type == "cpu":
        lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
    else:
        lo, hi = torch.aminmax(rows, dim=-1)
    bad = torch.isnan(hi) | (hi == math.inf)
    if not allow_neg_inf:
        bad |= lo == -math.inf
    if row_mask is not None:
        bad &= row_mask.reshape(-1)
    what = "NaN or +inf" if allow_neg_inf else "NaN or inf"
    where = "kept position(s)" if rows.shape[1] == 1 else "row(s)"
    fail_if(bad, lambda: f"{name} holds {what} in {int(bad.sum())} {where}")


def check_scanned_rows(name: str, values: Tensor, late: Optional[LateCheck] = None,
                       first: Optional[Callable[[], Optional[str]]] = None) -> None:
    """The engine scanned ``name`` for NaN / +inf in its own read of it (``Engine.scans_logits``), leaving NaN in
    ``values`` (one per row the engine computed; dropped rows hold 0) where it found one: the same error as
    :func:`check_finite_rows`, raised before anything is returned, or, given ``late`` (a gradient is needed), armed
    there and raised by the backward pass before it returns the gradient: the forward pass then waits for nothing.
    ``first``: where the engine also leaves NaN for another input's bad values (``Engine.flags_bad_labels``), the
    message of that input's error, or None when it has none (read once a NaN is found: that error comes first)."""
    if not value_checks_enabled() or values.numel() == 0:
        return

    def message() -> str:
        found = None if first is None else first()
        if found is None:
            found = f"{name} holds NaN or +inf in {int(torch.isnan(values).sum())} row(s)"
        if late is None:
            return found
        return f"{found} (found in the forward pass; raised in backward, no gradient returned)"

    # one reduction: the largest value is NaN exactly when one is (torch's max propagates NaN; -inf is a value)
    flag = (values.amax(),)
    if late is None:
        fail_when(flag, math.isnan, message)
    else:
        late.arm(flag, math.isnan, message)


def check_softcap(softcap) -> float:
    """None (no cap) or a finite number > 0 -> the float the engines take, 0.0 for none."""
    if softcap is None:
        return 0.0
    softcap = as_number(softcap)
    if isinstance(softcap, Tensor):
        raise TypeError("softcap must be a Python number (a model config's final_logit_softcapping) or None, got a "
                        "tensor")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a number or None, got {type(softcap).__name__}")
    if not (is_finite_number(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap}: must be finite and > 0 (None turns the cap off)")
    return float(softcap)


def check_temperature(temperature, shape: torch.Size, mask: Optional[Tensor], ref: Tensor, cdt: torch.dtype):
    """A float > 0, or a tensor of ``shape`` (per token) > 0 at kept positions (``mask``; None: everywhere) -> float
    or flat tensor in ``cdt``."""
    if isinstance(temperature, Tensor):
        if temperature.dim() == 0:
            temperature = float(temperature)
        else:
            require_tensor("temperature", temperature, dtypes=FLOAT_DTYPES)
            if tuple(temperature.shape) != tuple(shape):
                raise ValueError(f"temperature has shape {_shape(temperature)}; expected a float or a per-token "
                                 f"tensor of shape {tuple(shape)}")
            _same_device("temperature", temperature, ref, "hidden")
            t = temperature.to(cdt)
            if value_checks_enabled():
                bad = ~(torch.isfinite(t) & (t > 0))
                if mask is not None:
                    bad &= mask
                fail_if(bad, lambda: f"temperature must be finite and > 0 at kept positions; found "
                                     f"{float(t[bad][0])} at {int(bad.sum())} position(s)")
            return (t if mask is None else torch.where(mask, t, torch.ones_like(t))).reshape(-1)
    temperature = as_number(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a per-token tensor, got {type(temperature).__name__}")
    if not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature}: must be finite and > 0 (T = 0, greedy decoding, has no "
                         "log-probs; see LOSSES.md B §10.7)")
    return float(temperature)


def _per_token(name: str, x, shape, mask: Tensor, cdt, ref: Tensor, logprob: bool) -> Optional[Tensor]:
    if x is None:
        return None
    if logprob:
        require_tensor(name, x, dtypes=(torch.float32, torch.float64), kind="fp32/fp64 log-probs (bf16 log-probs are "
                       "too coarse for ratios, LOSSES.md B §10.4)")
    else:
        require_tensor(name, x, dtypes=FLOAT_DTYPES)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {_shape(x)}; expected {tuple(shape)} (one value per token, like labels)")
    _same_device(name, x, ref, "labels")
    check_finite_rows(name, x, mask)
    return torch.where(mask, x.to(cdt), torch.zeros((), dtype=cdt, device=x.device)).reshape(-1)


def check_cu_seqlens(name: str, cu_seqlens, n: int, what: str) -> Tensor:
    """Sequence boundaries (S+1,) of ``n`` packed rows (flash-attn varlen convention) -> int64 tensor: an integer
    tensor, 1-D with S >= 1, and (value checks, read at once: later indexing relies on them) starting at 0, ending at
    ``n`` (``what`` names it) and non-decreasing."""
    _require_int(name, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} has shape {_shape(cu_seqlens)}; expected (S+1,) with S >= 1 sequences "
                         "(flash-attn varlen convention)")
    cu = cu_seqlens.long()
    if value_checks_enabled():
        # one read of the ends and the order flag together (three syncs when each was read alone)
        first, last, unordered = _checks.read_back((cu[0], cu[-1], (cu[1:] < cu[:-1]).any()))
        if first != 0 or last != n:
            raise ValueError(f"{name} must start at 0 and end at N={n} ({what}); got {first} ... {last}")
        if unordered:
            raise ValueError(f"{name} must be non-decreasing")
    return cu


def sequence_layout(shape: torch.Size, cu_seqlens, ref: Tensor) -> Tuple[Tensor, int]:
    """seq_ids (N,) and the number of sequences, from a padded (B, T) shape or packed (N,) + cu_seqlens."""
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for packed (N, H) inputs; got padded inputs with labels shape "
                             f"{tuple(shape)}. Pass mask= for padded batches instead")
        B, T = shape
        return torch.arange(B, device=ref.device).repeat_interleave(T), B
    N = shape[0]
    if cu_seqlens is None:
        return torch.zeros(N, dtype=torch.long, device=ref.device), 1
    cu = check_cu_seqlens("cu_seqlens", cu_seqlens, N, "the number of tokens").to(ref.device)
    S = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(S, device=ref.device), lengths, output_size=N), S


def _caller_level() -> int:
    """The ``stacklevel`` of a warning raised here that points at the first frame outside this package: the user's
    call, however deep inside rlkernels the warning is raised."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def check_advantages(advantages, shape: torch.Size, num_seqs: int, seq_ids: Tensor, mask: Tensor, cdt,
                     ref: Tensor) -> Tensor:
    """Per-sequence (S,) / (B,) (or (S, 1) / (B, 1), the broadcasting form) or per-token advantages -> flat (N,) in
    ``cdt``, 0 at masked positions. A packed batch of as many tokens as sequences (N = S) makes (N,) both: taken per
    token, as anything shaped like the labels is, with a warning that names the per-sequence form."""
    require_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    _same_device("advantages", advantages, ref, "labels")
    if tuple(advantages.shape) == tuple(shape):
        if len(shape) == 1 and shape[0] == num_seqs > 0 and not _checks.compiling():
            warnings.warn(f"advantages has shape {_shape(advantages)}: this packed batch has as many tokens as "
                          f"sequences ({num_seqs}), so it is read as one per token, as any advantages shaped like "
                          "labels are; for one per sequence pass advantages[:, None] (shape (S, 1))",
                          stacklevel=_caller_level())
        return _per_token("advantages", advantages, shape, mask, cdt, ref, logprob=False)
    if tuple(advantages.shape) in ((num_seqs,), (num_seqs, 1)):
        flat = advantages.reshape(num_seqs).to(cdt)[seq_ids]
        flat_mask = mask.reshape(-1)
        check_finite_rows("advantages", flat, flat_mask)
        return torch.where(flat_mask, flat, torch.zeros((), dtype=cdt, device=flat.device))
    raise ValueError(f"advantages has shape {_shape(advantages)}; expected ({num_seqs},) or ({num_seqs}, 1) (one per "
                     f"sequence) or {tuple(shape)} (one per token)")


def check_normalizer(normalizer, device: torch.device):
    """A number (float) or a 0-dim tensor, checked > 0. A CPU tensor for inputs on another device is read here, a
    host read of host memory, and taken as its number: copying it to a GPU would be a blocking copy (a stream sync
    per call); in a CUDA graph capture, whose replays would keep the value it holds now, it is an error."""
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer has shape {_shape(normalizer)}; expected a scalar")
        on_host = normalizer.device.type == "cpu" and device.type != "cpu" and not _checks.compiling()
        if not on_host:
            if value_checks_enabled():  # queued with the other value checks (NaN fails too)
                fail_if(~(normalizer > 0), lambda: f"normalizer must be > 0, got {float(normalizer)}")
            return normalizer.reshape(())
        if _checks.capturing():
            raise ValueError(f"normalizer is a CPU tensor and the inputs are on {device}: a CUDA graph would keep the "
                             f"value it holds at capture; pass a 0-dim tensor on {device}, updated in place between "
                             "replays")
        normalizer = normalizer.item()  # then checked as a number
    normalizer = as_number(normalizer)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a number or a scalar tensor, got {type(normalizer).__name__}")
    if not (is_finite_number(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer={normalizer}: must be finite and > 0")
    return float(normalizer)


def check_config_inputs(cfg: PolicyLossConfig, ref_logprobs, rollout_logprobs, is_weights, have_entropy=True) -> None:
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
    if cfg.rollout_correction != "none":
        if is_weights is not None:
            raise ValueError(f"is_weights are given and rollout_correction={cfg.rollout_correction!r}: use one; "
                             "is_weights are applied as they are (already truncated or masked)")
        if rollout_logprobs is None:
            raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs rollout_logprobs (the rollout "
                             "engine's per-token log-probs)")
    if not have_entropy:
        for field in ("entropy_coef", "entropy_shaping_alpha"):
            if getattr(cfg, field) != 0:
                raise ValueError(f"{field}={getattr(cfg, field)} needs the entropy; pass entropy=")
        if cfg.top_entropy_quantile < 1.0:
            raise ValueError("top_entropy_quantile < 1 needs the entropy; pass entropy=")


def build_token_batch(shape: torch.Size, mask: Tensor, advantages, *, old_logprobs=None, ref_logprobs=None,
                      rollout_logprobs=None, is_weights=None, cu_seqlens=None, normalizer=None,
                      cdt: torch.dtype, ref: Tensor) -> TokenBatch:
    """Checks every per-token input against the labels' ``shape`` and flattens them into a TokenBatch."""
    seq_ids, num_seqs = sequence_layout(shape, cu_seqlens, ref)
    flat_mask = mask.reshape(-1)
    return TokenBatch(
        mask=flat_mask,
        seq_ids=seq_ids,
        num_seqs=num_seqs,
        advantages=check_advantages(advantages, shape, num_seqs, seq_ids, mask, cdt, ref),
        old_logprobs=_per_token("old_logprobs", old_logprobs, shape, mask, cdt, ref, logprob=True),
        ref_logprobs=_per_token("ref_logprobs", ref_logprobs, shape, mask, cdt, ref, logprob=True),
        rollout_logprobs=_per_token("rollout_logprobs", rollout_logprobs, shape, mask, cdt, ref, logprob=True),
        is_weights=_per_token("is_weights", is_weights, shape, mask, cdt, ref, logprob=False),
        normalizer=check_normalizer(normalizer, ref.device),
    )


def check_backend_args(backend, chunk_size) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size={chunk_size!r}: must be a positive int (rows per chunk) or None")


def kept_index(mask: Tensor) -> Optional[Tensor]:
    """Indices of kept rows, or None when every row is kept. One host sync: the count is data, so it is not asked
    under torch.compile or in a CUDA graph capture (:func:`no_host_reads`), where :func:`neutralise_rows` makes
    dropped rows harmless instead."""
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return None
    index = flat.nonzero().squeeze(1)  # one sync: the size of the result
    return None if index.numel() == flat.numel() else index



def neutralise_rows(hidden2d: Tensor, labels: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Masked rows computed anyway (no gather): zero their hidden states and labels so garbage there (NaN, -100)
    cannot reach the shared weight gradient; their upstream gradients are exactly zero."""
    flat = mask.reshape(-1)
    return (torch.where(flat[:, None], hidden2d, torch.zeros((), dtype=hidden2d.dtype, device=hidden2d.device)),
            torch.where(flat, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)))
