"""End-to-end GRPO step time with its breakdown, per weight-sync strategy, plus the TRL peer in the same run.

Environment (defaults in brackets):
  SPLITRL_BENCH_STEP_MODEL    [tiny]  shape or local dir (same model for every variant and the peer)
  SPLITRL_BENCH_STEPS         [5]     GRPO steps per variant
  SPLITRL_BENCH_STEP_PROMPTS  [4]     prompts per step     SPLITRL_BENCH_STEP_GROUP [8]  group size
  SPLITRL_BENCH_STEP_GEN_LEN  [64]    max new tokens (ignore_eos; TRL: min_new_tokens = max)
  SPLITRL_BENCH_STEP_CUDA_GRAPHS [1]  SGLang decode CUDA graphs on the benchmark servers (as deployed; without
                                      them a 0.6B decode step is CPU-launch bound: ~25 ms on an H200)
  SPLITRL_BENCH_STEP_RESTART_GRAPH_MAX_BS [prompts x group]  largest decode batch the single-GPU restart
                                      variant's server captures (0: the backend's default). Every restart captures
                                      again (SGLang's default sizes up to 256 took 74 s of a 0.6B start on an H100),
                                      and a step never decodes more than prompts x group sequences at once

Variants: split (inference GPU(s) + training GPU, hot reload), split_pipelined (the same split with rollouts of
step n+1 overlapping training of step n: reference_impl.pipeline, max staleness 1, decoupled off-policy
objective as `splitrl run --pipeline`), single-GPU restart and single-GPU
release/resume (server and trainer on the first training GPU, which is the only GPU on a 1-GPU machine), and
TRL GRPOTrainer with HF generate on the training GPU. Rows: per step (reference_impl.loop.step_rows, params
step=k) and summaries: step_s/rollout_s/train_s/sync_ms with stat=median_after_first (step 0 left out: its
first adapter load and first rollouts), and step_s with stat=wall_per_step (whole run wall / steps; TRL's
train_runtime / steps). The loop runs once (pedantic rounds=1, no warm-up round: step 0 is the warm-up).
Unsloth's first-use compile is paid once per process before the first variant (fixture trainer_warmed: one step
of the same shape on a throwaway trainer, recorded as warmup_train_s), so no variant's wall_per_step carries it;
the TRL peer runs in a child process of its own and pays its own first step.
Each variant also gets gpu_busy_ratio / gpu_active_ratio per GPU (params gpu=i: NVML utilisation sampled over
the run, metrics.UtilizationSampler), and step_time_ratio rows (split_pipelined/split, split_pipelined/trl_peer,
split/trl_peer; wall per step and median after first) are written as soon as both variants of a pair have run.
With --backend vllm|both every variant but the TRL peer also runs against vLLM (restart: --lora-modules;
release/resume: sleep mode); the ratio rows pair SGLang's variants.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest

from reference_impl.bench import (busy_rows, env_int, row_base, scalar_rows, stat_values,
                                  step_time_ratio_rows)
from reference_impl.loop import LoopConfig, run_loop, step_rows
from reference_impl.server import ALL_LINEAR, LoraPoolConfig

from .conftest import (free_cuda_cache, model_with_weights, server_overrides, trainer_backend, watch_busy,
                       watch_vram)

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark]

STEP_MODEL = os.environ.get("SPLITRL_BENCH_STEP_MODEL", "tiny")
LOOP = LoopConfig(steps=env_int("SPLITRL_BENCH_STEPS", 5), prompts_per_step=env_int("SPLITRL_BENCH_STEP_PROMPTS", 4),
                  group_size=env_int("SPLITRL_BENCH_STEP_GROUP", 8),
                  max_new_tokens=env_int("SPLITRL_BENCH_STEP_GEN_LEN", 64))
RANK, ALPHA, LR = 16, 32, 2e-2
CUDA_GRAPHS = bool(env_int("SPLITRL_BENCH_STEP_CUDA_GRAPHS", 1))
POOL = LoraPoolConfig(max_rank=RANK, target_modules=ALL_LINEAR, max_loras_per_batch=4, max_loaded_loras=8)
RESTART_GRAPH_MAX_BS = env_int("SPLITRL_BENCH_STEP_RESTART_GRAPH_MAX_BS", LOOP.prompts_per_step * LOOP.group_size)
OWN_MEM_FRACTION = 0.3  # leaves room for the trainer (single GPU) or the session lora_server (split)
# variant -> step time, for the step_time_ratio rows at the end: the whole-run wall per step (the variant that
# runs first also pays Unsloth's first-use compile, ~15 s on an H200) and the steady state (median after step 0)
WALL_PER_STEP_S: dict[str, float] = {}
STEADY_STEP_S: dict[str, float] = {}
RATIOS_WRITTEN: set[tuple[str, str, str]] = set()
SUMMARY = ("rollout_s", "train_s", "sync_ms", "step_s", "pause_s", "restart_s", "release_s", "resume_s",
           "released_mib")


@pytest.fixture(scope="module")
def step_model():
    return model_with_weights(STEP_MODEL)


@pytest.fixture(scope="module")
def trainer_warmed(step_model, results_writer):
    """Unsloth compiles on a process's first training step and keeps the result; without this the variant that
    trains first would carry it in its wall_per_step. One step of the benchmark's shape on a throwaway trainer
    pays it up front, recorded as warmup_train_s (model load included)."""
    from reference_impl.tasks import WordStartTask
    from reference_impl.warmup import warm_up_trainer

    backend = trainer_backend()
    seconds = warm_up_trainer(_trainer_config(step_model, backend), WordStartTask(str(step_model.path)), LOOP)
    free_cuda_cache()
    base = row_base("step_warmup", step_model.name, mode="warmup", strategy="none")
    results_writer.append(scalar_rows(base, {"warmup_train_s": seconds}, {**_params(), "trainer": backend}))
    return seconds


@pytest.fixture(scope="module", autouse=True)
def step_time_ratios(results_writer):
    """Clears the step times at the module's start; write_new_ratios() adds each step_time_ratio row as soon as
    both of its variants have run (a run cut off by a time bound keeps the ratios it already had). A fixture,
    not a test, so `--benchmark-only` (which skips tests without the benchmark fixture) still runs it. Set up
    only when a GPU test of this module runs (the gpu skip comes first)."""
    WALL_PER_STEP_S.clear()
    STEADY_STEP_S.clear()
    RATIOS_WRITTEN.clear()
    yield


def write_new_ratios(results_writer) -> None:
    base = row_base("step_summary", os.path.basename(STEP_MODEL), mode="summary", strategy="ratio",
                    backend="sglang")  # the ratio pairs are SGLang's variants, whichever test completes a pair
    rows = (step_time_ratio_rows(base, WALL_PER_STEP_S, _params())
            + step_time_ratio_rows(base, STEADY_STEP_S, _params(), stat="median_after_first"))
    new = [r for r in rows if (r.params["numerator"], r.params["denominator"], r.params["stat"]) not in RATIOS_WRITTEN]
    if new:
        results_writer.append(new)
    for r in new:
        RATIOS_WRITTEN.add((r.params["numerator"], r.params["denominator"], r.params["stat"]))
        print(f"\nstep_time_ratio {r.params['numerator']}/{r.params['denominator']} ({r.params['stat']}) "
              f"= {r.value:.3f}")


def _params() -> dict:
    return {"steps": LOOP.steps, "prompts": LOOP.prompts_per_step, "group_size": LOOP.group_size,
            "max_new_tokens": LOOP.max_new_tokens, "rank": RANK, "lr": LR, "cuda_graphs": int(CUDA_GRAPHS)}


def _run_variant(benchmark, results_writer, model, engine, strategy, name: str, mode: str, gpus: list[int],
                 pipelined: bool = False, backend: str = "sglang", extra_params: dict | None = None):
    """run_loop (or run_pipelined) once under pedantic; per-step rows and summaries; trainer memory handed back."""
    from reference_impl.job import DEFAULT_PIPELINE_TIS_CAP
    from reference_impl.pipeline import PipelineConfig, run_pipelined
    from reference_impl.tasks import WordStartTask
    from reference_impl.trainer import LoraTrainer

    trainer_name = trainer_backend()  # `backend` is the server's: the rows and the ratio keys name it
    benchmark.group = "grpo-step"
    base = row_base(f"step_{name}", model.name, mode=mode, strategy=strategy.name, backend=backend)
    params = {**_params(), "trainer": trainer_name, **({"max_staleness": 1} if pipelined else {}),
              **(extra_params or {})}
    trainer = LoraTrainer(_trainer_config(model, trainer_name, DEFAULT_PIPELINE_TIS_CAP if pipelined else None))
    task = WordStartTask(str(model.path))
    out: dict = {}

    def once():
        t0 = time.perf_counter()
        if pipelined:
            out["records"] = run_pipelined(LOOP, trainer, engine, strategy, task, PipelineConfig(max_staleness=1))
        else:
            out["records"] = run_loop(LOOP, trainer, engine, strategy, task)
        out["wall_s"] = time.perf_counter() - t0

    try:
        with watch_vram(gpus, results_writer, base, params, benchmark.extra_info), \
                watch_busy(gpus, results_writer, base, params, benchmark.extra_info):
            benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        trainer.close()
        del trainer
        free_cuda_cache()
    records = out["records"]
    rows = [row for rec in records for row in step_rows(rec, {**base, "params": params})]
    later = records[1:] or records
    series = {k: [getattr(r, k) for r in later] if k in ("rollout_s", "train_s", "sync_ms", "step_s", "wait_s")
              else [r.extra[k] for r in later if r.extra.get(k) is not None]
              for k in SUMMARY + (("wait_s",) if pipelined else ())}
    summary = stat_values(series)
    rows += scalar_rows(base, summary, {**params, "stat": "median_after_first"})
    rows += scalar_rows(base, {"step_s": out["wall_s"] / LOOP.steps}, {**params, "stat": "wall_per_step"})
    results_writer.append(rows)
    key = name if backend == "sglang" else f"{name}@{backend}"  # the ratio pairs are SGLang's variants
    WALL_PER_STEP_S[key] = out["wall_s"] / LOOP.steps
    STEADY_STEP_S[key] = summary["step_s"]
    write_new_ratios(results_writer)
    benchmark.extra_info.update(summary, wall_per_step_s=out["wall_s"] / LOOP.steps,
                                rewards=[r.reward for r in records], trainer=trainer_name, server=backend,
                                staleness=[r.staleness_max for r in records])
    assert len(records) == LOOP.steps


def _trainer_config(model, backend: str, tis_cap: float | None = None):
    from reference_impl.trainer import LoraSpec, TrainerConfig

    return TrainerConfig(model_path=str(model.path), backend=backend, lora=LoraSpec(rank=RANK, alpha=ALPHA), lr=LR,
                         device="cuda", dtype="bfloat16", tis_cap=tis_cap)


def _single_gpu_config(server_pool, bench_plan, model, backend: str, graph_max_bs: int = 0, **changes):
    """The server on the first TRAINING GPU: the trainer (this process, cuda:0) and the server share it.
    graph_max_bs > 0 caps the decode batch sizes its CUDA graphs capture (0: the backend's default)."""
    capped = {"cuda_graph_max_bs": graph_max_bs} if graph_max_bs > 0 else {}
    return dataclasses.replace(server_pool.base, gpu_ids=str(bench_plan.training[0].index), tp_size=1,
                               **server_overrides(backend, model_path=str(model.path), lora=POOL,
                                                  mem_fraction_static=OWN_MEM_FRACTION, cuda_graphs=CUDA_GRAPHS,
                                                  **capped),
                               **changes)


@pytest.mark.gpus(1)
def test_step_trl_peer(benchmark, bench_plan, step_model, results_writer, tmp_path):
    """TRL GRPOTrainer, HF generate (no vLLM), same model/task/group size/rank/length, on the training GPU.
    In a child process of its own: this process imported Unsloth (the other variants' trainer), which patches
    TRL's trainers in place, and the peer must be plain TRL. The child reports whether Unsloth was imported
    there (params unsloth_imported; the test fails if it was)."""
    from .trl_peer import PeerSettings, run_trl_in_child

    benchmark.group = "grpo-step"
    base = row_base("step_trl_peer", step_model.name, mode="single", strategy="in-process", backend="trl-hf")
    settings = PeerSettings(steps=LOOP.steps, prompts_per_step=LOOP.prompts_per_step, group_size=LOOP.group_size,
                            max_new_tokens=LOOP.max_new_tokens, rank=RANK, alpha=ALPHA, lr=LR, device="cuda")
    gpu = bench_plan.training[0].index
    out: dict = {}
    params = {**_params(), "trainer": "trl", "process": "child"}
    with watch_vram([gpu], results_writer, base, params, benchmark.extra_info), \
            watch_busy([gpu], results_writer, base, params, benchmark.extra_info):
        benchmark.pedantic(lambda: out.update(zip(("run", "unsloth"), run_trl_in_child(
            str(step_model.path), str(tmp_path / "trl"), settings, gpu_index=gpu))), rounds=1, iterations=1,
            warmup_rounds=0)
    assert not out["unsloth"], "the TRL peer child imported Unsloth: the baseline would not be plain TRL"
    params["unsloth_imported"] = False
    run = out["run"]
    later = run.step_times_s[1:] or run.step_times_s
    rows = scalar_rows(base, stat_values({"step_s": later}), {**params, "stat": "median_after_first"})
    rows += scalar_rows(base, {"step_s": run.wall_per_step_s}, {**params, "stat": "wall_per_step"})
    rows += [r for k, v in enumerate(run.step_times_s)
             for r in scalar_rows(base, {"step_s": v, "reward": run.rewards[k] if k < len(run.rewards) else None},
                                  {**params, "step": k})]
    results_writer.append(rows)
    WALL_PER_STEP_S["trl_peer"] = run.wall_per_step_s
    STEADY_STEP_S["trl_peer"] = stat_values({"step_s": later})["step_s"]
    write_new_ratios(results_writer)
    benchmark.extra_info.update(step_times_s=run.step_times_s, wall_per_step_s=run.wall_per_step_s,
                                rewards=run.rewards, completion_mean_len=run.completion_mean_len)
    assert run.steps == LOOP.steps


def _split_server(backend: str, model) -> dict:
    """ServerPool overrides of the split variants' server, in the backend's own config names."""
    return server_overrides(backend, model_path=str(model.path), lora=POOL, mem_fraction_static=OWN_MEM_FRACTION,
                            cuda_graphs=CUDA_GRAPHS)


@pytest.mark.gpus(2)
@pytest.mark.backends("sglang", "vllm")
@pytest.mark.parametrize("variant", ["split", "split_pipelined"])
def test_step_split(benchmark, server_slot, bench_plan, step_model, results_writer, variant, trainer_warmed,
                    backend):
    """Hot reload on a split, sequential and pipelined, on the same server (the slot reuses it)."""
    from reference_impl.sync import HotReload

    if bench_plan.mode != "split":
        pytest.skip(f"GPU plan is {bench_plan.mode!r}, not split: pass --inference-gpus/--training-gpus apart")
    srv = server_slot.get(**_split_server(backend, step_model))
    strategy = HotReload(srv.client)
    gpus = [g.index for g in bench_plan.inference + bench_plan.training]
    try:
        _run_variant(benchmark, results_writer, step_model, srv.client, strategy, variant, "split", gpus,
                     pipelined=variant == "split_pipelined", backend=backend)
    finally:
        if strategy.current:
            srv.client.unload_lora_adapter(strategy.current)


@pytest.mark.gpus(1)
@pytest.mark.backends("sglang", "vllm")
def test_step_single_gpu_restart(benchmark, server_pool, bench_plan, step_model, results_writer, trainer_warmed,
                                 backend):
    from reference_impl.sync import Restart

    graph_max_bs = RESTART_GRAPH_MAX_BS if CUDA_GRAPHS else 0  # no graphs, nothing to cap
    # not started here: Restart.publish(0) starts it, with policy-v0 registered
    srv = server_pool.server_cls(_single_gpu_config(server_pool, bench_plan, step_model, backend,
                                                    graph_max_bs=graph_max_bs))
    try:
        _run_variant(benchmark, results_writer, step_model, _ClientOf(srv), Restart(srv), "restart", "single",
                     [bench_plan.training[0].index], backend=backend, extra_params={"graph_max_bs": graph_max_bs})
    finally:
        srv.stop()


@pytest.mark.gpus(1)
@pytest.mark.backends("sglang", "vllm")
def test_step_single_gpu_release_resume(benchmark, server_pool, bench_plan, step_model, results_writer,
                                        trainer_warmed, backend):
    from reference_impl.sync import ReleaseResume

    gpu = bench_plan.training[0].index
    srv = server_pool.server_cls(_single_gpu_config(server_pool, bench_plan, step_model, backend,
                                                    **server_pool.base.memory_release_changes())).start()
    try:
        _run_variant(benchmark, results_writer, step_model, srv.client, ReleaseResume(srv.client, gpu_index=gpu),
                     "release_resume", "single", [gpu], backend=backend)
    finally:
        srv.stop()


class _ClientOf:
    """The engine for the restart variant: the server's client, looked up per call (a restart gets a new port)."""

    def __init__(self, server):
        self.server = server

    def generate(self, *args, **kwargs):
        return self.server.client.generate(*args, **kwargs)
