"""The suite catches the bugs it exists for: each conformance check fails on a server that has the bug.

The GPU conformance tests (suite/conformance) judge SGLang with the check functions of
reference_impl.conformance. Here the same checks run, driven the same way, against the FAKE SGLang
(fixtures.fake_sglang) in its opt-in BUG MODES (fixtures.fake_sglang_state.BUGS), and must raise
ConformanceError on the buggy fake and pass on the normal one:

    1  hot-reload correctness          stale_adapter (OpenPipe/ART #661), serve_base (verl #5220)
    2  policy changes every step       stale_adapter, serve_base
    4  prefix cache cold after reload  keep_radix_on_reload (vllm #42125)
    6  adapter lifecycle bounded       never_unload (and a sync that never unloads: the seed PR)
    7  restart serves newest adapter   restart_without_adapter (the seed PR's restart)

The fake's "logprobs" are a deterministic function of the adapter's weight bytes and the tokens, so the
reference for an adapter is what a second, non-buggy fake with only that adapter loaded answers (on a GPU
it is HF+PEFT). Nothing here is evidence about SGLang; it is evidence that the checks can fail.
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field, replace

import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import BUGS, FakeSGLangState
from reference_impl import conformance as C
from reference_impl.client import SamplingParams, ServerHTTPError, SGLangClient
from reference_impl.conformance import ConformanceError
from reference_impl.loop import LoopConfig, rollout
from reference_impl.server import ATTENTION_ONLY, LoraPoolConfig, SGLangServer, ServerConfig
from reference_impl.sync import HotReload, Restart, SyncError, version_name
from suite.unit.adapters_for_tests import ATTENTION, make_adapter

PROMPTS = [[random.Random(n).randrange(10, 151643) for _ in range(n)] for n in (16, 33)]
LONG = [random.Random(7).randrange(10, 151643) for _ in range(64)]
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


# ---------------------------------------------------------------- the two sides of every comparison

def served_logprobs(client, lora, prompts=PROMPTS):
    """Input logprobs from position 0 (a request that never reuses the radix cache), as the GPU probes ask."""
    res = client.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0), lora=lora,
                          return_logprob=True, logprob_start_len=0)
    return [r.input_logprobs[1:len(p)] for r, p in zip(res, prompts)]


def probe(client, lora, prompt=LONG):
    """A cache-eligible greedy request (no input logprobs): (cached_tokens, output_ids, output_logprobs)."""
    r = client.generate([prompt], GREEDY, lora=lora, return_logprob=True)[0]
    return r.cached_tokens, r.output_ids, r.output_logprobs


class Reference:
    """A second, non-buggy fake: what a correct server answers for an adapter that is the only one loaded."""

    def __init__(self, client: SGLangClient):
        self.client = client

    @contextlib.contextmanager
    def _loaded(self, path):
        if path is None:
            yield None
            return
        self.client.load_lora_adapter("ref", str(path))
        try:
            yield "ref"
        finally:
            self.client.unload_lora_adapter("ref")

    def logprobs(self, path, prompts=PROMPTS):
        with self._loaded(path) as name:
            return served_logprobs(self.client, name, prompts)

    def probe(self, path, prompt=LONG):
        with self._loaded(path) as name:
            return probe(self.client, name, prompt)


def fake_state(bugs=()) -> FakeSGLangState:
    return FakeSGLangState(model_path="fake-model", enable_lora=True, max_lora_rank=16, target_modules=ATTENTION,
                           bugs=bugs)


@pytest.fixture(scope="module")
def reference():
    with FakeSGLangServer(fake_state()) as srv:
        yield Reference(SGLangClient(srv.url, timeout_s=10))


@contextlib.contextmanager
def serving(bugs=()):
    with FakeSGLangServer(fake_state(bugs)) as srv:
        yield SGLangClient(srv.url, timeout_s=10), srv.state


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[str]:
    """Six adapter versions with different weights, the same shape (so memory compares like for like)."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"a{i}", r=16, hidden=256, layers=2, seed=i) for i in range(6)]


def test_bug_modes_are_opt_in_and_named():
    assert fake_state().bugs == frozenset()
    assert set(BUGS) == {"stale_adapter", "serve_base", "keep_radix_on_reload", "never_unload",
                         "restart_without_adapter"}
    with pytest.raises(ValueError, match="unknown fake SGLang bug"):
        fake_state(bugs="stale_adaptor")


