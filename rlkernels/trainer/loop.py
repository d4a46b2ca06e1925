"""A thin GRPO trainer on Hugging Face ``transformers`` that updates the policy with :func:`rlkernels.fused_grpo_loss`.

One step: prompts -> ``model.generate`` (G sampled completions per prompt) -> verifiable rewards ->
:func:`rlkernels.group_advantages` -> old / reference log-probs with :func:`rlkernels.fused_logprobs` under ``no_grad``
-> ``ppo_epochs`` x ``minibatches`` optimiser steps of the fused loss on the backbone's final hidden states and the
LM-head weight. The model's own logits are never computed during the update; ``loss_impl="eager"`` runs the same
loop with the logits-materialising reference loss, for comparison.

Under ``torchrun --nproc_per_node N`` each rank samples its own prompts, the loss is wrapped in DDP (gloo on CPU,
nccl on GPU), and every minibatch loss is divided by :func:`rlkernels.distributed.global_normalizer`, so that DDP's
gradient averaging gives exactly the gradient of the global token (or sequence) mean. Rank 0 logs and saves.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .. import reference
from ..advantages import group_advantages
from ..distributed import global_normalizer
from ..ops import fused_grpo_loss, fused_logprobs
from .tasks import TASKS, CharTokenizer, HFTokenizer, load_reward


@dataclass
class TrainerConfig:
    """Every option of the reference trainer (the CLI flags map 1:1 onto these fields)."""

    model: Optional[str] = None  # local path of an AutoModelForCausalLM; None = a tiny model built from a config
    task: str = "max_digit"
    reward: Optional[str] = None  # "module:function" reward(prompt, completion) -> float
    preset: str = "dapo"
    # PolicyLossConfig fields over the preset. The default small entropy bonus keeps the tiny model exploring:
    # without it the built-in tasks often collapse to one answer per prompt (measured: stuck at 0.1-0.5 reward)
    loss_overrides: Dict[str, Any] = field(default_factory=lambda: {"entropy_coef": 0.005})
    loss_impl: str = "rlkernels"  # or "eager"
    backend: str = "auto"
    advantage_method: str = "grpo"
    prompts_per_step: int = 32
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None: the task's
    ppo_epochs: int = 1
    minibatches: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # or "constant"
    max_grad_norm: float = 1.0
    max_steps: int = 800
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/grpo"
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    progress: bool = True
    # the tiny default model
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4


@dataclass
class Rollouts:
    """One batch of sampled completions. Sequences are [left-padded prompt | completion], prompt length ``P``."""

    input_ids: Tensor  # (B, P + C) long
    attention_mask: Tensor  # (B, P + C) long
    prompt_len: int
    completion_mask: Tensor  # (B, C) bool: completion tokens up to and including <eos>
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,)
    old_logprobs: Optional[Tensor] = None  # (B, C) fp32
    ref_logprobs: Optional[Tensor] = None  # (B, C) fp32

    @property
    def labels(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    def select(self, idx: Tensor) -> "Rollouts":
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Rollouts(self.input_ids[idx], self.attention_mask[idx], self.prompt_len, self.completion_mask[idx],
                        self.rewards[idx], self.advantages[idx], pick(self.old_logprobs), pick(self.ref_logprobs))


def tiny_model(vocab_size: int, cfg: TrainerConfig, pad_token_id: int):
    """A small Llama-style causal LM built from a config: no download, trains on a CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_heads, max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def loss_config(cfg: TrainerConfig):
    """The validated PolicyLossConfig of a run. Dr. GRPO's constant normaliser defaults to the completion length
    limit (verl's padded-length convention) when ``norm_length`` is not given."""
    from ..config import PRESETS, PolicyLossConfig

    overrides = dict(cfg.loss_overrides)
    agg = overrides.get("loss_agg", PRESETS.get(cfg.preset, {}).get("loss_agg"))
    if agg == "seq-mean-token-sum-norm" and overrides.get("norm_length") is None:
        overrides["norm_length"] = float(cfg.max_new_tokens or TASKS[cfg.task].max_new_tokens)
    return PolicyLossConfig.from_preset(cfg.preset, **overrides)


