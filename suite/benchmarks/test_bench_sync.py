"""Weight-sync costs: hot reload by rank, the restart fallback (cold and warm), release/resume of memory.

Environment (defaults in brackets):
  SPLITRL_BENCH_SYNC_RANKS    [8,16,64]   adapter ranks for hot reload (all-linear)
  SPLITRL_BENCH_SYNC_SHAPES   []          extra shapes for hot reload besides the session model (--model,
                                          tiny by default) on the shared lora_server, e.g. qwen3-1.7b
  SPLITRL_BENCH_SYNC_ROUNDS   [10]        hot reloads per rank (+1 warm-up)
  SPLITRL_BENCH_RESTART_WARM  [1]         warm restarts after the cold start
  SPLITRL_BENCH_RELEASE_ROUNDS [5]        release/resume cycles (+1 warm-up)

sync_ms           sync.HotReload.publish: load policy-v{n+1} + switch + unload policy-v{n} (idle server)
first_request_ms  a 1-token request naming the new adapter right after the sync (SGLang copies the adapter
                  into a GPU slot when it is first scheduled: that cost is here, not in sync_ms)
restart_s         server start (launch -> /health 200) with the newest adapter registered at startup (SGLang
                  --lora-paths, vLLM --lora-modules); cache=cold: first start with EMPTY Triton/Inductor (and
                  vLLM's) cache dirs made for this test;
                  cache=warm: sync.Restart stop + start again with the same (now filled) cache dirs
release_s / resume_s / released_mib
                  sync.ReleaseResume on a --enable-memory-saver --enable-weights-cpu-backup server (vLLM:
                  --enable-sleep-mode, /sleep?level=1 and /wake_up); MiB freed = NVML used memory of the inference
                  GPU before minus after the release
Every benchmark here also runs against vLLM (`--backend vllm|both`).
"""
from __future__ import annotations

import dataclasses
import itertools
import time

import pytest

from reference_impl.bench import env_int, env_ints, env_list, row_base, scalar_rows, stat_values
from reference_impl.client import SamplingParams
from reference_impl.loadgen import make_prompts
from reference_impl.server import ALL_LINEAR, LoraPoolConfig
from reference_impl.sync import HotReload, ReleaseResume, Restart

from .conftest import model_with_weights, server_overrides, watch_vram

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark]

RANKS = env_ints("SPLITRL_BENCH_SYNC_RANKS", "8,16,64")
TARGETS = ["session"] + env_list("SPLITRL_BENCH_SYNC_SHAPES", "")
SYNC_ROUNDS = env_int("SPLITRL_BENCH_SYNC_ROUNDS", 10)
WARM_RESTARTS = env_int("SPLITRL_BENCH_RESTART_WARM", 1)
RELEASE_ROUNDS = env_int("SPLITRL_BENCH_RELEASE_ROUNDS", 5)
OWN_MEM_FRACTION = 0.25  # servers of this module may run next to the session lora_server on one GPU
POOL = LoraPoolConfig(max_rank=max(RANKS + [16]), target_modules=ALL_LINEAR, max_loras_per_batch=4,
                      max_loaded_loras=8)
ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=1.0, ignore_eos=True)
_versions = itertools.count(900_000)  # names policy-v900000+: no clash with adapters other tests load


def _timed_request(client, adapter: str, seed: int, i: int) -> float:
    t = time.perf_counter()
    client.generate(make_prompts(1, 64, seed, i, purpose="sync"), ONE_TOKEN, lora=adapter, timeout_s=120)
    return (time.perf_counter() - t) * 1e3


def _two_adapters(target, rank, adapter_factory, tmp_path):
    """Two different adapters of `rank` for the target's model (alternated so each load reads new bytes)."""
    if target == "session":
        return [str(adapter_factory(rank=rank, modules=ALL_LINEAR, seed=s)) for s in (1, 2)]
    from reference_impl.adapters import make_peft_adapter

    path = str(model_with_weights(target).path)
    return [str(make_peft_adapter(path, tmp_path / f"r{rank}-{s}", rank=rank, target_modules=ALL_LINEAR, seed=s))
            for s in (1, 2)]


def _unload_quietly(client, name):
    if name:
        try:
            client.unload_lora_adapter(name, timeout_s=60)
        except Exception:  # noqa: BLE001 - cleanup must not hide the benchmark's own failure
            pass


