"""Weight-sync strategies (reference_impl.sync) against the FAKE SGLang (fixtures.fake_sglang).

Protocol only: the fake is a test double of SGLang 0.5.14's HTTP API, so these tests check what each strategy
asks the server to do and what it verifies (versioned names, old versions unloaded, failed loads keep the old
version, bounded syncs, restarts register the newest adapter), never SGLang itself.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl.client import SamplingParams, SGLangClient
from reference_impl.job import _ServerClient
from reference_impl.loop import LoopConfig, RolloutRefused, rollout, run_loop
from reference_impl.procs import pids_in_group
from reference_impl.server import ATTENTION_ONLY, LoraPoolConfig, SGLangServer, ServerConfig
from reference_impl.sync import HotReload, NoSync, ReleaseResume, Restart, SyncError, version_name
from suite.unit.adapters_for_tests import ATTENTION, make_adapter

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = list(range(200, 216))


class CountTask:
    """The loop's task interface with no tokenizer: fixed-length prompts that change every step."""
    name = "count"

    def prompts(self, step: int, count: int) -> list[list[int]]:
        return [[1000 * step + 10 * i + k for k in range(8)] for i in range(count)]

    def reward(self, prompt_ids, completion_ids) -> float:
        return sum(t % 2 for t in completion_ids) / max(1, len(completion_ids))


class AdapterTrainer:
    """The trainer interface run_loop uses, without a model: every save writes a new small adapter."""

    def __init__(self, root: Path):
        self.root, self.steps, self.saved = root, 0, []

    def train_step(self, rolls, group_size) -> dict:
        self.steps += 1
        return {"loss": 0.0, "equal_reward_groups": 0}

    def save_adapter(self, name: str) -> Path:
        path = Path(make_adapter(self.root / name, seed=100 + self.steps))
        self.saved.append((name, path))
        return path


@pytest.fixture
def versions(tmp_path) -> list[str]:
    """Three adapter versions with different weights (v0, v1, v2)."""
    return [make_adapter(tmp_path / f"v{i}", seed=i) for i in range(3)]


def policy_models(client) -> list[str]:
    return [m for m in client.models() if m.startswith("policy-")]


def greedy_logprobs(client, lora) -> list[float]:
    return client.generate([PROMPT], GREEDY, lora=lora, return_logprob=True)[0].output_logprobs


# ---------------------------------------------------------------- hot reload

def test_hot_reload_serves_exactly_the_current_version(client, state, versions):
    strategy = HotReload(client, run_tag="t1")
    assert strategy.current is None
    seen = []
    for v, path in enumerate(versions):
        rec = strategy.publish(v, path)
        name = version_name(v, "t1")
        assert (rec.version, rec.adapter) == (v, name)
        assert rec.sync_ms > 0
        assert rec.extra["loaded_adapters"] == 1
        assert (strategy.current, strategy.current_version) == (name, v)
        assert state.loaded_adapters() == {name: path}, "the previous version was not unloaded"
        assert policy_models(client) == [name]
        assert client.models()[0] == "fake-model"  # base card first, as SGLang lists it
        seen.append(greedy_logprobs(client, strategy.current))
    assert seen[0] != seen[1] != seen[2], "each version must serve its own weights"
    assert state.counters["load"] == 3 and state.counters["unload"] == 2


def test_hot_reload_keep_previous_leaves_old_versions_loaded(client, state, versions):
    strategy = HotReload(client, keep_previous=True, run_tag="t1")
    for v, path in enumerate(versions[:2]):
        strategy.publish(v, path)
    assert sorted(state.loaded_adapters()) == ["policy-t1-v0", "policy-t1-v1"]
    assert strategy.current == "policy-t1-v1"


@pytest.mark.parametrize("bad", ["dora", "missing", "rank_above_pool", "module_outside_pool"])
def test_failed_load_keeps_serving_the_previous_version(client, state, versions, tmp_path, bad):
    bad_path = {
        "dora": lambda: make_adapter(tmp_path / "dora", use_dora=True),
        "missing": lambda: str(tmp_path / "does-not-exist"),
        "rank_above_pool": lambda: make_adapter(tmp_path / "r32", r=32),
        "module_outside_pool": lambda: make_adapter(tmp_path / "mlp", target_modules=("gate_proj",)),
    }[bad]()
    strategy = HotReload(client, run_tag="t1")
    strategy.publish(0, versions[0])
    before = greedy_logprobs(client, "policy-t1-v0")
    with pytest.raises(SyncError, match=r"policy-t1-v1.*still serving policy-t1-v0") as err:
        strategy.publish(1, bad_path)
    assert "HTTP 400" in str(err.value)
    assert (strategy.current, strategy.current_version) == ("policy-t1-v0", 0)
    assert state.loaded_adapters() == {"policy-t1-v0": versions[0]}
    assert client.health()
    assert greedy_logprobs(client, strategy.current) == before
    rec = strategy.publish(1, versions[1])  # the next good version goes through
    assert rec.adapter == strategy.current == "policy-t1-v1"
    assert policy_models(client) == ["policy-t1-v1"]


