"""Data-parallel rank bodies shared by the CPU test (gloo, suite/unit/test_ddp.py) and the GPU test (NCCL,
suite/conformance/test_ddp_nccl.py). Top-level functions: torch.multiprocessing.spawn re-imports them by name."""
from __future__ import annotations

import os
import random
import socket

import torch

from reference_impl.ddp import DistContext
from reference_impl.trainer import LoraSpec, LoraTrainer, Rollout, TrainerConfig

GROUP = 4


def make_rollouts(n_groups=4):
    rng = random.Random(5)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(1000, 50000) for _ in range(6 + g)]  # ragged prompts across groups
        for i in range(GROUP):
            comp = [rng.randrange(1000, 50000) for _ in range(3 + (i % 2))]
            out.append(Rollout(prompt, comp, [-11.5] * len(comp), reward=float((g + i) % 3)))
    return out


def make_trainer(model_path, loss_type, device="cpu"):
    from reference_impl.grpo import GRPOConfig
    return LoraTrainer(TrainerConfig(model_path=model_path, dtype="float32", lr=1e-2, seed=3, device=device,
                                     lora=LoraSpec(rank=4, alpha=8, init_b_std=0.02),
                                     grpo=GRPOConfig(loss_type=loss_type, max_completion_length=8)))


def lora_state(trainer):
    return {k: v.detach().clone().cpu() for k, v in trainer.model.named_parameters() if "lora_" in k}


def lora_grads(trainer):
    """The combined gradient the optimizer stepped with (train_step zeroes grads before, not after)."""
    return {k: v.grad.detach().clone().cpu() for k, v in trainer.model.named_parameters() if "lora_" in k}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank, world, port, backend):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # before NCCL picks a device: one GPU per rank
    return DistContext.from_env(backend=backend)


def train_steps_rank(rank, world, port, model_path, loss_type, out_dir, backend="gloo", n_groups=4, steps=1):
    """`steps` GRPO steps on the same rollouts; saves the first step's combined gradient, its loss, the
    rank-spread of every step and the final LoRA weights as rank{rank}.pt."""
    dist = join_group(rank, world, port, backend)
    try:
        trainer = make_trainer(model_path, loss_type, device=f"cuda:{rank}" if backend == "nccl" else "cpu")
        stats = [trainer.train_step(make_rollouts(n_groups), GROUP, dist)]
        grads = lora_grads(trainer)
        stats += [trainer.train_step(make_rollouts(n_groups), GROUP, dist) for _ in range(steps - 1)]
        torch.save({"grads": grads, "loss": stats[0]["loss"], "state": lora_state(trainer),
                    "spreads": [s["rank_param_spread"] for s in stats]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.close()


def single_process_step(_index, model_path, loss_type, out_dir, device="cpu", n_groups=4):
    """The reference: one process, the whole batch, no process group. Spawned like the ranks, so both sides run
    the same libraries (a parent that imported Unsloth would run patched kernels)."""
    trainer = make_trainer(model_path, loss_type, device=device)
    stats = trainer.train_step(make_rollouts(n_groups), GROUP)
    torch.save({"grads": lora_grads(trainer), "loss": stats["loss"]}, f"{out_dir}/single.pt")


def spread_rank(rank, world, port, out_dir):
    """Each rank offers its own rank number: the spread must be world - 1 on every rank."""
    dist = join_group(rank, world, port, "gloo")
    try:
        torch.save(dist.spread(float(rank)), f"{out_dir}/spread{rank}.pt")
    finally:
        dist.close()


def abandoning_rank(rank, world, port, out_dir):
    """Rank 1 waits for a broadcast that never comes; rank 0 fails instead and closes with abort=True, which
    must return at once (a clean destroy would wait on rank 1). Rank 0 records how long its close took."""
    import time

    dist = join_group(rank, world, port, "gloo")
    if rank == 1:
        dist.broadcast(None)  # blocks until the parent kills this process
        return
    t0 = time.monotonic()
    dist.close(abort=True)
    torch.save(time.monotonic() - t0, f"{out_dir}/abort_s.pt")
