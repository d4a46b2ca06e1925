"""The reference trainer: the fused loss trains exactly like the eager one, the loop learns, the CLI works."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from rlkernels.trainer import GRPOTrainer, TrainerConfig  # noqa: E402
from rlkernels.trainer.cli import main, parse_config  # noqa: E402


def _trainer(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), progress=False, prompts_per_step=4, group_size=4, seed=0)
    base.update(kw)
    return GRPOTrainer(TrainerConfig(**base))


@pytest.mark.parametrize("preset,kw", [("dapo", dict(kl_coef=0.02)), ("gspo", {}), ("grpo", {}),
                                       ("cispo", dict(entropy_coef=0.001))])
def test_fused_and_eager_train_identically(tmp_path, preset, kw):
    """Same seed, same fixed rollouts, 5 optimiser steps: per-step losses and final parameters agree to 1e-5.

    (With a larger entropy bonus, fp32 gradients still agree to 6e-7, as closely as eager fp32 agrees with fp64,
    but AdamW's unit-size steps on near-zero gradient entries amplify that to ~2e-5 in 5 steps: see
    test_first_step_gradients_agree.)"""
    results = []
    for impl in ("eager", "rlkernels"):
        t = _trainer(tmp_path / impl, preset=preset, loss_overrides=kw, loss_impl=impl, ppo_epochs=5,
                     backend="torch")
        torch.manual_seed(1)
        r = t.rollout()  # the same rollouts for both: same seed, same initial model
        r.rewards = torch.arange(r.rewards.numel(), dtype=torch.float32) % 3  # a spread of rewards
        from rlkernels import group_advantages

        r.advantages = group_advantages(r.rewards, group_size=4)
        losses = []
        for _ in range(5):
            t.cfg.ppo_epochs = 1
            losses.append(t.update(r)["loss"])
        results.append((losses, [p.detach().clone() for p in t.model.parameters()]))
    (l_eager, p_eager), (l_fused, p_fused) = results
    for a, b in zip(l_eager, l_fused):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (l_eager, l_fused)
    assert any(abs(x) > 0 for x in l_eager)
    moved = 0.0
    for a, b, init in zip(p_eager, p_fused, GRPOTrainer(TrainerConfig(progress=False, seed=0)).model.parameters()):
        # relative in norm per tensor: Adam's steps of size ~lr on near-zero gradient entries make an elementwise
        # comparison measure Adam's sign flips, not the loss
        rel = float((a - b).norm() / a.norm())
        assert rel <= 1e-5, rel
        moved = max(moved, float((a - init).abs().max()))
    assert moved > 0, "the parameters did not change"


def test_first_step_gradients_agree(tmp_path):
    """With an entropy bonus and KL, every parameter's gradient agrees with eager's to fp32 rounding."""
    grads = []
    for impl in ("eager", "rlkernels"):
        t = _trainer(tmp_path / impl, preset="grpo", loss_overrides=dict(entropy_coef=0.01, kl_coef=0.05),
                     loss_impl=impl, backend="torch")
        torch.manual_seed(1)
        r = t.rollout()
        r.rewards = torch.arange(r.rewards.numel(), dtype=torch.float32) % 3
        from rlkernels import group_advantages

        r.advantages = group_advantages(r.rewards, group_size=4)
        t.model.train()
        loss, _ = t.loss(r)
        loss.backward()
        grads.append([p.grad.clone() for p in t.model.parameters()])
    for a, b in zip(*grads):
        assert float((a - b).norm() / a.norm()) < 2e-6


def _tiny(kind: str, **extra):
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    from rlkernels.trainer.tasks import CharTokenizer

    tok = CharTokenizer()
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    make = {"gemma2": lambda **kw: Gemma2Config(head_dim=16, **kw), "cohere": CohereConfig, "granite": GraniteConfig}
    config = make[kind](**common, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits of several units, so that a cap of 0.5 saturates
        model.get_output_embeddings().weight.mul_(20.0)
    return model, tok


def test_gemma_final_logit_softcap(tmp_path):
    """A Gemma 2 model (final_logit_softcapping in its config): the trainer reads the cap, its one-time LM-head check
    passes, and the fused update matches the eager one's gradients; without the cap the check fails, naming it."""
    grads = []
    for impl in ("eager", "rlkernels"):
        model, tok = _tiny("gemma2", final_logit_softcapping=0.5)
        cfg = TrainerConfig(out=str(tmp_path / impl), progress=False, prompts_per_step=2, group_size=2, seed=0,
                            loss_impl=impl, backend="torch", preset="dapo")
        t = GRPOTrainer(cfg, model=model, tokenizer=tok)
        assert t.softcap == 0.5 and t.check_lm_head() < 1e-4
        torch.manual_seed(1)
        r = t.rollout()
        r.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
        r.old_logprobs = t.logprobs(t.model, r) - 0.1 * r.completion_mask  # off-policy: ratios away from 1
        loss, _ = t.loss(r)
        loss.backward()
        grads.append([p.grad.clone() for p in t.model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert float((a - b).norm() / max(float(a.norm()), 1e-12)) < 1e-5
    t.softcap = None
    with pytest.raises(ValueError, match=r"differ from the model's own .* softcap=None"):
        t.check_lm_head()
    # bf16, logits up to the cap of 30 as a real Gemma's: its own cap in bf16 rounds by ~0.16 here (within the
    # check's allowance at that size, 0.94), and it is accepted; without the cap it is not
    model, tok = _tiny("gemma2", final_logit_softcapping=30.0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    t = GRPOTrainer(TrainerConfig(out=str(tmp_path / "bf16"), progress=False, backend="torch"),
                    model=model.to(torch.bfloat16), tokenizer=tok)
    t.softcap = None
    with pytest.raises(ValueError, match="differ from the model's own"):
        t.check_lm_head()


@pytest.mark.parametrize("kind,extra,scale", [("cohere", {}, 0.0625), ("granite", dict(logits_scaling=4.0), 0.25)])
def test_a_logit_scale_is_folded_into_the_temperature(tmp_path, kind, extra, scale):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling: the update, which never
    runs the LM head, takes the scale as a temperature (T / scale), so that its log-probs are the model's own at the
    sampling temperature. A scale the config does not name is refused at construction (here: the check run with
    the scale left out)."""
    from rlkernels.trainer.loop import _position_ids

    model, tok = _tiny(kind, **extra)
    cfg = TrainerConfig(out=str(tmp_path / "run"), progress=False, backend="torch", temperature=0.7,
                        prompts_per_step=2, group_size=2, seed=0)
    t = GRPOTrainer(cfg, model=model, tokenizer=tok)
    assert t.logit_scale == pytest.approx(scale) and t.temperature == pytest.approx(0.7 / scale)
    assert t.check_lm_head() < 1e-4
    torch.manual_seed(1)
    r = t.rollout()
    with torch.no_grad():
        logits = t.model(input_ids=r.input_ids, attention_mask=r.attention_mask,
                         position_ids=_position_ids(r.attention_mask)).logits.float()
    own = torch.log_softmax(logits[:, r.prompt_len - 1:-1] / 0.7, -1).gather(-1, r.labels[..., None]).squeeze(-1)
    ours = t.logprobs(t.model, r)
    keep = r.completion_mask
    assert keep.any() and float((ours - own)[keep].abs().max()) < 1e-4
    t.logit_scale = 1.0
    with pytest.raises(ValueError, match=r"differ from the model's own .* scale=1 "):
        t.check_lm_head()


def test_learning_smoke(tmp_path):
    """A few dozen steps on the built-in task: the reward rises above its starting level."""
    t = _trainer(tmp_path, max_steps=80, prompts_per_step=32, group_size=8, schedule="constant")
    history = t.train()
    first = sum(h["reward_mean"] for h in history[:10]) / 10
    last = sum(h["reward_mean"] for h in history[-10:]) / 10
    assert last > first + 0.1, (first, last)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 80
    assert {"step", "reward_mean", "loss", "kl", "entropy", "clip_frac", "step_time_s", "tokens_per_s"} <= set(rows[0])
    assert os.path.exists(tmp_path / "run" / "curves.png")


def test_resume_continues(tmp_path):
    t = _trainer(tmp_path, max_steps=2)
    t.train()
    t2 = _trainer(tmp_path, max_steps=4, resume=True)
    history = t2.train()
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert os.path.isdir(tmp_path / "run" / "checkpoint-4")
    # the resumed run logged steps 3 and 4 only (a fresh run to 4 would have appended steps 1-4 again)
    logged = [json.loads(x)["step"] for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--max-steps", "2", "--out", str(out), "--progress", "false", "--preset", "dr_grpo",
                 "--prompts-per-step", "2", "--group-size", "2", "--kl-coef", "0.01"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    cfg = parse_config(["--preset", "dapo", "--clip-low", "none", "--loss-impl", "eager"])
    assert cfg.loss_overrides == {"entropy_coef": 0.005, "clip_low": None} and cfg.loss_impl == "eager"
    assert main(["--preset", "dapo", "--clip-high", "-1"]) == 2
    assert "clip_high" in capsys.readouterr().err
    assert main(["--task", "chess"]) == 2


def test_user_reward_hook(tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("my_rewards")
    calls = []
    mod.always_one = lambda prompt, completion: calls.append((prompt, completion)) or 1.0
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    t = _trainer(tmp_path, reward="my_rewards:always_one", max_steps=1)
    r = t.rollout()
    assert torch.all(r.rewards == 1.0) and torch.all(r.advantages == 0) and len(calls) == 16


def test_torchrun_ddp(tmp_path):
    """`torchrun --nproc_per_node 2`: DDP over gloo with the global normaliser; ranks stay in sync, rank 0 logs."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "ddp_trainer_check.py")
    # --standalone: a free rendezvous port, not the fixed 29500 that another run may still hold
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, str(tmp_path)], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [open(tmp_path / f"rank{r}.txt").read().split() for r in (0, 1)]
    assert ranks[0][0] == "2" and ranks[0] == ranks[1], ranks
    assert ranks[0][2] == "0", "the trainer left its process group up after close()"
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 4


def test_torchrun_ddp_rank_failure_stops_every_rank(tmp_path):
    """One rank raising inside train() stops the job with its error: the failing rank leaves (the trainer's close()
    skips its barrier when leaving on an error; with it, that rank waited for the other, which was in another
    collective, and the job hung). The other rank then fails in its collective or is stopped by torchrun, whichever
    comes first, so only the failing rank's exit is asserted."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "ddp_trainer_check.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, str(tmp_path), "fail"], capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode != 0
    assert "rank 1's reward function failed" in run.stderr, run.stderr[-3000:]
    assert "rank 1 left train()" in run.stdout, run.stdout