def test_load_that_answers_success_without_loading_is_a_sync_error(versions):
    class Liar:
        def load_lora_adapter(self, name, path, pinned=False, timeout_s=None):
            return {}

        def unload_lora_adapter(self, name, timeout_s=None):
            return {}

        def models(self):
            return []

    strategy = HotReload(Liar())
    with pytest.raises(SyncError, match="answered success but loaded_adapters"):
        strategy.publish(0, versions[0])
    assert strategy.current is None


def test_sync_has_a_bound(tmp_path, versions):
    """Unload waits for in-flight requests (as SGLang does); a sync that would wait longer fails by its timeout."""
    state = FakeSGLangState(enable_lora=True, max_lora_rank=16, target_modules=ATTENTION, request_delay_s=3.0)
    with FakeSGLangServer(state) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = HotReload(client, timeout_s=0.5, run_tag="t1")
        strategy.publish(0, versions[0])
        busy = threading.Thread(target=client.generate, args=([PROMPT], GREEDY), kwargs={"lora": "policy-t1-v0"},
                                daemon=True)
        busy.start()
        deadline = time.monotonic() + 5
        while not state.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(SyncError, match="no answer within 0.5s"):
            strategy.publish(1, versions[1])
        assert time.perf_counter() - t0 < 2.5, "the sync waited for the in-flight request"
        busy.join(timeout=10)


# ---------------------------------------------------------------- the control

def test_no_sync_only_ever_loads_v0(client, state, versions):
    strategy = NoSync(client, run_tag="t1")
    records = [strategy.publish(v, versions[v % 3]) for v in range(5)]
    assert state.counters["load"] == 1 and state.counters["unload"] == 0
    assert state.loaded_adapters() == {"policy-t1-v0": versions[0]}
    assert strategy.current == "policy-t1-v0" and strategy.current_version == 0
    assert [r.adapter for r in records] == ["policy-t1-v0"] * 5
    assert all(r.extra == {"skipped": 1} and r.sync_ms == 0.0 for r in records[1:])


def test_loop_names_the_current_adapter_on_every_rollout(client, state, tmp_path):
    """run_loop with hot reload on the fake: every /generate carries the current version's name."""
    names = []
    original = state.generate

    def recording(body):
        names.append(body.get("lora_path"))
        return original(body)

    state.generate = recording
    trainer = AdapterTrainer(tmp_path / "adapters")
    cfg = LoopConfig(steps=4, prompts_per_step=2, group_size=3, max_new_tokens=4)
    records = run_loop(cfg, trainer, client, HotReload(client, run_tag="t1"), CountTask())
    assert names == [f"policy-t1-v{s}" for s in range(4)]
    assert [r.adapter for r in records] == names
    assert policy_models(client) == ["policy-t1-v4"]
    assert all(r.output_tokens == 2 * 3 * 4 and r.sync_ms > 0 for r in records)


def test_rollout_carries_the_samplers_logprobs_from_the_server(client, state, tmp_path):
    """SGLang returns output logprobs only when asked: the rollout asks, and each sample keeps exactly the
    server's logprobs of its completion (GRPO's old logprobs)."""
    bodies = []
    original = state.generate

    def recording(body):
        bodies.append(body)
        return original(body)

    state.generate = recording
    strategy = HotReload(client, run_tag="t1")
    strategy.publish(0, str(AdapterTrainer(tmp_path / "adapters").save_adapter("policy-v0")))
    rolls = rollout(client, strategy, CountTask(), LoopConfig(prompts_per_step=2, group_size=3, max_new_tokens=5), 0)
    assert bodies and all(b.get("return_logprob") is True for b in bodies)
    assert all(len(r.sampler_logprobs) == len(r.completion_ids) == 5 for r in rolls)
    assert all(lp < 0 for r in rolls for lp in r.sampler_logprobs)


# ---------------------------------------------------------------- restart (child process)

def restart_server(tmp_path, model_dir, **kw) -> SGLangServer:
    cfg = ServerConfig(python=sys.executable, model_path=model_dir, launch_module="fixtures.fake_sglang",
                       lora=LoraPoolConfig(max_rank=16, target_modules=ATTENTION_ONLY), log_dir=tmp_path / "logs",
                       startup_timeout_s=30, **kw)
    return SGLangServer(cfg)