@pytest.mark.backends("sglang", "vllm")
@pytest.mark.gpus(1)
def test_restart_fallback(benchmark, server_pool, model_dir, adapter_factory, bench_plan, results_writer, tmp_path,
                          backend):
    """Round 0 is the cold start, later rounds are warm restarts; no warm-up round (it would warm the cache)."""
    benchmark.group = f"sync-restart-{backend}"
    adapters = [str(adapter_factory(rank=16, modules=ALL_LINEAR, seed=s)) for s in (1, 2)]
    cache = tmp_path / "compile-cache"  # every compile cache the servers keep, so round 0 is really cold
    env = {**server_pool.base.extra_env, "TRITON_CACHE_DIR": str(cache / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "VLLM_CACHE_ROOT": str(cache / "vllm")}
    cfg = dataclasses.replace(server_pool.base, **server_overrides(
        backend, cuda_graphs=True, extra_env=env, lora=POOL, mem_fraction_static=OWN_MEM_FRACTION))
    srv = server_pool.server_cls(dataclasses.replace(cfg, **cfg.startup_adapter_changes("policy-v0", adapters[0])))
    strategy = Restart(srv)
    samples: list[dict] = []

    def one_round():
        i = len(samples)
        if i == 0:
            t0 = time.perf_counter()
            srv.start()
            sample = {"restart_s": time.perf_counter() - t0, "server_start_s": srv.start_s}
            assert "policy-v0" in srv.client.models()
        else:
            stop = strategy.pause_for_training()
            rec = strategy.publish(i, adapters[i % 2])
            sample = {"restart_s": rec.extra["restart_s"], "server_start_s": rec.extra["start_s"],
                      "server_stop_s": stop["stop_s"]}
        samples.append(sample)

    base = row_base("sync_restart", model_dir.name, mode=bench_plan.mode, strategy="restart", backend=backend)
    params = {"cuda_graphs": True, "rank": 16}
    try:
        with watch_vram([g.index for g in bench_plan.inference], results_writer, base, params, benchmark.extra_info):
            benchmark.pedantic(one_round, rounds=1 + WARM_RESTARTS, iterations=1, warmup_rounds=0)
    finally:
        srv.stop()
    rows = scalar_rows(base, samples[0], {**params, "cache": "cold"})
    warm = stat_values({k: [s[k] for s in samples[1:]] for k in samples[-1]}) if len(samples) > 1 else {}
    rows += scalar_rows(base, warm, {**params, "cache": "warm", "restarts": len(samples) - 1})
    results_writer.append(rows)
    benchmark.extra_info.update(cold=samples[0], warm=warm, server_log=str(srv.log_path))


@pytest.mark.backends("sglang", "vllm")
def test_release_resume(benchmark, server_slot, model_dir, adapter_factory, bench_plan, results_writer, backend):
    benchmark.group = f"sync-release-resume-{backend}"
    adapters = [str(adapter_factory(rank=16, modules=ALL_LINEAR, seed=s)) for s in (1, 2)]
    gpu = bench_plan.inference[0].index
    srv = server_slot.get(**server_slot.pool.base.memory_release_changes(),
                          **server_overrides(backend, mem_fraction_static=OWN_MEM_FRACTION))
    strategy = ReleaseResume(srv.client, gpu_index=gpu)
    strategy.publish(next(_versions), adapters[0])
    samples: list[dict] = []

    def one_round():
        paused = strategy.pause_for_training()
        rec = strategy.publish(next(_versions), adapters[len(samples) % 2])
        # the weights must be back: a request on the new adapter after resume (not timed)
        srv.client.generate(make_prompts(1, 16, 0, len(samples), purpose="resume"), ONE_TOKEN,
                            lora=strategy.current, timeout_s=120)
        samples.append({"release_s": paused["release_s"], "released_mib": paused["released_mib"],
                        "resume_s": rec.extra["resume_s"], "sync_ms": rec.sync_ms})

    base = row_base("sync_release_resume", model_dir.name, mode=bench_plan.mode, strategy="release-resume",
                    backend=backend)
    try:
        with watch_vram([gpu], results_writer, base, {"rank": 16}, benchmark.extra_info):
            benchmark.pedantic(one_round, rounds=RELEASE_ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        server_slot.release()  # its memory goes back before the hot-reload servers start
    measured = samples[1:]
    values = stat_values({k: [s[k] for s in measured if s[k] is not None] for k in measured[0]})
    results_writer.append(scalar_rows(base, values, {"rank": 16, "rounds": len(measured), "stat": "median"}))
    benchmark.extra_info.update(values)
    assert values.get("released_mib", 0) > 0, f"release freed no GPU memory: {measured}"


@pytest.mark.backends("sglang", "vllm")
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rank", RANKS)
def test_hot_reload(benchmark, target, rank, request, server_slot, adapter_factory, model_dir, bench_plan,
                    results_writer, tmp_path, backend):
    benchmark.group = f"sync-hot-reload-{target}-{backend}"
    adapters = _two_adapters(target, rank, adapter_factory, tmp_path)
    if target == "session":
        srv, model = request.getfixturevalue("lora_server"), model_dir.name
    else:
        own = server_overrides(backend, lora=POOL, mem_fraction_static=OWN_MEM_FRACTION)
        srv, model = server_slot.get(model_path=str(model_with_weights(target).path), **own), target
    strategy = HotReload(srv.client, timeout_s=120)
    samples: list[dict] = []

    def one_round():
        i = len(samples)
        rec = strategy.publish(next(_versions), adapters[i % 2])
        first = _timed_request(srv.client, strategy.current, rank, 2 * i)
        again = _timed_request(srv.client, strategy.current, rank, 2 * i + 1)
        samples.append({"sync_ms": rec.sync_ms, "first_request_ms": first, "next_request_ms": again})

    base = row_base("sync_hot_reload", model, mode=bench_plan.mode, strategy="hot-reload", backend=backend)
    params = {"rank": rank, "modules": "all-linear"}
    try:
        with watch_vram([g.index for g in bench_plan.inference], results_writer, base, params, benchmark.extra_info):
            benchmark.pedantic(one_round, rounds=SYNC_ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        _unload_quietly(srv.client, strategy.current)
    measured = samples[1:]
    series = {k: [s[k] for s in measured] for k in measured[0]}
    values = stat_values(series)
    values.update(sync_min_ms=min(series["sync_ms"]), sync_max_ms=max(series["sync_ms"]))
    results_writer.append(scalar_rows(base, values, {**params, "rounds": len(measured), "stat": "median"}))
    benchmark.extra_info.update(values, sync_ms_all=series["sync_ms"])
