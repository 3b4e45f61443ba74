"""Merged full-weight sync vs LoRA hot reload (issue #10): sync cost, rollout throughput, step time, crossover.

Environment (defaults in brackets):
  SPLITRL_BENCH_MERGED_SHAPES       [qwen3-0.6b,qwen3-1.7b]  model shapes (qwen3-4b allowed: ~2x the time)
  SPLITRL_BENCH_MERGED_RANKS        [8,16,64]  adapter ranks (all-linear); the LoRA pool has max rank 64
  SPLITRL_BENCH_MERGED_CONCURRENCY  [256]      closed-loop concurrency of the rollout pass
  SPLITRL_BENCH_MERGED_PROMPT_LEN   [256]      SPLITRL_BENCH_MERGED_GEN_LEN [256]
  SPLITRL_BENCH_MERGED_REQUESTS_PER_SLOT [1]   rollout size per step = concurrency * this * gen_len tokens
  SPLITRL_BENCH_MERGED_ROUNDS       [1]        measured rounds (+1 warm-up); a round = every (rank, strategy)
  SPLITRL_BENCH_MERGED_SERVERS      [one]      one: one LoRA-pool server per shape serves both strategies
                                               (merged rollouts then run on a LoRA-enabled server);
                                               two: merged runs on its own server without LoRA, as deployed
  SPLITRL_BENCH_MERGED_CUDA_GRAPHS  [0]        CUDA graphs off: server start ~45-60 s instead of ~70 s
  SPLITRL_BENCH_MERGED_MEM_FRACTION [0.45]     room for the KV of 256 x 512 tokens of a 1.7B/4B shape

One step of each strategy, measured as it happens in the loop (training is the same for both and left out):
  hot-reload  HotReload.publish (load policy-vN of rank r + unload the previous) then one rollout pass naming it
  merged      MergedSync.publish (merge on the trainer's GPU, write to tmpfs, pause/retract, update from disk,
              continue) then one rollout pass on the base name, every reply checked for the pushed weight_version
Rows (suite=benchmark): test sync_merged: sync_ms (+ merge_ms, write_ms, update_ms, pause_ms for merged) per
strategy and rank; test rollout_merged: output_tok_s with params serving=lora|merged; test step_merged: step_s
(sync + rollout pass) with rollout_tokens; test crossover_merged: crossover_tokens_per_step computed here from
the medians (reference_impl/crossover.py), direction above|below|always|never.
Synthetic adapters (random A/B written from config.json): PEFT would load a 1.7B/4B model on the CPU per rank.
"""
from __future__ import annotations

import itertools
import time

import pytest

from reference_impl.bench import env_float, env_int, env_ints, env_list, row_base, scalar_rows, stat_values
from reference_impl.crossover import ROLLOUT_TEST, SYNC_TEST, crossover, crossover_rows
from reference_impl.loadgen import ClosedLoop, RawSender, make_prompts
from reference_impl.server import ALL_LINEAR, LoraPoolConfig

from .conftest import free_cuda_cache, model_with_weights, watch_vram

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark]

SHAPES = env_list("SPLITRL_BENCH_MERGED_SHAPES", "qwen3-0.6b,qwen3-1.7b")
RANKS = env_ints("SPLITRL_BENCH_MERGED_RANKS", "8,16,64")
CONCURRENCY = env_int("SPLITRL_BENCH_MERGED_CONCURRENCY", 256)
PROMPT_LEN = env_int("SPLITRL_BENCH_MERGED_PROMPT_LEN", 256)
GEN_LEN = env_int("SPLITRL_BENCH_MERGED_GEN_LEN", 256)
REQUESTS_PER_SLOT = env_int("SPLITRL_BENCH_MERGED_REQUESTS_PER_SLOT", 1)
ROUNDS = env_int("SPLITRL_BENCH_MERGED_ROUNDS", 1)
SERVERS = env_list("SPLITRL_BENCH_MERGED_SERVERS", "one")[0]
CUDA_GRAPHS = bool(env_int("SPLITRL_BENCH_MERGED_CUDA_GRAPHS", 0))
MEM_FRACTION = env_float("SPLITRL_BENCH_MERGED_MEM_FRACTION", 0.45)
POOL = LoraPoolConfig(max_rank=max(RANKS + [64]), target_modules=ALL_LINEAR, max_loras_per_batch=4,
                      max_loaded_loras=4)