# ---------------------------------------------------------------- 1: hot-reload correctness

@dataclass
class HotReloadRun:
    served: list = field(default_factory=list)      # per adapter: served input logprobs
    references: list = field(default_factory=list)  # per adapter: the correct server's
    base: list = field(default_factory=list)        # per adapter: served base logprobs, same server


def drive_hot_reload(client, reference, paths) -> HotReloadRun:
    """As suite/conformance/test_hot_reload.py::test_served_logprobs_equal_hf_peft, one adapter after another on
    one server: load under a name, probe it and the base model, unload."""
    run = HotReloadRun()
    for i, path in enumerate(paths):
        name = f"hr-{i}"
        client.load_lora_adapter(name, path)
        try:
            run.served.append(served_logprobs(client, name))
            run.base.append(served_logprobs(client, None))
        finally:
            client.unload_lora_adapter(name)
        run.references.append(reference.logprobs(path))
    return run


def check_hot_reload(run: HotReloadRun) -> None:
    for i, (served, ref, base) in enumerate(zip(run.served, run.references, run.base)):
        noise = C.assert_matches(served, ref, f"adapter {i} vs reference")
        C.assert_differs(served, base, f"adapter {i} vs base", noise)


def test_1_hot_reload_checks_pass_on_the_normal_fake(reference, adapters):
    with serving() as (client, _):
        run = drive_hot_reload(client, reference, adapters[:3])
    check_hot_reload(run)
    assert all(C.logprob_diff(s, r).max_abs == 0 for s, r in zip(run.served, run.references))


def test_1_hot_reload_catches_a_stale_adapter(reference, adapters):
    with serving({"stale_adapter"}) as (client, _):
        run = drive_hot_reload(client, reference, adapters[:3])
    with pytest.raises(ConformanceError, match="adapter 1 vs reference: served logprobs differ"):
        check_hot_reload(run)
    with pytest.raises(ConformanceError, match="differ from the reference"):
        C.assert_matches(run.served[2], run.references[2], "adapter 2")


def test_1_hot_reload_catches_the_base_model_served(reference, adapters):
    with serving({"serve_base"}) as (client, _):
        run = drive_hot_reload(client, reference, adapters[:1])
    with pytest.raises(ConformanceError, match="adapter 0 vs reference: served logprobs differ"):
        check_hot_reload(run)
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[0], run.base[0], "adapter 0 vs base")


# ---------------------------------------------------------------- 2: the served policy changes every step

class Task:
    name = "fixed"

    def prompts(self, step, count):
        return [[10 + step, 20 + i, 30, 40, 50, 60] for i in range(count)]

    def reward(self, prompt_ids, completion_ids):
        return 0.5


@dataclass
class StepsRun:
    rollout_adapters: list = field(default_factory=list)  # per step: the set of adapters the rollout named
    currents: list = field(default_factory=list)
    retired: list = field(default_factory=list)
    models: list = field(default_factory=list)            # /v1/models after each sync
    served: list = field(default_factory=list)
    references: list = field(default_factory=list)


def drive_policy_steps(client, reference, paths) -> StepsRun:
    """As test_hot_reload.py::test_served_policy_changes_every_step: rollout on the current version, then sync
    the next one by hot reload; after every sync probe /v1/models and the served logprobs."""
    strategy = HotReload(client)
    cfg = LoopConfig(prompts_per_step=2, group_size=2, max_new_tokens=4)
    strategy.publish(0, paths[0])
    run = StepsRun()
    for step, path in enumerate(paths[1:]):
        rolls = rollout(client, strategy, Task(), cfg, step)
        run.rollout_adapters.append({r.adapter for r in rolls})
        run.retired.append(strategy.current)
        strategy.publish(step + 1, path)
        run.currents.append(strategy.current)
        run.models.append(client.models())
        run.served.append(served_logprobs(client, strategy.current))
        run.references.append(reference.logprobs(path))
    return run


