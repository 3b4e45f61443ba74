"""The trainer's first-use cost, paid before anything is timed.

Unsloth compiles each decoder block on the first training step of a process (14.6 s of a 15.0 s step 0 on an
H100 with qwen3-0.6b); the compiled code stays cached in the process. A benchmark that times several variants
one after another in one process would charge all of it to whichever trains first (results/README.md: the step
benchmark's split variant had step 0 at 15.0 s, the pipelined one after it 0.85 s). `warm_up_trainer` runs one
GRPO step of the benchmark's shape on a throwaway trainer, so every variant that follows starts warm, and returns
the time it took so that the cost is still recorded, as a number of its own.

    from reference_impl.warmup import warm_up_trainer
    seconds = warm_up_trainer(trainer_config, task, loop_config)
"""
from __future__ import annotations

import dataclasses
import random
import time

from .loop import LoopConfig
from .models import QWEN3_TEXT_TOKENS
from .trainer import LoraTrainer, Rollout, TrainerConfig


def warmup_rollouts(task, loop: LoopConfig, seed: int = 0) -> list[Rollout]:
    """A batch of the loop's shape (prompts x group, max_new_tokens each) without a server: random completions,
    rewarded by the task so the groups have spread (an all-equal group would skip the loss's real path)."""
    rng = random.Random(f"warmup:{seed}")
    rollouts = []
    for prompt in task.prompts(step=-1, count=loop.prompts_per_step):  # step -1: never a real step's prompts
        for _ in range(loop.group_size):
            completion = [rng.randrange(QWEN3_TEXT_TOKENS) for _ in range(loop.max_new_tokens)]
            rollouts.append(Rollout(prompt_ids=list(prompt), completion_ids=completion, sampler_logprobs=[],
                                    reward=task.reward(prompt, completion)))
    return rollouts


def warm_up_trainer(cfg: TrainerConfig, task, loop: LoopConfig, seed: int = 0) -> float:
    """One GRPO step of the loop's shape on a trainer built from `cfg` and closed afterwards; returns its wall
    seconds (model load included: that, too, is a first-use cost)."""
    t0 = time.perf_counter()
    trainer = LoraTrainer(dataclasses.replace(cfg, adapter_root=None))  # its own dir: close() removes it
    try:
        rollouts = warmup_rollouts(task, loop, seed)
        # the trainer's own logprobs stand in for the sampler's: the ratio is 1, as in an on-policy step
        logps, mask = trainer.completion_logprobs(rollouts)
        for row, rollout in zip(logps.float().cpu().tolist(), rollouts):
            rollout.sampler_logprobs = row[:len(rollout.completion_ids)]
        trainer.train_step(rollouts, loop.group_size)
    finally:
        trainer.close()
    return time.perf_counter() - t0
