"""`PolicyLossConfig`: every knob of the policy loss in one frozen dataclass, plus the named presets.

The meaning of each field is LOSSES.md Part A.1; the presets are A.2. A config is validated once, in
``__post_init__``, with messages that name the offending field, so nothing downstream re-checks it.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

POLICY_LOSSES = ("ppo", "cispo", "sapo", "reinforce")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ROLLOUT_CORRECTIONS = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")


def as_number(x: Any) -> Any:
    """``x`` as a Python int or float when it is a real number of another type (a NumPy scalar: ``np.float32`` is
    not a ``float``, ``np.int64`` not an ``int``); anything else (bools, tensors, strings) unchanged."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x) not in (int, float):
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    return x


def is_finite_number(x: Any) -> bool:
    # (x - x) == 0 rejects inf and nan like math.isfinite, and also works on the symbolic floats of torch.compile
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (x - x) == 0


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every knob of the rlkernels policy objective (LOSSES.md A.1). Frozen and validated on construction.

    Build one directly, from a preset (``PolicyLossConfig.from_preset("dapo", kl_coef=0.01)``), or pass a preset
    name plus keyword overrides to :func:`rlkernels.fused_grpo_loss`. ``config.replace(**changes)`` returns a
    validated copy.
    """

    policy_loss: str = "ppo"
    ratio_level: str = "token"
    clip_low: Optional[float] = 0.2
    clip_high: Optional[float] = 0.2
    dual_clip: Optional[float] = None
    log_ratio_clamp: Optional[float] = 20.0
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_straight_through: bool = False
    kl_is_corrected: bool = False
    entropy_coef: float = 0.0
    entropy_shaping_alpha: float = 0.0
    entropy_shaping_kappa: float = 2.0
    top_entropy_quantile: float = 1.0
    loss_agg: str = "token-mean"
    norm_length: Optional[float] = None
    rollout_correction: str = "none"
    rollout_cap_low: float = 0.0
    rollout_cap_high: float = 2.0
    opsm_delta: Optional[float] = None

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"PolicyLossConfig.{field}={getattr(self, field)!r}: {why}")

        def choice(field: str, options: tuple) -> None:
            if getattr(self, field) not in options:
                fail(field, f"must be one of {options}")

        def number(field: str, *, optional: bool = False, low: Optional[float] = None, strict: bool = False) -> None:
            value = as_number(getattr(self, field))
            if value is not getattr(self, field):  # a NumPy scalar: kept as the Python number it equals
                object.__setattr__(self, field, value)
            if value is None and optional:
                return
            if not is_finite_number(value):
                fail(field, "must be a finite number" + (" or None" if optional else ""))
            if low is not None and (value <= low if strict else value < low):
                fail(field, f"must be {'>' if strict else '>='} {low}")

        choice("policy_loss", POLICY_LOSSES)
        choice("ratio_level", RATIO_LEVELS)
        choice("kl_estimator", KL_ESTIMATORS)
        choice("loss_agg", LOSS_AGGS)
        choice("rollout_correction", ROLLOUT_CORRECTIONS)
        number("clip_low", optional=True, low=0.0)
        number("clip_high", optional=True, low=0.0)
        number("dual_clip", optional=True)
        number("log_ratio_clamp", optional=True, low=0.0, strict=True)
        number("sapo_tau_pos", low=0.0, strict=True)
        number("sapo_tau_neg", low=0.0, strict=True)
        number("kl_coef", low=0.0)
        number("entropy_coef")
        number("entropy_shaping_alpha", low=0.0)
        number("entropy_shaping_kappa", low=1.0, strict=True)  # kappa > 1 keeps the sign of A (B §7.10)
        number("top_entropy_quantile", low=0.0, strict=True)
        if self.top_entropy_quantile > 1.0:
            fail("top_entropy_quantile", "is the kept fraction of tokens and must be in (0, 1]; 1.0 turns it off")
        number("norm_length", optional=True, low=0.0, strict=True)
        number("rollout_cap_low", low=0.0)
        number("rollout_cap_high", low=0.0, strict=True)
        number("opsm_delta", optional=True)
        for flag in ("kl_straight_through", "kl_is_corrected"):
            if not isinstance(getattr(self, flag), bool):
                fail(flag, "must be a bool")
        if self.dual_clip is not None:
            bound = 1.0 + (self.clip_high if self.clip_high is not None else 0.0)
            if self.dual_clip <= bound:
                fail("dual_clip", f"must be > 1 + clip_high = {bound} (B §3.3); None turns it off")
        if self.loss_agg == "seq-mean-token-sum-norm" and self.norm_length is None:
            fail("norm_length", "is required for loss_agg='seq-mean-token-sum-norm' (the Dr. GRPO constant, "
                                "usually the maximum completion length)")
        if self.rollout_cap_low >= self.rollout_cap_high:
            fail("rollout_cap_low", f"must be < rollout_cap_high={self.rollout_cap_high}")

    # -- derived properties -------------------------------------------------------------------------------------
    @property
    def token_separable(self) -> bool:
        """True when each token's gradient depends only on that token's own log-prob and entropy.

        Such objectives can form ``dL/dz`` in the forward pass (the single-pass engine mode). Sequence-level ratios,
        the entropy-quantile mask and the off-policy sequence mask couple the tokens of a sequence or a batch.
        """
        return self.ratio_level == "token" and self.sequence_separable

    @property
    def sequence_separable(self) -> bool:
        """True when each token's gradient depends only on the log-probs and entropies of its own sequence
        (token-separable ones included; sequence-level ratios too). Row chunks that hold whole sequences then take
        the single pass as well."""
        return self.top_entropy_quantile >= 1.0 and self.opsm_delta is None

    def replace(self, **changes: Any) -> "PolicyLossConfig":
        """A validated copy with ``changes`` applied; unknown field names raise ``TypeError``."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "PolicyLossConfig":
        """The preset ``name`` of LOSSES.md A.2 with ``overrides`` applied on top."""
        if name not in PRESETS:
            raise ValueError(f"config={name!r} is not a preset; presets are {sorted(PRESETS)}")
        _check_fields(overrides)
        return cls(**{**PRESETS[name], **overrides})


FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyLossConfig))  # a constant that torch.compile can read
# the fields in order, split into strings and numbers (bools and optional floats included), for to_op_args
_STR_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig) if f.type == "str")
_NUM_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig) if f.type != "str")
_BOOL_FIELDS = frozenset(f.name for f in dataclasses.fields(PolicyLossConfig) if f.type == "bool")


def config_to_op_args(cfg: PolicyLossConfig) -> Tuple[str, List[float], List[bool]]:
    """``cfg`` as custom-op arguments (a ``torch.library`` schema carries no dataclass, nor a list of strings): its
    string fields joined by ``|`` (each is one of a fixed set of names), its other fields as floats (bools as 0/1,
    None as 0), and which of those are None. Plain attribute reads, which torch.compile folds into constants.
    :func:`config_from_op_args` inverts it."""
    nums = [getattr(cfg, name) for name in _NUM_FIELDS]
    return ("|".join(getattr(cfg, name) for name in _STR_FIELDS), [0.0 if x is None else float(x) for x in nums],
            [x is None for x in nums])


def config_from_op_args(strs: str, nums: Sequence[float], nones: Sequence[bool]) -> PolicyLossConfig:
    """The config that :func:`config_to_op_args` encoded (validated again on construction)."""
    values: Dict[str, Any] = dict(zip(_STR_FIELDS, strs.split("|")))
    for name, x, none in zip(_NUM_FIELDS, nums, nones):
        values[name] = None if none else (bool(x) if name in _BOOL_FIELDS else x)
    return PolicyLossConfig(**values)


def _check_fields(changes: Mapping[str, Any]) -> None:
    unknown = sorted(set(changes) - FIELDS)
    if unknown:
        raise TypeError(f"unknown PolicyLossConfig field(s) {unknown}; the fields are {sorted(FIELDS)}")


# LOSSES.md A.2. Fields not named keep the dataclass defaults.
PRESETS: Dict[str, Dict[str, Any]] = {
    "grpo": dict(loss_agg="seq-mean-token-mean"),
    "bnpo": dict(loss_agg="token-mean"),
    "dapo": dict(clip_low=0.2, clip_high=0.28, loss_agg="token-mean"),
    "dr_grpo": dict(loss_agg="seq-mean-token-sum-norm"),
    "gspo": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean"),
    "luspo": dict(ratio_level="sequence", clip_low=2e-3, clip_high=2.5e-3, loss_agg="seq-mean-token-sum"),
    "cispo": dict(policy_loss="cispo", clip_low=None, clip_high=4.0, loss_agg="token-mean"),
    "sapo": dict(policy_loss="sapo", loss_agg="seq-mean-token-mean"),
    "lite_ppo": dict(loss_agg="token-mean"),
    "ppo": dict(dual_clip=3.0, loss_agg="token-mean"),
}


def resolve_config(config: Union[str, PolicyLossConfig, None], **overrides: Any) -> PolicyLossConfig:
    """Turn ``config`` (a preset name, a ``PolicyLossConfig`` or None = "grpo") plus overrides into a config."""
    if config is None:
        config = "grpo"
    if isinstance(config, str):
        return PolicyLossConfig.from_preset(config, **overrides)
    if isinstance(config, PolicyLossConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(f"config must be a preset name or a PolicyLossConfig, got {type(config).__name__}")