_versions = itertools.count(1)


class VersionedSender(RawSender):
    """The raw path, plus the merged strategy's own check: every reply names the version pushed last."""

    def __init__(self, base_url: str, strategy=None, timeout_s: float = 600.0):
        super().__init__(base_url, timeout_s)
        self.strategy = strategy

    def check_meta(self, meta: dict) -> None:
        if self.strategy is not None and meta.get("weight_version") != self.strategy.current:
            raise RuntimeError(f"reply from weight_version {meta.get('weight_version')!r}, pushed "
                               f"{self.strategy.current!r}: stale weights served")


def _servers(server_slot, model_path: str):
    """(hot-reload server, merged server). With SERVERS=two the merged server (no LoRA) is started after the
    hot-reload measurements, by the caller, through the same slot."""
    common = dict(model_path=model_path, load_format="auto", cuda_graphs=CUDA_GRAPHS,
                  mem_fraction_static=MEM_FRACTION)
    return (lambda: server_slot.get(**common, lora=POOL)), (lambda: server_slot.get(**common, lora=POOL if
                                                                                     SERVERS == "one" else None))


def _step(strategy, adapter, sender, loop, prompts, lora_of) -> dict:
    """One step without training: publish, then one rollout pass naming lora_of() (read after the publish)."""
    rec = strategy.publish(next(_versions), adapter)
    lora = lora_of()
    sender.flush_cache()  # the pass measures decode of new prompts on the new weights, never cache hits
    t0 = time.perf_counter()
    res = loop.run(sender, prompts, GEN_LEN, lora)
    rollout_s = time.perf_counter() - t0
    bad = [r for r in res.replies if r.completion_tokens != GEN_LEN]
    assert not bad, f"{len(bad)} replies with != {GEN_LEN} tokens"
    sample = {"sync_ms": rec.sync_ms, "output_tok_s": res.completion_tokens / res.wall_s,
              "step_s": rec.sync_ms / 1e3 + rollout_s}
    sample.update({k: rec.extra[k] for k in ("merge_ms", "write_ms", "update_ms", "pause_ms") if k in rec.extra})
    return sample


