"""Data parallel training over a multi-GPU training group (torchrun, one process per GPU).

Rank 0 owns the server, the rollouts and the adapter saves; every rank gets the same rollouts (broadcast),
trains on its own whole groups, and the LoRA gradients are summed or averaged so that each rank takes the
step a single process would take on the whole batch (dapo: token sums over the batch's tokens; grpo and
dr_grpo: means over equal shards). Ranks start from the same seed, so their adapters stay identical.

    splitrl run --training-gpus 1,2,3 ...   # relaunches itself as:
    python -m torch.distributed.run --standalone --nproc-per-node=3 -m reference_impl.cli run ...
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from .devices import SplitPlan

DDP_ENV = "SPLITRL_DDP_WORKER"


def relaunch_env() -> dict[str, str]:
    """Added to the environment of the torchrun relaunch. GPUs stay visible: each rank re-plans from NVML and
    pins CUDA_VISIBLE_DEVICES to the training group itself, before CUDA starts."""
    # NVLink multicast stays off: on shared hosts it can take the GPUs out of service. The training group is on
    # one host, so NCCL's and gloo's bootstrap sockets stay on loopback unless the user chose an interface.
    from .server import LOOPBACK_COLLECTIVES_ENV
    return {**{k: os.environ.get(k, v) for k, v in LOOPBACK_COLLECTIVES_ENV.items()},
            DDP_ENV: "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def torchrun_argv(plan: SplitPlan, script_args: list[str], master_port: int = 29511) -> list[str]:
    if plan.mode != "split":
        raise ValueError(f"DDP training needs split mode (got {plan.mode}): the training group must be its own")
    # torch.distributed.run through this interpreter: the `torchrun` on PATH may belong to another env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(plan.training)}",
            f"--master-port={master_port}", *script_args]


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls, backend: str | None = None) -> "DistContext | None":
        """None outside torchrun (WORLD_SIZE unset or 1); else joins the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n_items: int, group_size: int) -> range:
        """This rank's whole groups: the same number on every rank, or a clear error."""
        groups = n_items // group_size
        if n_items % group_size or groups % self.world:
            raise ValueError(f"{groups} groups of {group_size} cannot be split evenly over {self.world} training "
                             "ranks: make the prompts per step a multiple of the training GPUs")
        per = groups // self.world * group_size
        return range(self.rank * per, (self.rank + 1) * per)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank (pickled: the rollouts are small lists)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def reduce_gradients(self, params: Sequence, average: bool) -> None:
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                continue
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if average:
                p.grad.div_(self.world)

    def sum_scalar(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64,
                         device=f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def spread(self, value: float) -> float:
        """max - min of `value` over the ranks (one all-reduce): 0 while the ranks hold identical weights."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([value, -value], dtype=torch.float64,
                         device=f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0] + t[1])

    def close(self, abort: bool = False) -> None:
        """abort: this rank is failing while the others wait in a collective that will never come. A clean
        destroy would block on them (seen with NCCL), so the communicators are aborted instead; torchrun stops
        the other ranks once this process exits with its error."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if abort:
            abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
            try:
                if abort_group is not None:
                    abort_group()
            except Exception:  # a backend without abort (gloo): exiting tears the group down
                pass
            return
        dist.destroy_process_group()
