"""Dry run of the GPU benchmark bodies on the CPU, against the FAKE SGLang and FAKE vLLM servers launched as child
processes.

The fakes (fixtures.fake_sglang, fixtures.fake_vllm) are TEST DOUBLES: these runs prove that the benchmark code
paths (server slot,
side-by-side rounds, adapters, sync strategies, rows into the results CSV) work end to end; every number
they produce is meaningless and goes to a temp CSV. pytest-benchmark is replaced by a stub, so nothing here
shows up as a benchmark. The step benchmark's body runs once with the in-process HF engine in the server's place and
the PEFT trainer on the CPU (its GPU trainer is Unsloth's).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.gpu import TEST_POOL, ServerPool
from reference_impl.devices import GpuInfo
from reference_impl.results import ResultsWriter, read_results
from reference_impl.server import ServerConfig, SGLangServer
from reference_impl.vllm_server import VLLMServer, VLLMServerConfig

from . import test_bench_merged as merged_mod
from . import test_bench_rollout as rollout_mod
from . import test_bench_sync as sync_mod
from .conftest import ServerSlot, server_overrides


class StubBenchmark:
    """The part of pytest-benchmark's fixture the benchmarks use: pedantic (warm-up, then rounds)."""

    def __init__(self):
        self.extra_info: dict = {}
        self.group = None
        self.calls = 0

    def pedantic(self, fn, rounds, iterations=1, warmup_rounds=0):
        assert iterations == 1
        for _ in range(warmup_rounds + rounds):
            fn()
            self.calls += 1


@pytest.fixture
def pool(tmp_path, model_dir):
    p = ServerPool(_fake_config("sglang", tmp_path, model_dir), recording(SGLangServer))
    yield p
    p.close()


@pytest.fixture
def vllm_pool(tmp_path, model_dir):
    p = ServerPool(_fake_config("vllm", tmp_path, model_dir), recording(VLLMServer))
    yield p
    p.close()


def _fake_config(backend: str, tmp_path, model_dir):
    # the fake child must be this checkout's (an editable install elsewhere would otherwise win)
    here = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    common = dict(python=sys.executable, model_path=str(model_dir.path), log_dir=tmp_path / "logs",
                  startup_timeout_s=60, extra_env=here)
    if backend == "vllm":
        return VLLMServerConfig(launch_module="fixtures.fake_vllm", max_lora_rank=TEST_POOL.max_rank,
                                max_loras=TEST_POOL.max_loras_per_batch, **common)
    return ServerConfig(launch_module="fixtures.fake_sglang", lora=TEST_POOL, **common)


def recording(server_cls):
    """A subclass that keeps the config of every server it starts (class attribute `launched`)."""
    class Recording(server_cls):
        launched: list = []

        def start(self):
            Recording.launched.append(self.config)
            return super().start()
    return Recording


def srv_argv(pool) -> list[str]:
    """The command line of the last server the pool launched."""
    assert pool.server_cls.launched, "the pool launched no server"
    return [str(a) for a in pool.server_cls.launched[-1].argv(0)]


@pytest.fixture(params=["sglang", "vllm"])
def backend_pool(request):
    """(backend, pool of that backend's FAKE server)."""
    return request.param, request.getfixturevalue("pool" if request.param == "sglang" else "vllm_pool")


@pytest.fixture
def plan():
    h100 = dict(uuid="GPU-fake", name="NVIDIA H100 80GB HBM3", total_mib=81559, free_mib=81559)
    return SimpleNamespace(mode="split", inference=[GpuInfo(0, 0, **h100)], training=[GpuInfo(1, 1, **h100)],
                           tp_size=1)


@pytest.fixture
def writer(tmp_path):
    return ResultsWriter(tmp_path / "dry.csv", fingerprint={})


def _rows(writer):
    df = read_results(writer.path)
    return [(m, json.loads(p)) for m, p in zip(df["metric"], df["params"])]