def _text_config(config):
    """The config of the language model: a multimodal config's text config, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def final_logit_softcap(config) -> Optional[float]:
    """The final-logit cap of a ``transformers`` config (Gemma 2, Gemma 4: ``final_logit_softcapping``, 30.0), also
    inside a multimodal config's text config; None for a model without one."""
    cap = getattr(_text_config(config), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def lm_head_scale(config) -> float:
    """The factor a ``transformers`` model multiplies its LM head's output by before the softmax: Cohere's
    ``logit_scale`` (0.0625), the inverse of Granite's ``logits_scaling``; 1.0 for the rest (also inside a
    multimodal config's text config). A logit scale ``s`` sampled at temperature ``T`` is the unscaled logits at
    temperature ``T / s``, which the fused functions take."""
    text = _text_config(config)
    scale = float(getattr(text, "logit_scale", None) or 1.0)
    divisor = getattr(text, "logits_scaling", None)
    return scale / float(divisor) if divisor else scale


def _position_ids(attention_mask: Tensor) -> Tensor:
    # as generate() computes them for left-padded prompts, so that training sees the positions sampling saw
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _PolicyLoss(torch.nn.Module):
    """The update's forward as a module (the policy model inside), so that DDP can wrap it: backbone -> hidden states
    of the completion positions -> the policy loss against the LM head."""

    def __init__(self, trainer: "GRPOTrainer"):
        super().__init__()
        self.model = trainer.model
        self.trainer = trainer

    def forward(self, r: Rollouts, normalizer: float):
        t = self.trainer
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        hidden = t.completion_hidden(self.model, r)
        kwargs = dict(old_logprobs=r.old_logprobs, ref_logprobs=r.ref_logprobs, config=t.loss_config,
                      normalizer=normalizer)
        if t.cfg.loss_impl == "eager":
            return reference.linear_policy_loss(hidden, weight, r.labels, r.advantages, r.completion_mask,
                                                bias=bias, temperature=t.temperature, softcap=t.softcap,
                                                **kwargs)
        out = fused_grpo_loss(hidden, weight, r.labels, r.advantages, r.completion_mask, bias=bias,
                              temperature=t.temperature, backend=t.cfg.backend, softcap=t.softcap, **kwargs)
        return out.loss, out.metrics


def _init_distributed(device: torch.device):
    """(rank, world size, started here?); starts the process group when launched by torchrun with more than one
    process and none is running yet."""
    import torch.distributed as dist

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":  # NCCL collectives run on the current device: this rank's own GPU
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), started
    return 0, 1, started