@pytest.mark.gpus(1)
@pytest.mark.parametrize("shape", SHAPES)
def test_merged_vs_hot_reload(benchmark, shape, server_slot, bench_plan, results_writer, tmp_path_factory):
    from reference_impl.adapters import synthetic_lora_adapter
    from reference_impl.merge import WeightMerger
    from reference_impl.sync import HotReload
    from reference_impl.sync_merged import MergedSync

    benchmark.group = f"merged-crossover-{shape}"
    model = model_with_weights(shape)
    root = tmp_path_factory.mktemp(f"merged-{shape}")
    adapters = {r: [str(synthetic_lora_adapter(str(model.path), root / f"r{r}-{s}", rank=r,
                                               target_modules=ALL_LINEAR, seed=s)) for s in (1, 2)] for r in RANKS}
    hot_server, merged_server = _servers(server_slot, str(model.path))
    requests = CONCURRENCY * REQUESTS_PER_SLOT
    samples: dict[tuple[str, int], list[dict]] = {(s, r): [] for s in ("hot-reload", "merged") for r in RANKS}
    loop = ClosedLoop(CONCURRENCY)
    merger = WeightMerger(model.path)
    indices = [g.index for g in bench_plan.inference]
    base_row = row_base(SYNC_TEST, shape, mode=bench_plan.mode)
    rounds_done = itertools.count()

    def measure(strategy_name: str):
        """All ranks of one strategy for this round (each on the server that strategy uses)."""
        i = next(rounds_done)
        srv = hot_server() if strategy_name == "hot-reload" else merged_server()
        if strategy_name == "hot-reload":
            strategy = HotReload(srv.client, timeout_s=120)
            lora_of = lambda: strategy.current  # noqa: E731 - rollouts name the adapter just loaded
        else:
            strategy = MergedSync(srv.client, merger=merger, timeout_s=600)
            lora_of = lambda: None  # noqa: E731 - merged weights are served by the base name
        sender = VersionedSender(srv.url, strategy if strategy_name == "merged" else None)
        try:
            for rank in RANKS:
                prompts = make_prompts(requests, PROMPT_LEN, rank, i, purpose=f"merged-{strategy_name}")
                adapter = adapters[rank][i % 2]
                samples[(strategy_name, rank)].append(_step(strategy, adapter, sender, loop, prompts, lora_of))
        finally:
            if strategy_name == "hot-reload" and strategy.current:
                srv.client.unload_lora_adapter(strategy.current, timeout_s=60)  # no adapter left for merged

    def run_all():
        """1 warm-up + ROUNDS measured samples per (strategy, rank). One server: strategies alternate per
        round; two servers: all hot-reload rounds, then all merged ones (each server starts once)."""
        order = ["hot-reload", "merged"] * (ROUNDS + 1)
        for name in (sorted(order, key=order.index) if SERVERS == "two" else order):
            measure(name)

    try:
        with watch_vram(indices, results_writer, base_row, {"servers": SERVERS}, benchmark.extra_info):
            benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        loop.close()
        merger.close()
        server_slot.release()
        free_cuda_cache()
    results_writer.append(merged_rows(shape, bench_plan.mode, samples, requests * GEN_LEN, benchmark.extra_info))


def merged_rows(shape: str, mode: str, samples: dict, rollout_tokens: int, info: dict) -> list:
    """Median rows per (strategy, rank) after the warm-up sample, then the crossover per rank."""
    rows, medians = [], {}
    common = {"concurrency": CONCURRENCY, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "modules": "all-linear",
              "servers": SERVERS, "logprobs": 1}  # rollouts ask for the sampler's logprobs, as GRPO's do
    for (strategy, rank), runs in samples.items():
        measured = runs[1:] if len(runs) > 1 else runs
        if not measured:
            continue
        med = stat_values({k: [s[k] for s in measured] for k in measured[0]})
        medians[(strategy, rank)] = med
        params = {**common, "rank": rank, "rounds": len(measured), "stat": "median"}
        sync = {k: med[k] for k in ("sync_ms", "merge_ms", "write_ms", "update_ms", "pause_ms") if k in med}
        rows += scalar_rows(row_base(SYNC_TEST, shape, mode, strategy), sync, params)
        serving = "merged" if strategy == "merged" else "lora"
        rows += scalar_rows(row_base(ROLLOUT_TEST, shape, mode, strategy), {"output_tok_s": med["output_tok_s"]},
                            {**params, "serving": serving})
        rows += scalar_rows(row_base("step_merged", shape, mode, strategy), {"step_s": med["step_s"]},
                            {**params, "serving": serving, "rollout_tokens": rollout_tokens})
    for rank in RANKS:
        m, h = medians.get(("merged", rank)), medians.get(("hot-reload", rank))
        if m and h:
            c = crossover(m["sync_ms"], h["sync_ms"], m["output_tok_s"], h["output_tok_s"])
            rows += crossover_rows(row_base("crossover_merged", shape, mode, "merged"), c, {**common, "rank": rank})
            info[f"crossover_tokens_per_step[r{rank}]"] = c.tokens_per_step
            info[f"crossover_reason[r{rank}]"] = c.reason
    return rows
