"""Single pass (3 GEMMs) against the two-stage recompute path (4 GEMMs) of ``fused_grpo_loss``, forward + backward,
for a preset, timed alternately in one process (median of ``--repeat``):

    python bench/single_pass.py                        # gspo, cpu-small shape (M=2048, H=1024, V=32000), fp32
    python bench/single_pass.py --preset dapo --device cuda --dtype bfloat16 --batch 16 --seq-len 1024 \\
        --hidden 3584 --vocab 152064

For sequence-level ratios (gspo, luspo) the single pass needs row chunks that hold whole sequences: it runs when the
memory budget's rows (or ``--chunk-size``) are at least ``--seq-len``; the script says which path ran.

Under ``torchrun --nproc_per_node W`` the LM head is vocab-sharded over the W ranks (``tp_group``: gloo on CPU, nccl
on GPU) and rank 0 prints the times. ``--compile`` times both paths under ``torch.compile(fullgraph=True)``, where the
single pass is the ``rlkernels::linear_fused_loss`` custom op (tensor-parallel too).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import rlkernels as R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gspo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="both paths under torch.compile(fullgraph=True), inductor")
    args = ap.parse_args()

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    B, T, H, V = args.batch, args.seq_len, args.hidden, args.vocab
    world, rank, group = int(os.environ.get("WORLD_SIZE", "1")), 0, None
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank, group = dist.get_rank(), dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(dev, dt).requires_grad_()
    full = torch.randn(V, H, generator=g) / H**0.5
    weight = full[rank * V // world:(rank + 1) * V // world].to(dev, dt).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    advantages = torch.randn(B, generator=g).to(dev)
    old = (torch.randn(B, T, generator=g) * 0.1 - 10).to(dev)

    def loss_fn(single_pass):
        def f(hidden, weight):
            return R.fused_grpo_loss(hidden, weight, labels, advantages, mask, old_logprobs=old, config=args.preset,
                                     backend=args.backend, chunk_size=args.chunk_size, single_pass=single_pass,
                                     tp_group=group).loss
        return torch.compile(f, fullgraph=True) if args.compile else f

    fns = {sp: loss_fn(sp) for sp in (None, False, True)}

    def call(single_pass):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fns[single_pass](hidden, weight).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        hidden.grad = weight.grad = None
        return time.perf_counter() - t0

    times = {None: [], False: []}
    for sp in times:  # warm-up
        call(sp)
    try:  # the default takes the single pass exactly when single_pass=True is accepted
        call(True)
        path = "single pass"
    except Exception:  # ValueError; under compile, dynamo's exception wrapping it
        path = "two-stage (the single pass does not apply here)"
    for _ in range(args.repeat):
        for sp in times:
            times[sp].append(call(sp))
    a, b = statistics.median(times[None]), statistics.median(times[False])
    if rank == 0:
        tp = f", vocab-sharded over {world} ranks" if world > 1 else ""
        print(f"{args.preset} fwd+bwd, M={B * T} (B={B}, T={T}), H={H}, V={V}{tp}, {args.dtype}, {dev.type}, "
              f"backend={args.backend}{', torch.compile' if args.compile else ''}: default ({path}) "
              f"{a * 1e3:.0f} ms, two-stage {b * 1e3:.0f} ms, "
              f"ratio {a / b:.3f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
