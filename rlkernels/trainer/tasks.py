"""Built-in verifiable tasks, a character-level tokenizer made in code, and the reward hook.

The tasks are small enough that a tiny model learns them by reinforcement alone on a CPU in minutes, and their
rewards are exact: they are the reference trainer's proof that the fused loss trains.
"""
from __future__ import annotations

import importlib
import json
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

RewardFn = Callable[[str, str], float]


class CharTokenizer:
    """One token per character of a fixed alphabet, plus ``<pad>``, ``<bos>`` and ``<eos>``.

    Enough for the built-in tasks and offline tests; ``--model PATH`` uses the model's own tokenizer instead.
    """

    def __init__(self, alphabet: str = "0123456789+-*=>,| abcdefghijklmnopqrstuvwxyz"):
        self.alphabet = alphabet
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._ids = {ch: i + 3 for i, ch in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 3

    def encode(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.alphabet!r}")
        return [self.bos_token_id] + [self._ids[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to the first ``<eos>``; special tokens are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)

    def save_pretrained(self, path: str) -> None:
        with open(f"{path}/char_tokenizer.json", "w") as f:
            json.dump({"alphabet": self.alphabet}, f)

    @classmethod
    def from_pretrained(cls, path: str) -> "CharTokenizer":
        with open(f"{path}/char_tokenizer.json") as f:
            return cls(json.load(f)["alphabet"])


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the small interface the trainer uses."""

    def __init__(self, tok):
        self.tok = tok
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.pad_token_id, self.eos_token_id = tok.pad_token_id, tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> List[int]:
        return self.tok(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


@dataclass
class Task:
    """Prompts and their exact-match reward."""

    name: str
    make_prompt: Callable[[random.Random], str]
    answer: Callable[[str], str]
    max_new_tokens: int

    def reward(self, prompt: str, completion: str) -> float:
        return 1.0 if completion.strip() == self.answer(prompt) else 0.0


def _two_digit_prompt(rng: random.Random) -> str:
    return f"{rng.randrange(10)}+{rng.randrange(10)}="


def _sum_mod_10_answer(prompt: str) -> str:
    a, b = prompt[0], prompt[2]
    return str((int(a) + int(b)) % 10)


def _max_digit_answer(prompt: str) -> str:
    return str(max(int(prompt[0]), int(prompt[2])))


def _reverse_prompt(rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(3)) + ">"


def _reverse_answer(prompt: str) -> str:
    return prompt[:-1][::-1]


TASKS: Dict[str, Task] = {
    # given two digits "a+b=", answer the larger: one answer token then <eos> (a fresh model gets ~1% right). The
    # default: from scratch, the tiny model learns it to >0.9 in 800 steps on a 2-core CPU, for every seed we tried.
    "max_digit": Task("max_digit", _two_digit_prompt, _max_digit_answer, max_new_tokens=2),
    # the same prompts, answer (a + b) mod 10: a 100-entry table, much harder to find by RL alone; from scratch it
    # sits at chance for 500-2000 steps (seed-dependent) before it climbs (measured: 0.56-0.88 after 3000 steps)
    "sum_mod_10": Task("sum_mod_10", _two_digit_prompt, _sum_mod_10_answer, max_new_tokens=2),
    # reverse three digits: harder (1000 prompts, 3 tokens must all be right)
    "reverse": Task("reverse", _reverse_prompt, _reverse_answer, max_new_tokens=4),
}


def load_reward(spec: Optional[str], task: Task) -> RewardFn:
    """``module:function`` -> that callable ``reward(prompt, completion) -> float``; None -> the task's reward."""
    if spec is None:
        return task.reward
    if ":" not in spec:
        raise ValueError(f"--reward {spec!r}: expected 'module:function'")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {module} has no callable {name!r}")
    return fn