def check_policy_steps(run: StepsRun) -> None:
    previous = None
    for step, served in enumerate(run.served):
        assert run.rollout_adapters[step] == {run.retired[step]}, "a rollout did not name the current adapter"
        C.assert_served(run.models[step], run.currents[step], run.retired[:step + 1])
        noise = C.assert_matches(served, run.references[step], f"step {step}")
        if previous is not None:
            C.assert_differs(served, previous, f"step {step} vs step {step - 1}", noise)
        previous = served


def test_2_policy_steps_checks_pass_on_the_normal_fake(reference, adapters):
    with serving() as (client, _):
        run = drive_policy_steps(client, reference, adapters[:4])
    check_policy_steps(run)
    assert run.currents == ["policy-v1", "policy-v2", "policy-v3"]


def test_2_policy_steps_catch_a_policy_that_never_changes(reference, adapters):
    with serving({"stale_adapter"}) as (client, _):
        run = drive_policy_steps(client, reference, adapters[:4])
    with pytest.raises(ConformanceError, match="step 0: served logprobs differ from the reference"):
        check_policy_steps(run)
    # every step serves v0's weights: consecutive versions are indistinguishable
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[1], run.served[0], "step 1 vs step 0")


def test_2_policy_steps_catch_the_base_model_served(reference, adapters):
    with serving({"serve_base"}) as (client, _):
        run = drive_policy_steps(client, reference, adapters[:3])
        base = served_logprobs(client, None)
    with pytest.raises(ConformanceError, match="step 0: served logprobs differ from the reference"):
        check_policy_steps(run)
    with pytest.raises(ConformanceError, match="the served policy did not change"):
        C.assert_differs(run.served[0], base, "policy vs base")


def test_2_a_sync_that_never_retires_versions_is_caught(reference, adapters):
    """The seed PR's bug on a correct server: old versions stay loaded (assert_served's retired list)."""
    with serving() as (client, _):
        strategy = HotReload(client, keep_previous=True)
        strategy.publish(0, adapters[0])
        strategy.publish(1, adapters[1])
        with pytest.raises(ConformanceError, match=r"retired adapters still loaded: \['policy-v0'\]"):
            C.assert_served(client.models(), strategy.current, ["policy-v0"])
        C.assert_served(client.models(), "policy-v1")
        with pytest.raises(ConformanceError, match="policy-v9 is not served"):
            C.assert_served(client.models(), "policy-v9")


# ---------------------------------------------------------------- 4: prefix cache cold after a reload

@dataclass
class CacheRun:
    warm_a: tuple = ()
    cold: tuple = ()
    warm_b: tuple = ()
    fresh: tuple = ()
    base: tuple = ()
    reference_b: tuple = ()


def drive_prefix_cache(client, reference, a, b) -> CacheRun:
    """As suite/conformance/test_prefix_cache.py::test_reload_is_cold_and_fresh_base_survives: warm the prompt
    on adapter a, reload the SAME name with b's weights, probe with the cache in play."""
    run = CacheRun()
    probe(client, None)
    client.load_lora_adapter("pc", a)
    probe(client, "pc")
    run.warm_a = probe(client, "pc")
    client.unload_lora_adapter("pc")
    client.load_lora_adapter("pc", b)  # same name, new weights
    try:
        run.cold = probe(client, "pc")
        run.warm_b = probe(client, "pc")
        client.load_lora_adapter("pc-fresh", b)
        run.fresh = probe(client, "pc-fresh")
        client.unload_lora_adapter("pc-fresh")
        run.base = probe(client, None)
    finally:
        client.unload_lora_adapter("pc")
    run.reference_b = reference.probe(b)
    return run


def check_prefix_cache(run: CacheRun) -> None:
    C.assert_warm(run.warm_a[0], len(LONG), "repeat on adapter a")
    C.assert_cold(run.cold[0], "same-name reload")
    C.assert_matches([run.cold[2]], [run.reference_b[2]], "first request after the reload vs reference")
    C.assert_warm(run.warm_b[0], len(LONG), "repeat after reload")
    C.assert_cold(run.fresh[0], "a new name")
    C.assert_matches([run.cold[2]], [run.fresh[2]], "reloaded vs freshly loaded adapter")
    C.assert_warm(run.base[0], len(LONG), "base-model entry after two reloads")


