"""Rollout throughput of SGLang, raw HTTP and the harness side by side, per shape, variant and concurrency.

Environment (defaults in brackets):
  SPLITRL_BENCH_SHAPES        [qwen3-0.6b,qwen3-1.7b,qwen3-4b]  base-model shapes (dummy weights)
  SPLITRL_BENCH_LORA_SHAPES   [qwen3-1.7b]   shapes also measured with a rank-16 all-linear LoRA (real
                              random weights; the adapter is built with PEFT on the CPU, so keep 4B off)
  SPLITRL_BENCH_CONCURRENCY   [1,16,64,256]  closed-loop concurrency C
  SPLITRL_BENCH_PROMPT_LEN    [256]    SPLITRL_BENCH_GEN_LEN [256]    SPLITRL_BENCH_ROUNDS [2]
  SPLITRL_BENCH_REQUESTS_PER_SLOT [2]  requests per round = C * this
  SPLITRL_BENCH_MEM_FRACTION  [the pool's, 0.25]  --mem-fraction-static (vLLM: --gpu-memory-utilization)
  SPLITRL_BENCH_PREFILL_GRAPHS [0]     1: SGLang's piecewise prefill CUDA graphs on the base server (~90 s more
                              per cold start of a 1.7B shape; the LoRA server never has them), param
                              prefill_graphs in every row. Decode CUDA graphs are always on.

Each round: TTFT probe, then raw and harness on the same new prompt set (definitions: reference_impl/bench.py).
One server per (shape, variant), reused across concurrencies, stopped before the next one starts.
With `--backend vllm|both` the same cases run against vLLM (raw = /v1/completions, harness = VLLMClient; CUDA
graphs on, i.e. no --enforce-eager, as deployed; token capacity unknown to the MBU batch estimate).
"""
from __future__ import annotations

import pytest

from reference_impl.bench import (LoadSpec, SideBySide, env_float, env_int, env_ints, env_list, extra_info,
                                  load_rows, reply_problems, row_base, scalar_rows, server_capacity)
from reference_impl.server import ALL_LINEAR, LoraPoolConfig

from .conftest import model_with_weights, server_overrides, watch_vram

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark]

SHAPES = env_list("SPLITRL_BENCH_SHAPES", "qwen3-0.6b,qwen3-1.7b,qwen3-4b")
LORA_SHAPES = env_list("SPLITRL_BENCH_LORA_SHAPES", "qwen3-1.7b")
CONCURRENCY = env_ints("SPLITRL_BENCH_CONCURRENCY", "1,16,64,256")
PROMPT_LEN = env_int("SPLITRL_BENCH_PROMPT_LEN", 256)
GEN_LEN = env_int("SPLITRL_BENCH_GEN_LEN", 256)
ROUNDS = env_int("SPLITRL_BENCH_ROUNDS", 2)
REQUESTS_PER_SLOT = env_int("SPLITRL_BENCH_REQUESTS_PER_SLOT", 2)
MEM_FRACTION = env_float("SPLITRL_BENCH_MEM_FRACTION", None)
PREFILL_GRAPHS = bool(env_int("SPLITRL_BENCH_PREFILL_GRAPHS", 0))
WARMUP = 1
LORA_RANK = 16
ADAPTER = f"bench-r{LORA_RANK}"

# Ordered so that each (shape, variant) server serves all its concurrencies before the next one starts.
CASES = [(shape, variant, c) for shape in SHAPES
         for variant in (("base", "lora") if shape in LORA_SHAPES else ("base",)) for c in CONCURRENCY]
_adapters: dict[str, tuple[str, str]] = {}  # shape -> (weights dir, adapter dir)


def _lora_assets(shape: str, tmp_path_factory) -> tuple[str, str]:
    if shape not in _adapters:
        from reference_impl.adapters import make_peft_adapter

        model = model_with_weights(shape)
        out = tmp_path_factory.mktemp(f"adapter-{shape}") / ADAPTER
        make_peft_adapter(str(model.path), out, rank=LORA_RANK, target_modules=ALL_LINEAR, seed=0)
        _adapters[shape] = (str(model.path), str(out))
    return _adapters[shape]


