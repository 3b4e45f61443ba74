"""Pipelined split: the server samples batch n+1 while the trainer updates on batch n.

Staleness semantics (k = max_staleness; k=0 is exactly the sequential loop):

    trainer step n consumes batch n (sampled by some version v) and produces version n+1;
    batch b is sampled by the newest published version at the moment the worker starts it, and the worker
    does not start batch b before version b-k is published, so b-k <= v <= b for every sample.

One rollout worker thread generates the batches in order. Syncs happen only in that thread, BETWEEN batches,
with nothing of its own in flight: it publishes the newest saved adapter through the strategy (hot reload:
load the new version, switch, unload the old one), so a group never mixes versions and no adapter is
unloaded while a request uses it. Each sample records the version that produced it (Rollout.version).

Off-policy correction: the GRPO ratio is exp(logp_current - sampler_logprobs) with the sampler's own
logprobs from the version that produced the sample (trainer.train_step), so with one-step staleness the
ratio is exactly pi_{n}/pi_{n-1} (the PPO ratio against the behaviour policy); see
suite/unit/test_pipeline_offpolicy.py.

Every wait is bounded (PipelineConfig); an error on either side stops the other, and the worker thread is
joined (bounded) on every exit, KeyboardInterrupt included.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .loop import LoopConfig, StepRecord, rank_spread, rollout
from .sync import version_name

# Strategies that take the server away while the trainer works: nothing could sample during training.
NOT_PIPELINABLE = ("restart", "release-resume")


class PipelineError(RuntimeError):
    pass


@dataclass
class PipelineConfig:
    max_staleness: int = 1
    wait_timeout_s: float = 900.0  # longest either side waits for the other (a slow step, not a hang)
    join_timeout_s: float = 60.0   # the worker finishes its current request within this after a stop
    poll_s: float = 0.05           # how often a waiting side checks whether the other one failed

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


def check_pipelinable(strategy) -> None:
    if not getattr(strategy, "serves_during_training", strategy.name not in NOT_PIPELINABLE):
        raise PipelineError(f"strategy {strategy.name!r} stops serving while the trainer trains, so there is "
                            "nothing to overlap: pipelining needs a split with hot reload (or the HF engine)")


@dataclass
class _Batch:
    step: int
    rolls: list
    rollout_s: float
    sync_ms: float
    sync_extra: dict


class _Versions:
    """The adapters the trainer has saved (version -> path), and a stop flag both sides watch."""

    def __init__(self):
        self._cond = threading.Condition()
        self._paths: dict[int, str] = {}
        self.stopped = False

    def add(self, version: int, path: str) -> None:
        with self._cond:
            self._paths[version] = path
            self._cond.notify_all()

    def path(self, version: int) -> str:
        with self._cond:
            return self._paths[version]

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()

    def newest_at_least(self, version: int, timeout_s: float) -> tuple[int, str] | None:
        """The newest (version, path) once some version >= `version` exists; None if stopped first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self.stopped and (not self._paths or max(self._paths) < version):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PipelineError(f"rollout worker waited {timeout_s:.0f}s for {version_name(version)} "
                                        "from the trainer")
                self._cond.wait(left)
            if self.stopped:
                return None
            newest = max(self._paths)
            return newest, self._paths[newest]