def test_4_prefix_cache_checks_pass_on_the_normal_fake(reference, adapters):
    with serving() as (client, _):
        run = drive_prefix_cache(client, reference, adapters[0], adapters[1])
    check_prefix_cache(run)
    assert run.cold[1] == run.warm_b[1] == run.fresh[1] == run.reference_b[1]


def test_4_prefix_cache_catches_stale_kv_after_a_same_name_reload(reference, adapters):
    with serving({"keep_radix_on_reload"}) as (client, _):
        run = drive_prefix_cache(client, reference, adapters[0], adapters[1])
    with pytest.raises(ConformanceError, match="same-name reload: first request on a freshly loaded adapter "
                                               "reused 63 cached tokens"):
        check_prefix_cache(run)
    # the stale KV is in what it generates too, not only in the cached_tokens count
    with pytest.raises(ConformanceError, match="differ from the reference"):
        C.assert_matches([run.cold[2]], [run.reference_b[2]], "first request after the reload")
    assert run.cold[1] != run.reference_b[1]
    # a versioned name (what HotReload does) is not affected by this bug: it starts cold and serves b
    C.assert_cold(run.fresh[0], "a new name")
    C.assert_matches([run.fresh[2]], [run.reference_b[2]], "new name vs reference")


def test_4_cold_and_warm_checks_are_not_vacuous():
    C.assert_cold(0, "x")
    with pytest.raises(ConformanceError, match="reused 5 cached tokens"):
        C.assert_cold(5, "x")
    C.assert_warm(63, 64, "x")
    with pytest.raises(ConformanceError, match="expected >= 63 cached tokens"):
        C.assert_warm(0, 64, "x")


# ---------------------------------------------------------------- 6: the adapter lifecycle stays bounded

SYNCS, MAX_GROWTH_MIB = 20, 1.0  # adapters here are 0.25 MiB each: 19 leaked versions would be ~4.75 MiB


def server_mib(client) -> float:
    """The fake's memory (weights + KV + graph + loaded adapters), where a GPU test reads NVML."""
    mem = client.memory_usage()
    return 1024 * sum(mem.get(k, 0.0) for k in ("weight", "kvcache", "graph", "lora"))


@dataclass
class LifecycleRun:
    currents: list = field(default_factory=list)
    models: list = field(default_factory=list)
    samples: list = field(default_factory=list)


def naive_publish(client):
    """A sync that trusts the server's success answers (a user's script): load v, unload v-1, verify nothing."""
    state = {"current": None}

    def publish(version, path):
        new = version_name(version)
        client.load_lora_adapter(new, path)
        old, state["current"] = state["current"], new
        if old:
            client.unload_lora_adapter(old)
        return new
    return publish


def never_unloading_publish(client):
    """The seed PR's sync: load every version, never unload."""
    def publish(version, path):
        client.load_lora_adapter(version_name(version), path)
        return version_name(version)
    return publish


def drive_lifecycle(client, publish, paths) -> LifecycleRun:
    """As suite/conformance/test_adapter_lifecycle.py: SYNCS syncs alternating two adapters, a request on each
    version, memory sampled after the first loads."""
    run = LifecycleRun()
    for v in range(SYNCS):
        current = publish(v, paths[v % 2])
        client.generate([[11, 12, 13, 14]], SamplingParams(max_new_tokens=2), lora=current)
        run.currents.append(current)
        run.models.append([m for m in client.models() if m.startswith("policy-")])
        if v >= 2:
            run.samples.append(server_mib(client))
    return run


def check_lifecycle(run: LifecycleRun) -> float:
    for v, models in enumerate(run.models):
        C.assert_adapter_count(models, 1)
        C.assert_served(models, run.currents[v], run.currents[:v])
    return C.assert_memory_flat(run.samples, MAX_GROWTH_MIB)


def test_6_lifecycle_checks_pass_on_the_normal_fake(adapters):
    with serving() as (client, state):
        strategy = HotReload(client)
        run = drive_lifecycle(client, lambda v, p: strategy.publish(v, p).adapter, adapters[:2])
        assert len(state.adapters) == 1
    assert check_lifecycle(run) == 0.0
    assert run.models[-1] == [f"policy-v{SYNCS - 1}"]
    with serving() as (client, _):
        assert check_lifecycle(drive_lifecycle(client, naive_publish(client), adapters[:2])) == 0.0