@pytest.mark.parametrize("variant", ["base", "lora"])
def test_rollout_body_on_the_fake(variant, backend_pool, plan, writer, tmp_path_factory, monkeypatch):
    backend, pool = backend_pool
    for name, value in dict(PROMPT_LEN=12, GEN_LEN=4, ROUNDS=2, REQUESTS_PER_SLOT=2).items():
        monkeypatch.setattr(rollout_mod, name, value)
    slot, bench = ServerSlot(pool), StubBenchmark()
    try:
        for c in (1, 3):
            rollout_mod.test_rollout_throughput(bench, "tiny", variant, c, slot, plan, writer, tmp_path_factory,
                                                backend)
    finally:
        slot.release()
    if backend == "vllm":  # the server got the backend's own flags for the variant
        argv = srv_argv(pool)
        assert "--enforce-eager" not in argv and ("--enable-lora" in argv) == (variant == "lora")
        assert ("--load-format" in argv) == (variant == "base")
    assert bench.calls == 2 * (1 + 2) and "nvml_error" in bench.extra_info  # no NVML here: recorded, not raised
    rows = _rows(writer)
    assert set(read_results(writer.path)["backend"]) == {backend}
    tput = [p for m, p in rows if m == "output_tok_s"]
    assert {(p["concurrency"], p["path"]) for p in tput} == {(1, "raw"), (1, "harness"), (3, "raw"), (3, "harness")}
    assert {p["lora"] for p in tput} == {16 if variant == "lora" else "base"}
    assert [m for m, _ in rows].count("server_start_s") == 1  # started once, reused for the second concurrency
    assert {"mbu", "ttft_p50_ms", "ttft_p99_ms", "harness_over_raw_ratio", "requests_count"} <= {m for m, _ in rows}


def test_hot_reload_body_on_the_fake(backend_pool, plan, writer, adapter_factory, model_dir, tmp_path, monkeypatch):
    backend, pool = backend_pool
    monkeypatch.setattr(sync_mod, "SYNC_ROUNDS", 3)
    slot, bench = ServerSlot(pool), StubBenchmark()
    request = SimpleNamespace(getfixturevalue=lambda name: pool.get())
    sync_mod.test_hot_reload(bench, "session", 8, request, slot, adapter_factory, model_dir, plan, writer, tmp_path,
                             backend)
    served = pool.get().client.models()
    assert bench.calls == 4 and not [m for m in served if m.startswith("policy-v")]  # the last one was unloaded
    metrics = {m: p for m, p in _rows(writer)}
    assert {"sync_ms", "sync_min_ms", "sync_max_ms", "first_request_ms", "next_request_ms"} <= set(metrics)
    assert metrics["sync_ms"] == {"rank": 8, "modules": "all-linear", "rounds": 3, "stat": "median"}


def test_restart_body_on_the_fake(backend_pool, plan, writer, adapter_factory, model_dir, tmp_path):
    backend, pool = backend_pool
    bench = StubBenchmark()
    sync_mod.test_restart_fallback(bench, pool, model_dir, adapter_factory, plan, writer, tmp_path, backend)
    rows = [(m, p["cache"]) for m, p in _rows(writer) if "cache" in p]
    assert ("restart_s", "cold") in rows and ("restart_s", "warm") in rows and ("server_stop_s", "warm") in rows
    assert set(read_results(writer.path)["backend"]) == {backend}
    argv = " ".join(srv_argv(pool))  # the last restart registered the newest adapter at start
    assert ("--lora-modules" if backend == "vllm" else "--lora-paths") in argv and "policy-v" in argv


def test_release_resume_body_on_the_fake(backend_pool, plan, writer, adapter_factory, model_dir, monkeypatch):
    backend, pool = backend_pool
    monkeypatch.setattr(sync_mod, "RELEASE_ROUNDS", 2)
    # NVML stand-in: 9000 MiB before each release, 3000 once it has settled
    monkeypatch.setattr("reference_impl.sync.ReleaseResume._used_mib", lambda self: 9000.0)
    monkeypatch.setattr("reference_impl.sync.ReleaseResume._settled_mib", lambda self: 3000.0)
    slot, bench = ServerSlot(pool), StubBenchmark()
    try:
        sync_mod.test_release_resume(bench, slot, model_dir, adapter_factory, plan, writer, backend)
    finally:
        slot.release()
    argv = srv_argv(pool)
    assert ("--enable-sleep-mode" in argv) if backend == "vllm" else ("--enable-memory-saver" in argv)
    metrics = {m for m, _ in _rows(writer)}
    assert {"release_s", "resume_s", "released_mib", "sync_ms"} <= metrics
    assert bench.extra_info["released_mib"] == 6000.0


