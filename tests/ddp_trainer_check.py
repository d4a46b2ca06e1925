"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: a few DDP steps of the reference trainer, then
each rank writes the world size and a checksum of its parameters (DDP must keep them identical)."""
import sys

import torch

from rlkernels.trainer import GRPOTrainer, TrainerConfig

out = sys.argv[1]
t = GRPOTrainer(TrainerConfig(out=out, progress=False, max_steps=4, prompts_per_step=4, group_size=4, seed=0))
t.train()
total = sum(float(p.double().sum()) for p in t.model.parameters())
with open(f"{out}/rank{t.rank}.txt", "w") as f:
    f.write(f"{t.world} {total!r}\n")