@pytest.mark.parametrize("bug", ["server never unloads", "sync never unloads"])
def test_6_lifecycle_catches_adapters_piling_up(adapters, bug):
    with serving({"never_unload"} if bug == "server never unloads" else ()) as (client, state):
        publish = naive_publish(client) if bug == "server never unloads" else never_unloading_publish(client)
        run = drive_lifecycle(client, publish, adapters[:2])
        assert len(state.adapters) == SYNCS
    with pytest.raises(ConformanceError, match="2 adapters loaded, more than the configured 1"):
        check_lifecycle(run)
    with pytest.raises(ConformanceError, match=rf"{SYNCS} adapters loaded"):
        C.assert_adapter_count(run.models[-1], 1)
    with pytest.raises(ConformanceError, match="retired adapters still loaded"):
        C.assert_served(run.models[-1], run.currents[-1], run.currents[:-1])
    with pytest.raises(ConformanceError, match="server GPU memory grew by"):
        C.assert_memory_flat(run.samples, MAX_GROWTH_MIB)


def test_6_hot_reload_itself_refuses_a_server_that_never_unloads(adapters):
    with serving({"never_unload"}) as (client, state):
        strategy = HotReload(client)
        strategy.publish(0, adapters[0])
        with pytest.raises(SyncError, match=r"unload of policy-v0 answered success but it is still loaded"):
            strategy.publish(1, adapters[1])
        assert sorted(state.loaded_adapters()) == ["policy-v0", "policy-v1"]


# ---------------------------------------------------------------- 7: a restart serves the newest adapter

@dataclass
class RestartRun:
    models: list = field(default_factory=list)
    first_cached: int | None = None
    served: list | None = None
    error: str = ""


def restart_server(tmp_path, bugs=()) -> SGLangServer:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    env = {"FAKE_SGLANG_BUG": ",".join(bugs)} if bugs else {}
    return SGLangServer(ServerConfig(python=sys.executable, model_path=str(model), launch_module="fixtures.fake_sglang",
                                     lora=LoraPoolConfig(max_rank=16, target_modules=ATTENTION_ONLY),
                                     log_dir=tmp_path / "logs", startup_timeout_s=30, extra_env=env))


def drive_restart(srv: SGLangServer, name: str, path: str) -> RestartRun:
    """As suite/conformance/test_one_gpu.py::test_restart_serves_newest_adapter_cold, the restart itself done the
    way Restart.publish does it (stop, start with --lora-paths name=path), minus Restart's own check."""
    srv.stop()
    srv.restart(lora=replace(srv.config.lora, startup_adapters={name: path}))
    run = RestartRun(models=srv.client.models())
    try:
        run.first_cached = srv.client.generate([LONG], GREEDY, lora=name)[0].cached_tokens
        run.served = served_logprobs(srv.client, name)
    except ServerHTTPError as e:
        run.error = e.error_message
    return run


def check_restart(run: RestartRun, name: str, reference_logprobs) -> None:
    C.assert_served(run.models, name)
    C.assert_cold(run.first_cached, "first request after restart")
    C.assert_matches(run.served, reference_logprobs, "restarted server vs reference")


@pytest.mark.parametrize("bugs", [(), ("restart_without_adapter",)], ids=["normal", "restart_without_adapter"])
def test_7_restart_checks(tmp_path, reference, adapters, bugs):
    srv = restart_server(tmp_path, bugs).start()
    try:
        run = drive_restart(srv, "policy-v1", adapters[1])
        if not bugs:
            check_restart(run, "policy-v1", reference.logprobs(adapters[1]))
            assert run.first_cached == 0 and not run.error
            return
        with pytest.raises(ConformanceError, match=r"policy-v1 is not served: /v1/models lists \["):
            check_restart(run, "policy-v1", reference.logprobs(adapters[1]))
        assert "never been loaded: policy-v1" in run.error  # a rollout naming it fails instead of using base
        # and the strategy itself refuses to call such a restart a sync
        strategy = Restart(srv)
        strategy.pause_for_training()
        with pytest.raises(SyncError, match="policy-v2 is not registered"):
            strategy.publish(2, adapters[2])
        assert strategy.current is None
    finally:
        srv.stop()
