"""The pipeline's orchestration (reference_impl.pipeline) with TEST DOUBLES for the engine and the trainer: the
staleness bound, syncs only between batches, errors on either side stopping both, bounded waits, the worker
always joined. Fast (no model); the real engine and trainer run in test_pipeline.py."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from reference_impl.loop import LoopConfig, PIPELINE_METRICS, step_rows
from reference_impl.pipeline import PipelineConfig, PipelineError, check_pipelinable, run_pipelined
from reference_impl.sync import HotReload, NoSync, Restart


class FakeServer:
    """Adapter API plus generate. A generate that sees its adapter unloaded before it returns fails: a sync in
    the middle of a batch would be caught. Records which adapter served each batch."""

    def __init__(self, gen_s: float = 0.0, fail_at: int | None = None):
        self.loaded: dict[str, str] = {}
        self.gen_s, self.fail_at = gen_s, fail_at
        self.batches: list[str] = []
        self.in_flight = 0
        self.syncs_during_generate = 0

    def load_lora_adapter(self, name, path, pinned=False, timeout_s=None):
        self.syncs_during_generate += self.in_flight
        self.loaded[name] = path
        return dict(self.loaded)

    def unload_lora_adapter(self, name, timeout_s=None):
        self.syncs_during_generate += self.in_flight
        del self.loaded[name]
        return dict(self.loaded)

    def models(self):
        return list(self.loaded)

    def generate(self, batch, sampling, lora=None, timeout_s=None, return_logprob=False):
        assert return_logprob, "the rollout must ask for the sampler's logprobs (GRPO's old logprobs)"
        if self.fail_at is not None and len(self.batches) == self.fail_at:
            raise RuntimeError("engine failed on purpose")
        assert lora in self.loaded, f"{lora} not loaded: {list(self.loaded)}"
        self.in_flight += 1
        time.sleep(self.gen_s)
        self.in_flight -= 1
        assert lora in self.loaded, f"{lora} was unloaded while its batch was generating"
        self.batches.append(lora)
        return [SimpleNamespace(output_ids=[1, 2], output_logprobs=[-1.0, -1.0], cached_tokens=0) for _ in batch]


class FakeTrainer:
    def __init__(self, tmp_path, train_s: float = 0.0, fail_at: int | None = None, exc=RuntimeError):
        self.adapter_root = tmp_path
        self.train_s, self.fail_at, self.exc = train_s, fail_at, exc
        self.seen: list[list] = []

    def train_step(self, rolls, group_size):
        if self.fail_at == len(self.seen):
            raise self.exc("trainer failed on purpose")
        self.seen.append(rolls)
        time.sleep(self.train_s)
        return {"loss": 0.0, "equal_reward_groups": 0}

    def save_adapter(self, name):
        path = self.adapter_root / name
        path.mkdir(exist_ok=True)
        return path


class Task:
    def prompts(self, step, count):
        return [[step, i] for i in range(count)]

    def reward(self, prompt, completion):
        return 0.5


CFG = LoopConfig(steps=8, prompts_per_step=2, group_size=2, max_new_tokens=2)


def _workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "splitrl-rollout-worker"]


def _run(tmp_path, k, gen_s, train_s, **kw):
    server, trainer = FakeServer(gen_s), FakeTrainer(tmp_path, train_s)
    records = run_pipelined(CFG, trainer, server, HotReload(server, run_tag="t1"), Task(),
                            PipelineConfig(max_staleness=k), **kw)
    return server, trainer, records


@pytest.mark.parametrize("k", [0, 1, 2])
def test_versions_stay_within_the_staleness_bound(tmp_path, k):
    # rollouts faster than training: the worker runs ahead as far as k allows
    server, trainer, records = _run(tmp_path, k, gen_s=0.01, train_s=0.06)
    assert len(records) == CFG.steps and server.syncs_during_generate == 0
    for step, rolls in enumerate(trainer.seen):
        versions = {r.version for r in rolls}
        assert len(versions) == 1, f"step {step}: one batch mixes versions {versions}"
        (v,) = versions
        assert step - k <= v <= step, (step, v, k)
        assert {r.adapter for r in rolls} == {f"policy-t1-v{v}"}
    lags = [rec.staleness_max for rec in records]
    assert max(lags) == k, f"rollouts were faster: the worker should use the whole bound {k}, lags {lags}"
    assert list(server.loaded) == [f"policy-t1-v{CFG.steps}"], "ends on the newest version, older ones unloaded"


def test_slow_rollouts_get_fresh_versions(tmp_path):
    # training faster than rollouts: the trainer idles waiting for each batch, staleness stays within 1
    server, trainer, records = _run(tmp_path, 1, gen_s=0.06, train_s=0.0)
    assert all(r.staleness_max <= 1 for r in records)
    assert all(rec.wait_s > 0.02 for rec in records[1:]), "the trainer should wait for each slow batch"


def test_rows_carry_pipeline_metrics(tmp_path):
    _, _, records = _run(tmp_path, 1, gen_s=0.0, train_s=0.0)
    rows = step_rows(records[3], {"suite": "run", "test": "t", "backend": "hf"})
    got = {r.metric: r.value for r in rows}
    assert set(PIPELINE_METRICS.values()) <= set(got)
    assert got["staleness_max_steps"] == records[3].staleness_max


def test_worker_error_stops_the_loop_and_is_raised(tmp_path):
    server, trainer = FakeServer(gen_s=0.01, fail_at=3), FakeTrainer(tmp_path, train_s=0.01)
    with pytest.raises(RuntimeError, match="engine failed on purpose"):
        run_pipelined(CFG, trainer, server, HotReload(server), Task(), PipelineConfig(max_staleness=1))
    assert len(trainer.seen) == 3 and not _workers_alive()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_trainer_error_stops_the_worker_and_is_raised(tmp_path, exc):
    server, trainer = FakeServer(gen_s=0.01), FakeTrainer(tmp_path, fail_at=2, exc=exc)
    t0 = time.monotonic()
    with pytest.raises(exc, match="trainer failed on purpose"):
        run_pipelined(CFG, trainer, server, HotReload(server), Task(), PipelineConfig(max_staleness=1))
    assert time.monotonic() - t0 < 5 and not _workers_alive()
    assert len(server.batches) <= 2 + 1 + 1, "the worker kept generating after the trainer stopped"


def test_waits_are_bounded(tmp_path):
    server, trainer = FakeServer(gen_s=1.0), FakeTrainer(tmp_path)
    with pytest.raises(PipelineError, match="trainer waited 0s for batch 0"):
        run_pipelined(CFG, trainer, server, HotReload(server), Task(),
                      PipelineConfig(wait_timeout_s=0.2, join_timeout_s=5))
    assert not _workers_alive()


def test_strategies_that_stop_serving_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="strategy 'restart' stops serving while the trainer trains"):
        check_pipelinable(Restart(server=None))
    check_pipelinable(HotReload(FakeServer()))
    check_pipelinable(NoSync(FakeServer()))
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        PipelineConfig(max_staleness=-1)


def test_nosync_control_pipelines_on_v0(tmp_path):
    server, trainer = FakeServer(), FakeTrainer(tmp_path)
    records = run_pipelined(CFG, trainer, server, NoSync(server, run_tag="t1"), Task(), PipelineConfig(max_staleness=1))
    assert server.batches == ["policy-t1-v0"] * CFG.steps
    assert [r.staleness_max for r in records] == list(range(CFG.steps))  # the control lags more every step