class GRPOTrainer:
    """Owns the model, optimiser and schedule; :meth:`train` runs the loop, :meth:`update` one batch of rollouts."""

    def __init__(self, cfg: TrainerConfig, model=None, tokenizer=None):
        self.cfg = cfg
        if cfg.loss_impl not in ("rlkernels", "eager"):
            raise ValueError(f"loss_impl={cfg.loss_impl!r}: choose 'rlkernels' or 'eager'")
        if cfg.task not in TASKS:
            raise ValueError(f"task={cfg.task!r}: choose one of {sorted(TASKS)}")
        self.task = TASKS[cfg.task]
        self.reward_fn = load_reward(cfg.reward, self.task)
        self.loss_config = loss_config(cfg)  # validated once, here
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.rank, self.world, self._owns_group = _init_distributed(self.device)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.rng = random.Random(cfg.seed + 1_000_003 * self.rank)  # each rank samples its own prompts
        if tokenizer is None or model is None:
            model, tokenizer = self._load(cfg)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.softcap = final_logit_softcap(self.model.config)
        self.logit_scale = lm_head_scale(self.model.config)
        # the temperature of the unscaled logits that the model samples at cfg.temperature (its logit scale folded in)
        self.temperature = cfg.temperature / self.logit_scale
        self.check_lm_head()
        torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # ... and its own completions
        self.loss_module = _PolicyLoss(self)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.loss_module = DistributedDataParallel(self.loss_module)
        self.ref_model = None
        if self.loss_config.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.history: List[Dict[str, float]] = []

    def close(self, barrier: bool = True) -> None:
        """Tear down the process group if this trainer started it (under torchrun): every rank waits for the others
        to finish (``barrier``), then destroys it. A gloo group left to the interpreter's exit sometimes aborted a
        rank there ("terminate called without an active exception"); the barrier narrows that window without closing
        it (gloo's worker thread may still be freeing the last collective's tensors when the interpreter exits: see
        ``_entry`` in tests/test_distributed.py). Safe to call twice; ``with GRPOTrainer(cfg) as
        t:`` calls it on leaving, without the barrier when leaving on an error (the other ranks are not coming: they
        fail in their next collective instead of waiting for this one)."""
        import torch.distributed as dist

        if self._owns_group and dist.is_available() and dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> "GRPOTrainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(barrier=exc_type is None)

    # -- setup ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _load(cfg: TrainerConfig):
        if cfg.model is None:
            tok = CharTokenizer()
            return tiny_model(tok.vocab_size, cfg, tok.pad_token_id), tok
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if os.path.exists(os.path.join(cfg.model, "char_tokenizer.json")):
            tok = CharTokenizer.from_pretrained(cfg.model)
        else:
            hf = AutoTokenizer.from_pretrained(cfg.model)
            hf.padding_side = "left"
            tok = HFTokenizer(hf)
        return AutoModelForCausalLM.from_pretrained(cfg.model), tok

    def _lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        if self.cfg.schedule == "cosine":
            total = max(1, self.cfg.max_steps * self.cfg.ppo_epochs * self.cfg.minibatches)
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return warm

    # -- model pieces -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def check_lm_head(self, tokens: int = 8) -> float:
        """The update never runs the model's LM head: it hands the backbone's hidden states and the head's weight to
        the fused functions (and ``loss_impl="eager"`` to the same math, eagerly), which compute
        ``softcap * tanh((hidden @ weight.T + bias) / softcap)`` (the cap read from the config, when there is one),
        and fold a logit scale read from the config (Cohere's, Granite's: :func:`lm_head_scale`) into the
        temperature. A model whose head does anything else would train on another distribution than the one it
        samples from, silently. So once, here, the log-probs of ``tokens`` positions at temperature 1 are computed
        both ways (in eval mode: no dropout); ValueError if they disagree beyond the model dtype's rounding.
        Returns the largest difference."""
        model = self.model
        weight, bias = self.lm_head(model)
        ids = torch.arange(tokens, device=self.device)[None] % weight.shape[0]
        mask = torch.ones_like(ids)
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits.float()
            hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                      position_ids=_position_ids(mask)).last_hidden_state[:, :-1]
        finally:
            model.train(was_training)
        own = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        fused = fused_logprobs(hidden, weight, ids[:, 1:], bias=bias, backend=self.cfg.backend,
                               temperature=1.0 / self.logit_scale, softcap=self.softcap)[0]
        diff = float((own - fused).abs().max())
        # the model's own half-precision logits (and its cap, computed in that dtype by HF's Gemma) round at their
        # size: 4 units of the dtype's resolution at the largest logit (bf16 at |z| = 30: 0.94); a missing scale or
        # cap moves log-probs by more (Cohere's 0.0625 scale: by units to tens)
        if weight.dtype in (torch.float32, torch.float64):
            allowed = 1e-3
        else:
            allowed = max(0.05, 4 * torch.finfo(weight.dtype).eps * float(logits.abs().max()))
        if not diff <= allowed:
            raise ValueError(
                f"the fused log-probs differ from the model's own by {diff:.3g} (allowed {allowed:.3g}): its LM head "
                f"({type(model).__name__}) computes more than softcap * tanh((hidden @ weight.T + bias) / softcap) "
                f"* scale with softcap={self.softcap} and scale={self.logit_scale:g} (a "
                "multiplier of another name?), which this trainer's update does not compute; train such a model on "
                "its own logits (rlkernels.logprobs_from_logits and rlkernels.policy_loss)")
        return diff

    def lm_head(self, model=None):
        head = (model or self.model).get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def completion_hidden(self, model, r: Rollouts) -> Tensor:
        """Final hidden states at the positions that predict the completion tokens: (B, C, H). Runs the backbone
        only (``model.base_model``), never the LM head."""
        out = model.base_model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                               position_ids=_position_ids(r.attention_mask))
        return out.last_hidden_state[:, r.prompt_len - 1: -1]

    @torch.no_grad()
    def logprobs(self, model, r: Rollouts) -> Tensor:
        weight, bias = self.lm_head(model)
        return fused_logprobs(self.completion_hidden(model, r), weight, r.labels, bias=bias,
                              temperature=self.temperature, mask=r.completion_mask, backend=self.cfg.backend,
                              softcap=self.softcap)

    # -- rollouts ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self) -> Rollouts:
        cfg, tok = self.cfg, self.tokenizer
        prompts = [self.task.make_prompt(self.rng) for _ in range(cfg.prompts_per_step)]
        encoded = [tok.encode(p) for p in prompts for _ in range(cfg.group_size)]
        P = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), P), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding
            ids[i, P - len(e):] = torch.tensor(e)
            attn[i, P - len(e):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        self.model.eval()
        seqs = self.model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p if cfg.top_p < 1.0 else None, top_k=0,
            max_new_tokens=cfg.max_new_tokens or self.task.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completion = seqs[:, P:]
        # keep tokens up to and including the first <eos>; what follows is padding
        is_eos = completion == tok.eos_token_id
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        mask = ~after_eos
        attention = torch.cat([attn, mask.long()], dim=1)
        texts = [tok.decode(c) for c in completion.tolist()]
        groups = [prompts[i // cfg.group_size] for i in range(len(texts))]
        rewards = torch.tensor([float(self.reward_fn(p, t)) for p, t in zip(groups, texts)], dtype=torch.float32)
        adv = group_advantages(rewards, group_size=cfg.group_size, method=cfg.advantage_method)
        r = Rollouts(seqs, attention, P, mask, rewards.to(self.device), adv.to(self.device))
        if cfg.ppo_epochs * cfg.minibatches > 1:  # several updates per batch: the ratio needs the sampling policy
            r.old_logprobs = self.logprobs(self.model, r)
        if self.ref_model is not None:
            r.ref_logprobs = self.logprobs(self.ref_model, r)
        return r

    # -- update -----------------------------------------------------------------------------------------------------
    def loss(self, r: Rollouts):
        """(loss, metrics) of one minibatch with the configured implementation; the denominator is global across
        data-parallel ranks (the local one when there is a single process)."""
        normalizer = global_normalizer(r.completion_mask, mode=self.loss_config)
        return self.loss_module(r, normalizer)

    def update(self, r: Rollouts) -> Dict[str, float]:
        """ppo_epochs x minibatches optimiser steps on one batch; returns the mean of their metrics."""
        cfg = self.cfg
        self.model.train()
        B = r.input_ids.shape[0]
        sums: Dict[str, float] = {}
        n = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
            for part in order.chunk(cfg.minibatches):
                loss, metrics = self.loss(r.select(part.to(self.device)))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                values = {k: float(v) for k, v in metrics.items()}
                values.update(loss=float(loss.detach()), grad_norm=float(grad_norm))
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        return {k: v / n for k, v in sums.items()}

    # -- loop -------------------------------------------------------------------------------------------------------
    def _mean_over_ranks(self, values: Dict[str, float]) -> Dict[str, float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def train(self) -> List[Dict[str, float]]:
        """Run to ``max_steps``; rank 0 writes ``metrics.jsonl``, checkpoints and ``curves.png`` into ``out``."""
        cfg = self.cfg
        main = self.rank == 0
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            self.load_checkpoint()
        bar = None
        if cfg.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="grpo", dynamic_ncols=True)
        log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if main else None
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                r = self.rollout()
                m = self.update(r)
                dt = time.perf_counter() - t0
                self.step += 1
                m = self._mean_over_ranks(dict(m, reward_mean=float(r.rewards.mean()),
                                               tokens=float(r.completion_mask.sum())))
                row = dict(step=self.step, reward_mean=m["reward_mean"], loss=m["loss"], kl=m.get("kl", 0.0),
                           entropy=m["entropy"], clip_frac=m["clip_frac"], grad_norm=m["grad_norm"],
                           lr=self.scheduler.get_last_lr()[0], step_time_s=dt,
                           tokens_per_s=m["tokens"] * self.world / dt)
                self.history.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    recent = self.history[-10:]
                    bar.set_postfix(reward=f"{sum(x['reward_mean'] for x in recent) / len(recent):.2f}",
                                    loss=f"{row['loss']:.3f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and main:
                    self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
            if bar is not None:
                bar.close()
        if main:
            self.save_checkpoint()
            plot_history(self.history, os.path.join(cfg.out, "curves.png"))
        return self.history

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        path = os.path.join(self.cfg.out, f"checkpoint-{self.step}")
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        torch.save(dict(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        step=self.step, rng=self.rng.getstate(), torch_rng=torch.get_rng_state(),
                        history=self.history), os.path.join(path, "trainer_state.pt"))
        with open(os.path.join(path, "trainer_config.json"), "w") as f:
            json.dump(asdict(self.cfg), f, indent=1)
        return path

    def load_checkpoint(self, path: Optional[str] = None) -> bool:
        """Load the latest checkpoint in ``out`` (or ``path``); False when there is none."""
        if path is None:
            found = [d for d in os.listdir(self.cfg.out) if d.startswith("checkpoint-")]
            if not found:
                return False
            path = os.path.join(self.cfg.out, max(found, key=lambda d: int(d.split("-")[1])))
        from transformers import AutoModelForCausalLM

        self.model.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        return True


def plot_history(history: List[Dict[str, float]], path: str) -> None:
    """Reward and loss curves (matplotlib, Agg) to ``path``."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    reward = [h["reward_mean"] for h in history]
    window = max(1, len(reward) // 20)
    smooth = [sum(reward[max(0, i - window + 1): i + 1]) / len(reward[max(0, i - window + 1): i + 1])
              for i in range(len(reward))]
    a.plot(steps, reward, alpha=0.3, label="per step")
    a.plot(steps, smooth, label=f"mean of {window}")
    a.set(xlabel="step", ylabel="mean reward", ylim=(-0.02, 1.02), title="reward")
    a.legend()
    b.plot(steps, [h["loss"] for h in history])
    b.set(xlabel="step", ylabel="loss", title="policy loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
