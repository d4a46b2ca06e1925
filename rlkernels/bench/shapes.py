"""Named problem sizes for the benchmark: the LM-head shapes of the models RL fine-tuning is run on.

A shape is ``M`` tokens (laid out as ``batch x seq_len``), hidden size ``H`` and vocabulary ``V``. The model presets
fix ``H`` and ``V`` (from each model's ``config.json``) and a default token count; ``--tokens`` / ``--seq-len``
change the batch, ``--hidden`` / ``--vocab`` turn any preset into a custom shape.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional


@dataclass(frozen=True)
class Shape:
    """One problem size. ``tokens = batch * seq_len``; the grpo op treats each of the ``batch`` rows as a sequence."""

    name: str
    tokens: int  # M
    hidden: int  # H
    vocab: int  # V
    seq_len: int  # T

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    def describe(self) -> str:
        return (f"{self.name}: M={self.tokens} ({self.batch}x{self.seq_len}), H={self.hidden}, V={self.vocab}")


# Default token counts: cpu-small is what one eager fwd+bwd on the 2-core CPU machine does in a few seconds;
# the model presets default to 8 sequences of 2048 tokens (16k tokens), a common GRPO micro-batch, at which eager
# fp32 logits of a 152k vocabulary are 10 GB.
SHAPES: Dict[str, Shape] = {
    "cpu-small": Shape("cpu-small", tokens=2048, hidden=1024, vocab=32000, seq_len=256),
    "qwen2.5-7b": Shape("qwen2.5-7b", tokens=16384, hidden=3584, vocab=152064, seq_len=2048),
    "llama3-8b": Shape("llama3-8b", tokens=16384, hidden=4096, vocab=128256, seq_len=2048),
    "qwen3-32b": Shape("qwen3-32b", tokens=16384, hidden=5120, vocab=151936, seq_len=2048),
}

DEFAULT_SHAPE = {"cpu": "cpu-small", "cuda": "qwen2.5-7b"}


def resolve_shape(name: str, tokens: Optional[int] = None, seq_len: Optional[int] = None,
                  hidden: Optional[int] = None, vocab: Optional[int] = None) -> Shape:
    """The preset ``name`` with the given fields replaced.

    When ``tokens`` is given without ``seq_len``, the preset's sequence length is kept if it divides the token
    count, else the tokens form one sequence. Raises ``ValueError`` naming the bad value.
    """
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}")
    base = SHAPES[name]
    for flag, value in (("--tokens", tokens), ("--seq-len", seq_len), ("--hidden", hidden), ("--vocab", vocab)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    m = base.tokens if tokens is None else tokens
    if seq_len is None:
        seq_len = base.seq_len if (m % base.seq_len == 0 and m >= base.seq_len) else m
    if m % seq_len:
        raise ValueError(f"--tokens={m} is not a multiple of --seq-len={seq_len}: tokens are laid out as "
                         f"batch x seq_len")
    custom = hidden is not None or vocab is not None
    shape = replace(base, tokens=m, seq_len=seq_len, hidden=hidden or base.hidden, vocab=vocab or base.vocab)
    return replace(shape, name=f"{name}(custom)") if custom else shape