class _Worker(threading.Thread):
    """Generates batch 0..steps-1 in order; syncs to the newest saved version between batches."""

    def __init__(self, cfg: LoopConfig, pcfg: PipelineConfig, engine, strategy, task, versions: _Versions,
                 served: int):
        super().__init__(name="splitrl-rollout-worker", daemon=True)  # daemon: a stuck request can't pin exit
        self.cfg, self.pcfg, self.engine, self.strategy, self.task = cfg, pcfg, engine, strategy, task
        self.versions = versions
        self.served = served
        self.out: queue.Queue = queue.Queue(maxsize=pcfg.max_staleness + 1)
        self.error: BaseException | None = None
        torch = sys.modules.get("torch")
        self.threads = torch.get_num_threads() if torch is not None else None

    def run(self) -> None:
        torch = sys.modules.get("torch")
        if self.threads is not None and torch is not None:
            # OpenMP's thread count is per thread: a new thread starts from the default, not the caller's
            # setting. The same count keeps CPU sampling bit-identical to the sequential loop at k=0.
            torch.set_num_threads(self.threads)
        try:
            for b in range(self.cfg.steps):
                got = self.versions.newest_at_least(max(0, b - self.pcfg.max_staleness), self.pcfg.wait_timeout_s)
                if got is None:
                    return
                sync_ms, extra = 0.0, {}
                if got[0] != self.served:  # between batches: nothing of this worker is in flight
                    t0 = time.perf_counter()
                    extra = dict(self.strategy.publish(*got).extra)
                    sync_ms, self.served = (time.perf_counter() - t0) * 1e3, got[0]
                t0 = time.perf_counter()
                rolls = rollout(self.engine, self.strategy, self.task, self.cfg, b)
                if not self._put(_Batch(b, rolls, time.perf_counter() - t0, sync_ms, extra)):
                    return
        except BaseException as e:  # handed to the trainer thread, which raises it
            self.error = e
            self.versions.stop()

    def _put(self, batch: _Batch) -> bool:
        deadline = time.monotonic() + self.pcfg.wait_timeout_s
        while not self.versions.stopped:
            try:
                self.out.put(batch, timeout=self.pcfg.poll_s)
                return True
            except queue.Full:
                if time.monotonic() > deadline:
                    raise PipelineError(f"trainer took no batch for {self.pcfg.wait_timeout_s:.0f}s") from None
        return False

    def take(self, step: int) -> _Batch:
        """The trainer's side: batch `step`, or the worker's error, within the bound."""
        deadline = time.monotonic() + self.pcfg.wait_timeout_s
        while True:
            try:
                batch = self.out.get(timeout=self.pcfg.poll_s)
                if batch.step != step:
                    raise PipelineError(f"expected batch {step}, the worker sent batch {batch.step}")
                return batch
            except queue.Empty:
                if self.error is not None:
                    raise self.error
                if not self.is_alive():
                    raise PipelineError(f"rollout worker exited without producing batch {step}")
                if time.monotonic() > deadline:
                    raise PipelineError(f"trainer waited {self.pcfg.wait_timeout_s:.0f}s for batch {step}") from None


def run_pipelined(cfg: LoopConfig, trainer, engine, strategy, task, pcfg: PipelineConfig | None = None,
                  on_step: Callable[[StepRecord], None] | None = None, dist=None) -> list[StepRecord]:
    """run_loop's contract with rollouts overlapping training. With a DistContext this is rank 0 (the worker
    lives here only; rollouts are broadcast from this thread) and the other ranks run loop.follow_loop."""
    pcfg = pcfg or PipelineConfig()
    check_pipelinable(strategy)
    versions = _Versions()
    path0 = str(trainer.save_adapter(version_name(0)))
    strategy.publish(0, path0)  # before the worker exists: the first batch has a servable adapter
    versions.add(0, path0)
    worker = _Worker(cfg, pcfg, engine, strategy, task, versions, served=0)
    worker.start()
    records: list[StepRecord] = []
    try:
        last = time.perf_counter()
        for step in range(cfg.steps):
            batch = worker.take(step)
            t1 = time.perf_counter()
            rolls = batch.rolls
            if dist is None:
                stats = trainer.train_step(rolls, cfg.group_size)
            else:
                dist.broadcast(rolls)
                stats = trainer.train_step(rolls, cfg.group_size, dist)
            versions.add(step + 1, str(trainer.save_adapter(version_name(step + 1))))
            t2 = time.perf_counter()
            records.append(_record(step, batch, stats, wait_s=t1 - last, train_s=t2 - t1, step_s=t2 - last))
            last = t2
            if on_step:
                on_step(records[-1])
    finally:
        versions.stop()
        worker.join(pcfg.join_timeout_s)
    if worker.is_alive():
        raise PipelineError(f"rollout worker did not stop within {pcfg.join_timeout_s:.0f}s")
    if worker.error is not None:  # failed after its last batch was taken (e.g. on a late publish)
        raise worker.error
    # The worker is gone: the server ends on the newest policy, as after the sequential loop.
    final = strategy.publish(cfg.steps, versions.path(cfg.steps))
    if records:
        records[-1].extra["final_sync_ms"] = final.sync_ms
    return records


def _record(step: int, batch: _Batch, stats: dict, wait_s: float, train_s: float, step_s: float) -> StepRecord:
    rolls = batch.rolls
    lag = [step - r.version for r in rolls if r.version is not None]
    return StepRecord(step=step, adapter=rolls[0].adapter, reward=sum(r.reward for r in rolls) / len(rolls),
                      rollout_s=batch.rollout_s, train_s=train_s, sync_ms=batch.sync_ms, step_s=step_s,
                      output_tokens=sum(len(r.completion_ids) for r in rolls),
                      prompt_tokens=sum(len(r.prompt_ids) for r in rolls),
                      cached_tokens=sum(r.cached_tokens for r in rolls), loss=stats["loss"],
                      clip_ratio=stats.get("clip_ratio", 0.0), ratio_mean=stats.get("ratio_mean", 1.0),
                      equal_reward_groups=stats["equal_reward_groups"],
                      extra={**batch.sync_extra, **rank_spread(stats)},
                      pipelined=True, wait_s=wait_s, staleness_max=max(lag, default=0),
                      staleness_mean=sum(lag) / len(lag) if lag else 0.0)
