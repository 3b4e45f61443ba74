"""The suite catches the bug (conformance 4, 6 and 7): each check passes on the normal fake and raises on a fake
with the bug (fixtures/fake_sglang bug modes). The fake is a test double, never GPU evidence."""
import sys
from dataclasses import dataclass, field, replace

import pytest

from reference_impl import conformance as C
from reference_impl.client import SamplingParams, ServerHTTPError
from reference_impl.conformance import ConformanceError
from reference_impl.server import ATTENTION_ONLY, LoraPoolConfig, SGLangServer, ServerConfig
from reference_impl.sync import HotReload, Restart, SyncError, version_name

from .bugcatch_common import GREEDY, LONG, adapters, probe, reference, served_logprobs, serving  # noqa: F401


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
    assert run.models[-1] == [strategy.adapter_name(SYNCS - 1)]
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
        strategy = HotReload(client, run_tag="r1")
        strategy.publish(0, adapters[0])
        with pytest.raises(SyncError, match=r"unload of policy-r1-v0 answered success but it is still loaded"):
            strategy.publish(1, adapters[1])
        assert sorted(state.loaded_adapters()) == ["policy-r1-v0", "policy-r1-v1"]


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
