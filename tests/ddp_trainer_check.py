"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: a few DDP steps of the reference trainer, then
each rank writes the world size, a checksum of its parameters (DDP must keep them identical) and whether a process
group is still up after the trainer's close() (it must not be). With the argument `fail`, rank 1's second rollout
raises instead: every rank must then stop with an error, none wait for the others."""
import sys
import time

import torch.distributed as dist

from rlkernels.trainer import GRPOTrainer, TrainerConfig

out = sys.argv[1]
fail = len(sys.argv) > 2 and sys.argv[2] == "fail"
with GRPOTrainer(TrainerConfig(out=out, progress=False, max_steps=4, prompts_per_step=4, group_size=4, seed=0)) as t:
    if fail:
        rollout = t.rollout

        def failing_rollout():
            if t.rank == 1 and t.step == 1:
                raise RuntimeError("rank 1's reward function failed")
            return rollout()

        t.rollout = failing_rollout
    t0 = time.time()
    try:
        t.train()
    finally:
        print(f"rank {t.rank} left train() after {time.time() - t0:.1f} s", flush=True)
total = sum(float(p.detach().double().sum()) for p in t.model.parameters())
with open(f"{out}/rank{t.rank}.txt", "w") as f:
    f.write(f"{t.world} {total!r} {int(dist.is_initialized())}\n")  # the trainer's close() destroyed its group
