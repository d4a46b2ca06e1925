"""The no-``N x V`` promise: the largest tensor created during forward + backward stays within the chunk budget."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rlkernels as R
from rlkernels import reference as ref

from conftest import make_problem

B, T, H, V = 8, 64, 16, 4000  # N = 512 rows; N x V = 2.05M elements
CHUNK = 32  # 16 chunks: one block of logits is CHUNK x V = 128k elements


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, that any ATen op creates while active (views included, so nothing is
    missed; bytes rather than elements because the Triton interpreter copies kernel arguments as uint8 storage)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), str(func)
        return out


def _problem():
    return make_problem(B, T, H, V, dtype=torch.float32, seed=61, mask_frac=0.0)


def _allowed(rows, vocab_block):
    # bytes of one fp32 logits block, or of the gradient-sized tensors that any implementation returns (weight V x H,
    # hidden N x H); the problem is fp32
    return 4 * max(rows * vocab_block, V * H, B * T * H)


@pytest.mark.parametrize("single_pass", [True, False])
@pytest.mark.parametrize("preset", ["dapo", "gspo"])
def test_loss_never_holds_n_by_v(backend, single_pass, preset):
    # a sequence-level ratio's single pass needs chunks of whole sequences: T rows (8 chunks)
    chunk = T if single_pass and preset == "gspo" else CHUNK
    p = _problem()
    with LargestTensor() as probe:
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], ref_logprobs=p["ref_logprobs"], kl_coef=0.01,
                                entropy_coef=0.01, config=preset, backend=backend, chunk_size=chunk,
                                single_pass=single_pass)
        out.loss.backward()
    assert probe.nbytes <= _allowed(chunk, V), f"largest tensor {probe.nbytes} B from {probe.op}"
    assert probe.nbytes <= 4 * B * T * V // 8


@pytest.mark.parametrize("single_pass", [True, False])
def test_softcap_never_holds_n_by_v(backend, single_pass):
    """A final-logit cap adds per-block work (the torch engine keeps 1 - tanh^2 in a block of its own), never an
    N x V tensor."""
    p = _problem()
    with LargestTensor() as probe:
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], entropy_coef=0.01, config="dapo", backend=backend,
                                chunk_size=CHUNK, single_pass=single_pass, softcap=30.0)
        out.loss.backward()
    assert probe.nbytes <= _allowed(CHUNK, V), f"largest tensor {probe.nbytes} B from {probe.op}"


def test_vocab_blocks_under_a_tiny_budget(backend, monkeypatch):
    """With a budget smaller than one row chunk of the full vocabulary, the vocabulary is blocked too. H = 4 keeps
    the gradient-sized tensors (V x H) within one allowed block, so that a full-vocabulary chunk (16 x 4000) would
    fail the bound; 64 rows keep the interpreter's launches few."""
    budget_elems = 16 * 1000
    monkeypatch.setenv("RLKERNELS_MEMORY_BUDGET_MB", str(budget_elems * 4 / 2**20))  # 16 rows x 1000 vocab, fp32
    p = make_problem(2, 32, 4, V, dtype=torch.float32, seed=62, mask_frac=0.0)
    assert 4 * max(V * 4, 2 * 32 * 4) <= 4 * budget_elems < 4 * 16 * V  # the bound tells blocked from not
    with LargestTensor() as probe:
        logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], return_entropy=True, backend=backend,
                                     chunk_size=16)
        (logp.sum() + ent.sum()).backward()
    assert probe.nbytes <= 4 * budget_elems, f"largest tensor {probe.nbytes} B from {probe.op}"
    # and the answer is still right
    exact, exact_ent = ref.linear_logprobs(p["hidden"].detach().double(), p["weight"].detach().double(),
                                           p["labels"])
    assert torch.allclose(logp.double(), exact, atol=1e-4)
    assert torch.allclose(ent.double(), exact_ent, atol=1e-4)


def test_probe_sees_eager_logits():
    """The probe is able to fail: the eager reference does create N x V tensors."""
    p = _problem()
    with LargestTensor() as probe:
        loss, _ = ref.linear_policy_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                         config="dapo")
        loss.backward()
    assert probe.nbytes >= 4 * B * T * V


def test_vocab_blocks_are_aligned():
    """A blocked vocabulary comes in multiples of 128 entries (16-byte aligned rows in the block buffer, which the
    Triton kernels read in 16-byte vectors), within the budget, and never below the minimum block."""
    from rlkernels.engines.chunking import MIN_VOCAB_BLOCK, VOCAB_MULTIPLE, plan_chunks

    for vocab, budget, elem in ((152064, 3 * 2**20, 2), (50257, 3 * 2**20, 4), (131072, 100000, 2), (997, 2097, 4)):
        plan = plan_chunks(10**6, vocab, budget_bytes=budget, elem_bytes=elem)
        assert plan.vocab_blocked, (vocab, budget)
        assert plan.vocab_block % VOCAB_MULTIPLE == 0 and plan.vocab_block >= MIN_VOCAB_BLOCK
        assert plan.rows * plan.vocab_block * elem <= max(budget, plan.rows * MIN_VOCAB_BLOCK * elem)
