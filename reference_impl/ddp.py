"""Launch arguments for a multi-GPU training group (DDP through torchrun).

Only the launch side exists so far: `splitrl run` trains on one GPU of the training group; a group of N
GPUs is what `torchrun_argv` would start, one process per GPU, with the group pinned before CUDA starts.
"""
from __future__ import annotations

from .devices import SplitPlan


def training_env(plan: SplitPlan) -> dict[str, str]:
    """The trainer processes see only the training group (set before CUDA initialises in them)."""
    return {"CUDA_VISIBLE_DEVICES": plan.training_cvd(), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            # NVLink multicast stays off: on shared hosts it can take the GPUs out of service
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def torchrun_argv(plan: SplitPlan, script_args: list[str], master_port: int = 29511) -> list[str]:
    if plan.mode != "split":
        raise ValueError(f"DDP training needs split mode (got {plan.mode}): the training group must be its own")
    return ["torchrun", "--standalone", f"--nproc-per-node={len(plan.training)}",
            f"--master-port={master_port}", *script_args]
