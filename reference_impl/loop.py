"""The GRPO loop that `splitrl run` drives: rollout -> reward -> train -> save -> sync, one row set per step.

Every rollout request names the strategy's current adapter; with none servable the loop refuses to roll
out (the base model is never served in its place).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .client import SamplingParams
from .sync import version_name
from .trainer import Rollout


class RolloutRefused(RuntimeError):
    pass


@dataclass
class LoopConfig:
    steps: int = 30
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    request_timeout_s: float = 300.0


@dataclass
class StepRecord:
    step: int
    adapter: str
    reward: float
    rollout_s: float
    train_s: float
    sync_ms: float
    step_s: float
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    loss: float
    clip_ratio: float
    ratio_mean: float
    equal_reward_groups: int
    extra: dict = field(default_factory=dict)
    # Pipelined runs only (reference_impl.pipeline): the trainer's idle wait for this batch, and how many
    # versions the batch's samples lag the trainer (step - sampled version; 0 in the sequential loop).
    pipelined: bool = False
    wait_s: float = 0.0
    staleness_max: int = 0
    staleness_mean: float = 0.0


def rollout(engine, strategy, task, cfg: LoopConfig, step: int) -> list[Rollout]:
    adapter = strategy.current
    if adapter is None:
        raise RolloutRefused(f"step {step}: no adapter is servable (strategy {strategy.name}); refusing to roll "
                             "out on the base model")
    prompts = task.prompts(step, cfg.prompts_per_step)
    batch = [p for p in prompts for _ in range(cfg.group_size)]  # group-contiguous, shares the prefix
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, ignore_eos=True)
    # A strategy that syncs full weights (merged) serves by the base model name: request_lora is then None,
    # and check_result proves each response came from the version it names (meta_info.weight_version).
    lora = getattr(strategy, "request_lora", adapter)
    # ... and namespaces the prefix cache by version (request_extra_key), so no prefix computed by older weights
    # can be reused even when the server could not flush its cache after the update
    extra_key = getattr(strategy, "request_extra_key", None)
    # return_logprob: the sampler's own logprobs of the completion are GRPO's old logprobs. SGLang sends them
    # only when asked; without them the trainer would have nothing to take the ratio against
    results = engine.generate(batch, sampling, lora=lora, timeout_s=cfg.request_timeout_s, return_logprob=True,
                              **({"extra_key": extra_key} if extra_key is not None else {}))
    check = getattr(strategy, "check_result", None)
    for result in results if check else ():
        check(result)
    version = getattr(strategy, "current_version", None)
    return [Rollout(p, r.output_ids, r.output_logprobs, task.reward(p, r.output_ids), r.cached_tokens, adapter,
                    version) for p, r in zip(batch, results)]


def run_loop(cfg: LoopConfig, trainer, engine, strategy, task,
             on_step: Callable[[StepRecord], None] | None = None, dist=None) -> list[StepRecord]:
    """v0 (the trainer's initial adapter) is published first; then each step trains v{n+1} and syncs it.
    With a DistContext this is rank 0: the other training ranks run `follow_loop`."""
    strategy.publish(0, str(trainer.save_adapter(version_name(0))))
    records = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        rolls = rollout(engine, strategy, task, cfg, step)
        t1 = time.perf_counter()
        paused = strategy.pause_for_training()  # one GPU: stop or release the server (nothing on a split)
        t_train = time.perf_counter()
        measure_s = paused.get("measure_s") or 0.0  # the strategy measuring itself: not part of the step
        if dist is None:  # a plain trainer needs no third argument (users' own trainers included)
            stats = trainer.train_step(rolls, cfg.group_size)
        else:
            dist.broadcast(rolls)
            stats = trainer.train_step(rolls, cfg.group_size, dist)
        path = trainer.save_adapter(version_name(step + 1))
        t2 = time.perf_counter()
        sync = strategy.publish(step + 1, str(path))
        t3 = time.perf_counter()
        rec = StepRecord(step=step, adapter=rolls[0].adapter, reward=sum(r.reward for r in rolls) / len(rolls),
                         rollout_s=t1 - t0, train_s=t2 - t_train, sync_ms=(t3 - t2) * 1e3,
                         step_s=t3 - t0 - measure_s,
                         output_tokens=sum(len(r.completion_ids) for r in rolls),
                         prompt_tokens=sum(len(r.prompt_ids) for r in rolls),
                         cached_tokens=sum(r.cached_tokens for r in rolls), loss=stats["loss"],
                         clip_ratio=stats.get("clip_ratio", 0.0), ratio_mean=stats.get("ratio_mean", 1.0),
                         equal_reward_groups=stats["equal_reward_groups"],
                         extra={**paused, **sync.extra, **rank_spread(stats),
                                **({"pause_s": t_train - t1 - measure_s} if paused else {})})
        records.append(rec)
        if on_step:
            on_step(rec)
    return records


def rank_spread(stats: dict) -> dict:
    return {"rank_spread": stats["rank_param_spread"]} if "rank_param_spread" in stats else {}


def follow_loop(cfg: LoopConfig, trainer, dist) -> None:
    """A training rank other than 0: take rank 0's rollouts each step and train on this rank's share."""
    for _ in range(cfg.steps):
        trainer.train_step(dist.broadcast(None), cfg.group_size, dist)


def print_step(total: int, out=sys.stdout) -> Callable[[StepRecord], None]:
    """A progress bar plus one line per step."""
    def show(rec: StepRecord) -> None:
        done = rec.step + 1
        bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
        pipe = (f" wait {rec.wait_s:.2f}s stale max {rec.staleness_max} mean {rec.staleness_mean:.2f}"
                if rec.pipelined else "")
        print(f"[{bar}] {done}/{total} {rec.adapter:>12} reward {rec.reward:.3f} rollout {rec.rollout_s:.2f}s "
              f"train {rec.train_s:.2f}s sync {rec.sync_ms:.0f}ms step {rec.step_s:.2f}s tokens {rec.output_tokens} "
              f"cached {rec.cached_tokens} equal-groups {rec.equal_reward_groups}{pipe}", file=out, flush=True)
    return show


STEP_METRICS = {"reward": "reward", "rollout_s": "rollout_s", "train_s": "train_s", "sync_ms": "sync_ms",
                "step_s": "step_s", "output_tokens": "output_tokens", "cached_tokens": "cached_tokens",
                "loss": "loss", "equal_reward_groups": "equal_reward_groups_count"}
PIPELINE_METRICS = {"wait_s": "train_wait_s", "staleness_max": "staleness_max_steps",
                    "staleness_mean": "staleness_mean_steps"}
# pause_s: the one-GPU strategies' stop/release before training (step_s = rollout_s + pause_s + train_s + sync_ms);
# measure_s: their NVML settle wait, left out of step_s
EXTRA_METRICS = {"restart_s": "restart_s", "start_s": "server_start_s", "release_s": "release_s",
                 "resume_s": "resume_s", "released_mib": "released_mib", "stop_s": "server_stop_s",
                 "pause_s": "pause_s", "measure_s": "measure_s", "rank_spread": "ddp_rank_param_spread"}


def step_rows(rec: StepRecord, base: dict) -> list:
    """One results row per number of the step (metric names carry their units)."""
    from .results import ResultRow

    base = dict(base)
    params = {**base.pop("params", {}), "step": rec.step}
    values = asdict(rec)
    rows = [ResultRow(metric=metric, value=float(values[key]), params=params, **base)
            for key, metric in STEP_METRICS.items()]
    rows += [ResultRow(metric=metric, value=float(values[key]), params=params, **base)
             for key, metric in PIPELINE_METRICS.items() if rec.pipelined]
    rows += [ResultRow(metric=metric, value=float(rec.extra[key]), params=params, **base)
             for key, metric in EXTRA_METRICS.items() if rec.extra.get(key) is not None]
    if rec.rollout_s > 0:  # the rollout phase's own throughput (output tokens of the whole batch)
        rows.append(ResultRow(metric="rollout_output_tok_s", value=rec.output_tokens / rec.rollout_s,
                              params=params, **base))
    return rows
