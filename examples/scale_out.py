"""Scaling out with rlkernels on torch.distributed. Run on CPU (gloo) or GPU (nccl):

    torchrun --nproc_per_node 2 examples/scale_out.py

1. Tensor parallel: each rank holds V/W rows of the LM head; fused_grpo_loss(..., tp_group=...) gives every rank the
   full-vocabulary loss, the full hidden-state gradient and its own shard of the weight gradient.
2. Data parallel: each rank holds different sequences (a different number of tokens); with
   normalizer=global_normalizer(...) the DDP-averaged gradient is exactly that of the global token mean.
"""
import os

import torch
import torch.distributed as dist

from rlkernels import fused_grpo_loss
from rlkernels.distributed import global_normalizer


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same full problem on every rank
    B, T, H, V = 4, 16, 64, 1024
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) / H**0.5
    labels = torch.randint(0, V, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    advantages = torch.randn(B, device=device)

    # 1. tensor parallel: this rank's contiguous shard of the vocabulary
    rows = slice(rank * V // world, (rank + 1) * V // world)
    h = hidden.clone().requires_grad_()
    w_shard = weight[rows].clone().requires_grad_()
    out = fused_grpo_loss(h, w_shard, labels, advantages, mask, config="dapo", tp_group=dist.group.WORLD)
    out.loss.backward()
    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    single = fused_grpo_loss(h1, w1, labels, advantages, mask, config="dapo")  # one device, the whole head
    single.loss.backward()
    err = max(float((h.grad - h1.grad).abs().max()), float((w_shard.grad - w1.grad[rows]).abs().max()))
    print(f"[rank {rank}] TP loss {out.loss.item():.6f} (one device: {single.loss.item():.6f}), "
          f"max gradient difference {err:.1e}")

    # 2. data parallel: rank r keeps sequences r, r+W, ...; the last sequences are shorter
    mine = list(range(rank, B, world))
    mask_dp = mask.clone()
    mask_dp[-1, T // 2:] = False
    norm = global_normalizer(mask_dp[mine])  # global kept tokens / world size
    w = weight.clone().requires_grad_()
    fused_grpo_loss(hidden[mine], w, labels[mine], advantages[mine], mask_dp[mine], config="dapo",
                    normalizer=norm).loss.backward()
    dist.all_reduce(w.grad)
    w.grad /= world  # what DDP does
    w_all = weight.clone().requires_grad_()
    fused_grpo_loss(hidden, w_all, labels, advantages, mask_dp, config="dapo").loss.backward()
    print(f"[rank {rank}] DP normalizer {norm:g}; max difference to the full-batch gradient "
          f"{float((w.grad - w_all.grad).abs().max()):.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
