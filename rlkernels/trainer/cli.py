"""``rlkernels-train``: the reference GRPO trainer from the command line.

Every field of :class:`rlkernels.trainer.TrainerConfig` is a flag, and so is every field of
:class:`rlkernels.PolicyLossConfig` (``--kl-coef 0.01 --clip-high 0.28 --loss-agg token-mean ...``), applied on top of
``--preset``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import List, Optional

from ..config import PRESETS, PolicyLossConfig
from .loop import TrainerConfig, loss_config
from .tasks import TASKS

HELP = {
    "model": "local path of a Hugging Face causal LM (default: a tiny model built from a config, offline)",
    "task": f"built-in verifiable task: {', '.join(sorted(TASKS))}",
    "reward": "user reward 'module:function' taking (prompt, completion) -> float",
    "preset": f"loss preset: {', '.join(sorted(PRESETS))}",
    "loss_impl": "'rlkernels' (fused loss) or 'eager' (the logits-materialising reference, for comparison)",
    "backend": "rlkernels engine: auto, torch, native, triton",
    "advantage_method": "group_advantages method: grpo, dr_grpo, rloo, lite_ppo, rpp_baseline, passk",
    "prompts_per_step": "prompts per step",
    "group_size": "sampled completions per prompt (G)",
    "temperature": "sampling temperature (the loss uses the same)",
    "top_p": "nucleus sampling; 1.0 = off",
    "max_new_tokens": "completion length limit (default: the task's)",
    "ppo_epochs": "passes over each batch of rollouts",
    "minibatches": "optimiser steps per pass",
    "schedule": "learning-rate schedule after warm-up: constant or cosine",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "resume": "continue from the latest checkpoint in --out",
    "progress": "tqdm progress bar",
}


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() == "none" else float(text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_fields(parser, cls, skip=(), dest_prefix="", help_text=None, defaults=True):
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = {bool: _bool, int: int, float: float, str: str}.get(type(default), None)
        if kind is None or "Optional" in str(f.type):
            kind = _optional_float if "float" in str(f.type) else (str if "str" in str(f.type) else int)
        text = (help_text or {}).get(f.name, "")
        parser.add_argument(flag, dest=dest_prefix + f.name, type=kind, metavar=f.name.upper(),
                            default=default if defaults else argparse.SUPPRESS,
                            help=f"{text} (default: {default})" if defaults else f"{text} (default: the preset's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlkernels-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train = p.add_argument_group("trainer")
    _add_fields(train, TrainerConfig, skip=("loss_overrides",), help_text=HELP)
    loss = p.add_argument_group("loss (PolicyLossConfig fields, applied over --preset)")
    _add_fields(loss, PolicyLossConfig, dest_prefix="loss.", defaults=False)
    return p


def parse_config(argv: Optional[List[str]] = None) -> TrainerConfig:
    args = vars(build_parser().parse_args(argv))
    overrides = {**TrainerConfig().loss_overrides,
                 **{k[len("loss."):]: v for k, v in args.items() if k.startswith("loss.")}}
    cfg = TrainerConfig(**{k: v for k, v in args.items() if not k.startswith("loss.")}, loss_overrides=overrides)
    loss_config(cfg)  # fail fast, with the field's name, before any work
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        from .loop import GRPOTrainer

        trainer = GRPOTrainer(cfg)
    except (ValueError, TypeError) as exc:
        print(f"rlkernels-train: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with trainer:
        history = trainer.train()
    wall = time.perf_counter() - t0
    last = history[-10:]
    summary = dict(steps=len(history), wall_s=round(wall, 1),
                   reward_first10=round(sum(h["reward_mean"] for h in history[:10]) / max(1, len(history[:10])), 3),
                   reward_last10=round(sum(h["reward_mean"] for h in last) / max(1, len(last)), 3),
                   step_time_s=round(sum(h["step_time_s"] for h in history) / max(1, len(history)), 3),
                   out=cfg.out)
    if trainer.rank == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