def test_restart_stops_for_training_and_restarts_with_the_newest_adapter(tmp_path, fake_model_dir, versions):
    srv = restart_server(tmp_path, fake_model_dir).start()
    try:
        strategy = Restart(srv)
        assert srv.client.models() == [srv.config.model_path]  # no adapter before the first publish
        rec0 = strategy.publish(0, versions[0])
        assert strategy.current == "policy-v0"
        assert rec0.extra["restart_s"] > 0 and rec0.sync_ms == pytest.approx(rec0.extra["restart_s"] * 1e3)
        group = srv.pid
        assert pids_in_group(group)

        paused = strategy.pause_for_training()
        assert paused["stop_s"] >= 0
        assert strategy.current is None
        assert pids_in_group(group) == [], "the server's process group survived the stop"
        assert not srv.client.health(timeout_s=1)
        with pytest.raises(RolloutRefused, match="no adapter is servable"):
            rollout(srv.client, strategy, CountTask(), LoopConfig(prompts_per_step=1, group_size=2), 0)

        rec1 = strategy.publish(1, versions[1])
        argv = srv.process.argv
        i = argv.index("--lora-paths")
        assert argv[i + 1] == f"policy-v1={versions[1]}", argv
        assert "policy-v0" not in " ".join(argv)
        assert policy_models(srv.client) == ["policy-v1"]
        assert strategy.current == "policy-v1" and strategy.current_version == 1
        assert rec1.extra["restart_s"] > 0 and rec1.extra["start_s"] > 0
        assert srv.pid != group
        first = srv.client.generate([PROMPT], GREEDY, lora=strategy.current)[0]
        assert first.cached_tokens == 0  # a fresh process: nothing cached
    finally:
        srv.stop()
    assert pids_in_group(srv.pid) == []


def test_restart_that_comes_back_without_the_adapter_is_a_sync_error(tmp_path, fake_model_dir, versions):
    srv = restart_server(tmp_path, fake_model_dir, extra_env={"FAKE_SGLANG_BUG": "restart_without_adapter"})
    srv.start()
    try:
        strategy = Restart(srv)
        with pytest.raises(SyncError, match="policy-v0 is not registered"):
            strategy.publish(0, versions[0])
        assert strategy.current is None  # the loop keeps refusing to roll out
    finally:
        srv.stop()


def test_loop_with_restart_follows_the_server_to_its_new_port(tmp_path, fake_model_dir):
    """Each restart picks a new port: the loop's engine must resolve the server's client per call
    (reference_impl.job._ServerClient); a client captured before the first restart is left behind."""
    srv = restart_server(tmp_path, fake_model_dir).start()
    try:
        stale = srv.client
        strategy = Restart(srv)
        trainer = AdapterTrainer(tmp_path / "adapters")
        cfg = LoopConfig(steps=3, prompts_per_step=2, group_size=2, max_new_tokens=3, request_timeout_s=10)
        records = run_loop(cfg, trainer, _ServerClient(srv), strategy, CountTask())
        assert [r.adapter for r in records] == ["policy-v0", "policy-v1", "policy-v2"]
        assert all(r.extra["restart_s"] > 0 and r.extra["stop_s"] >= 0 for r in records)
        assert policy_models(srv.client) == ["policy-v3"]
        assert stale.base_url != srv.client.base_url
        assert not stale.health(timeout_s=1)
    finally:
        srv.stop()


# ---------------------------------------------------------------- release / resume

def test_release_resume_releases_resumes_then_hot_loads(tmp_path, versions):
    state = FakeSGLangState(enable_lora=True, max_lora_rank=16, target_modules=ATTENTION, memory_saver=True)
    events = []
    set_released, load, unload = state.set_released, state.load, state.unload
    state.set_released = lambda released: (events.append("release" if released else "resume"),
                                           set_released(released))[1]
    state.load = lambda body: (events.append(f"load {body['lora_name']}"), load(body))[1]
    state.unload = lambda body, **kw: (events.append(f"unload {body['lora_name']}"), unload(body, **kw))[1]
    with FakeSGLangServer(state) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = ReleaseResume(client, run_tag="t1")
        strategy.publish(0, versions[0])
        assert events == ["load policy-t1-v0"]
        events.clear()

        paused = strategy.pause_for_training()
        assert events == ["release"] and state.released
        assert paused["release_s"] >= 0 and paused["released_mib"] is None  # no GPU index: no NVML reading
        assert client.memory_usage()["kvcache"] == 0.0
        rec = strategy.publish(1, versions[1])
        assert events == ["release", "resume", "load policy-t1-v1", "unload policy-t1-v0"]
        assert not state.released
        assert rec.extra["resume_s"] >= 0 and rec.extra["release_s"] == paused["release_s"]
        assert rec.sync_ms > 0
        assert strategy.current == "policy-t1-v1"
        assert policy_models(client) == ["policy-t1-v1"]
        assert client.generate([PROMPT], GREEDY, lora=strategy.current)[0].completion_tokens == 4

        events.clear()
        rec2 = strategy.publish(2, versions[2])  # no pause before it: no resume call
        assert events == ["load policy-t1-v2", "unload policy-t1-v1"]
        assert rec2.extra["resume_s"] == 0.0