def _overrides(shape: str, variant: str, tmp_path_factory, backend: str = "sglang") -> tuple[dict, str]:
    """ServerPool overrides for the variant, plus the model dir whose config.json gives the MBU shape."""
    from reference_impl.models import resolve_model

    if variant == "base":  # dummy weights: no LoRA possible on this server (see performance notes)
        path, load_format = str(resolve_model(shape, weights=False).path), "dummy"
    else:
        path, load_format = _lora_assets(shape, tmp_path_factory)[0], "auto"
    common = {"cuda_graphs": True, "prefill_cuda_graphs": PREFILL_GRAPHS}
    if MEM_FRACTION is not None:
        common["mem_fraction_static"] = MEM_FRACTION
    pool = (LoraPoolConfig(max_rank=LORA_RANK, target_modules=ALL_LINEAR, max_loras_per_batch=4)
            if variant == "lora" else None)
    return server_overrides(backend, **common, model_path=path, load_format=load_format, lora=pool), path


def _mem_fraction(overrides: dict, base) -> float:
    """The server's share of GPU memory, whichever backend's name it goes by."""
    for name in ("mem_fraction_static", "gpu_memory_utilization"):
        if hasattr(base, name):
            return overrides.get(name, getattr(base, name))
    raise AttributeError(f"{type(base).__name__} has no memory-fraction field")


def _ensure_adapter(srv, shape: str) -> None:
    client = srv.client
    if ADAPTER in client.models():
        return
    loaded = client.load_lora_adapter(ADAPTER, _adapters[shape][1], timeout_s=120)  # raises with SGLang's reason
    assert ADAPTER in loaded, f"load of {ADAPTER} answered success but loaded_adapters={sorted(loaded)}"


@pytest.mark.backends("sglang", "vllm")
@pytest.mark.parametrize("shape,variant,concurrency", CASES, ids=[f"{s}-{v}-c{c}" for s, v, c in CASES])
def test_rollout_throughput(benchmark, shape, variant, concurrency, server_slot, bench_plan, results_writer,
                            tmp_path_factory, backend):
    import json
    from pathlib import Path

    benchmark.group = f"rollout-{shape}-{variant}-{backend}"
    info = benchmark.extra_info
    overrides, config_dir = _overrides(shape, variant, tmp_path_factory, backend)
    model_config = json.loads((Path(config_dir) / "config.json").read_text())
    mem_fraction = _mem_fraction(overrides, server_slot.pool.base)
    base = row_base(f"rollout_{variant}", shape, mode=bench_plan.mode, backend=backend)
    params = {"concurrency": concurrency, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
              "lora": LORA_RANK if variant == "lora" else "base", "mem_fraction": mem_fraction,
              "prefill_graphs": int(PREFILL_GRAPHS and variant == "base"),
              "logprobs": 1}  # both paths ask for the sampler's output logprobs, as a GRPO rollout does
    spec = LoadSpec(concurrency, PROMPT_LEN, GEN_LEN, lora=ADAPTER if variant == "lora" else None,
                    lora_rank=LORA_RANK, requests_per_slot=REQUESTS_PER_SLOT)
    indices = [g.index for g in bench_plan.inference]
    with watch_vram(indices, results_writer, base, params, info):
        srv = server_slot.get(**overrides)
        started = server_slot.started
        if variant == "lora":
            _ensure_adapter(srv, shape)
        # vLLM has no /server_info: the MBU batch estimate then assumes every request fits at once
        capacity, max_running = server_capacity(srv.client.server_info()) if backend == "sglang" else (None, None)
        sbs = SideBySide(srv.url, spec, backend=backend, model=getattr(srv, "model_name", None))
        try:
            benchmark.pedantic(sbs, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
        finally:
            sbs.close()
    measured = sbs.measured(WARMUP)
    problems = reply_problems(measured, GEN_LEN, PROMPT_LEN)
    assert not problems, f"{len(problems)} replies with unexpected token counts: {problems[:5]}"
    rows = load_rows(base, spec, measured, model_config=model_config, gpu_name=bench_plan.inference[0].name,
                     n_gpus=bench_plan.tp_size, token_capacity=capacity, max_running=max_running,
                     extra_params={k: params[k] for k in ("mem_fraction", "prefill_graphs", "logprobs")})
    if started:  # the server was launched for this case: its launch-to-healthy time is a number too
        rows += scalar_rows(base, {"server_start_s": srv.start_s}, {"mem_fraction": mem_fraction,
                                                                   "lora": params["lora"], "cuda_graphs": True})
    results_writer.append(rows)
    info.update(extra_info(spec, measured, rows))
    info.update(token_capacity=capacity, max_running=max_running, server_log=str(srv.log_path))