def test_merged_crossover_body_on_the_fake(pool, plan, writer, tmp_path_factory, monkeypatch):
    """The merged benchmark end to end on the tiny model (real merge, real tmpfs writes) against the fake: one
    warm-up and one measured step per (strategy, rank), every merged reply checked for the pushed version."""
    for name, value in dict(RANKS=[8], ROUNDS=1, CONCURRENCY=2, PROMPT_LEN=8, GEN_LEN=4, MEM_FRACTION=0.2).items():
        monkeypatch.setattr(merged_mod, name, value)
    slot, bench = ServerSlot(pool), StubBenchmark()
    merged_mod.test_merged_vs_hot_reload(bench, "tiny", slot, plan, writer, tmp_path_factory)
    assert slot.key is None and bench.calls == 1  # the server was released at the end
    df = read_results(writer.path)
    got = {(t, m, s) for t, m, s in zip(df["test"], df["metric"], df["strategy"])}
    for strategy in ("merged", "hot-reload"):
        assert ("sync_merged", "sync_ms", strategy) in got and ("rollout_merged", "output_tok_s", strategy) in got
        assert ("step_merged", "step_s", strategy) in got
    assert {("sync_merged", m, "merged") for m in ("merge_ms", "write_ms", "update_ms", "pause_ms")} <= got
    crossover = df[df["metric"] == "crossover_tokens_per_step"]
    assert len(crossover) == 1 and json.loads(crossover["params"].iloc[0])["rank"] == 8
    assert "crossover_reason[r8]" in bench.extra_info


def test_step_time_ratios_are_written_once_as_soon_as_both_variants_ran():
    """A step benchmark cut off by its time bound keeps the ratios of the pairs that already ran."""
    from . import test_bench_step as step

    class Writer:
        rows: list = []

        def append(self, rows):
            self.rows += rows

    w = Writer()
    for d in (step.WALL_PER_STEP_S, step.STEADY_STEP_S):
        d.clear()
    step.RATIOS_WRITTEN.clear()
    step.WALL_PER_STEP_S.update(trl_peer=8.0)
    step.STEADY_STEP_S.update(trl_peer=6.0)
    step.write_new_ratios(w)
    assert w.rows == []
    step.WALL_PER_STEP_S.update(split=4.0)
    step.STEADY_STEP_S.update(split=1.5)
    step.write_new_ratios(w)
    step.write_new_ratios(w)  # nothing new: nothing written twice
    got = {(r.params["numerator"], r.params["denominator"], r.params["stat"]): r.value for r in w.rows}
    assert got == {("split", "trl_peer", "wall_per_step"): 0.5, ("split", "trl_peer", "median_after_first"): 0.25}
    step.WALL_PER_STEP_S.update(split_pipelined=2.0)
    step.STEADY_STEP_S.update(split_pipelined=0.75)
    step.write_new_ratios(w)
    assert len(w.rows) == 6 and {r.metric for r in w.rows} == {"step_time_ratio"}


@pytest.mark.parametrize("kind,cls", [("sglang", ServerConfig), ("vllm", VLLMServerConfig)])
def test_split_step_server_overrides_fit_the_backend_config(kind, cls, model_dir):
    """The step benchmark's split server is asked for in the backend's own config names; the same for the sync
    module's own servers."""
    import dataclasses

    from . import test_bench_step as step

    base = cls(python=sys.executable, model_path="unset")
    cfg = dataclasses.replace(base, **step._split_server(kind, model_dir))
    argv = " ".join(map(str, cfg.argv(0)))
    assert str(model_dir.path) in argv and "--enable-lora" in argv
    assert f"--max-lora-rank {step.RANK}" in argv
    own = dataclasses.replace(base, **server_overrides(kind, lora=sync_mod.POOL, mem_fraction_static=0.25))
    memory = "--gpu-memory-utilization 0.25" if kind == "vllm" else "--mem-fraction-static 0.25"
    assert memory in " ".join(map(str, own.argv(0)))


