"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: a few DDP steps of the reference trainer, then
each rank writes the world size, a checksum of its parameters (DDP must keep them identical) and whether a process
group is still up after the trainer's close() (it must not be)."""
import sys

import torch
import torch.distributed as dist

from rlkernels.trainer import GRPOTrainer, TrainerConfig

out = sys.argv[1]
with GRPOTrainer(TrainerConfig(out=out, progress=False, max_steps=4, prompts_per_step=4, group_size=4, seed=0)) as t:
    t.train()
total = sum(float(p.detach().double().sum()) for p in t.model.parameters())
with open(f"{out}/rank{t.rank}.txt", "w") as f:
    f.write(f"{t.world} {total!r} {int(dist.is_initialized())}\n")  # the trainer's close() destroyed its group