@pytest.mark.parametrize("kind,cls", [("sglang", ServerConfig), ("vllm", VLLMServerConfig)])
def test_single_gpu_step_configs_fit_the_backend(kind, cls, model_dir, plan):
    """The single-GPU variants' server: on the training GPU, able to release its memory (release/resume) and to
    register the newest adapter at start (restart), in the backend's own flags."""
    from . import test_bench_step as step

    pool = SimpleNamespace(base=cls(python=sys.executable, model_path="unset", gpu_ids="0"))
    releasable = step._single_gpu_config(pool, plan, model_dir, kind, **pool.base.memory_release_changes())
    argv = " ".join(map(str, releasable.argv(0)))
    assert releasable.gpu_ids == "1" and str(model_dir.path) in argv  # plan.training[0] is GPU 1
    assert ("--enable-sleep-mode" if kind == "vllm" else "--enable-memory-saver") in argv
    cap = "--max-cudagraph-capture-size" if kind == "vllm" else "--cuda-graph-max-bs-decode"
    assert cap not in argv  # only the restart variant caps its graphs
    restart = step._single_gpu_config(pool, plan, model_dir, kind, graph_max_bs=32)
    restart = dataclasses.replace(restart, **restart.startup_adapter_changes("policy-v0", "/adapters/v0"))
    argv = " ".join(map(str, restart.argv(0)))
    assert ("--lora-modules" if kind == "vllm" else "--lora-paths") in argv and "/adapters/v0" in argv
    # the cap survives the restart's config change: every restart captures again, so every start must be capped
    assert f"{cap} 32" in argv


@pytest.mark.parametrize("server", ["sglang", "vllm"])
def test_step_variant_rows_name_the_server_backend(server, model_dir, tmp_path, monkeypatch):
    """The step body once on the CPU: the in-process HF engine stands in for the server, the PEFT trainer for
    Unsloth. Its rows must name the server's backend (the 2x H100 run of 2026-11-26 wrote "unsloth", the trainer's,
    and so matched no ratio pair), and an SGLang variant must pair with the TRL peer's step time."""
    pytest.importorskip("torch")
    import dataclasses

    from reference_impl.hf_engine import HFEngine
    from reference_impl.sync import HotReload

    from . import test_bench_step as step

    monkeypatch.setattr(step, "LOOP", dataclasses.replace(step.LOOP, steps=2, prompts_per_step=2, group_size=2,
                                                          max_new_tokens=4))
    monkeypatch.setattr(step, "trainer_backend", lambda: "peft")
    cpu_config = step._trainer_config
    monkeypatch.setattr(step, "_trainer_config", lambda *a, **k: dataclasses.replace(
        cpu_config(*a, **k), device="cpu", dtype="float32", adapter_root=str(tmp_path / "adapters")))
    for d in (step.WALL_PER_STEP_S, step.STEADY_STEP_S):
        d.clear()
    step.RATIOS_WRITTEN.clear()
    step.WALL_PER_STEP_S["trl_peer"], step.STEADY_STEP_S["trl_peer"] = 8.0, 6.0
    writer = ResultsWriter(tmp_path / "dry.csv", fingerprint={})
    engine = HFEngine(str(model_dir.path))
    step._run_variant(StubBenchmark(), writer, model_dir, engine, HotReload(engine), "split", "split", [],
                      backend=server)
    df = read_results(writer.path)
    steps = df[df["test"] == "step_split"]
    trainers = set(steps["params"].map(lambda p: json.loads(p)["trainer"]))
    assert set(steps["backend"]) == {server} and trainers == {"peft"}
    ratios = df[df["metric"] == "step_time_ratio"]
    assert len(ratios) == (2 if server == "sglang" else 0)  # vLLM's variants pair with nothing of SGLang's
