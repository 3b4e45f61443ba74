"""Benchmark logic (reference_impl.bench / loadgen) on the CPU against the FAKE SGLang server.

The fake (fixtures.fake_sglang) is a test double: these tests check bookkeeping (token counts, request sets,
rows, MBU math), never performance. Nothing here is evidence about SGLang or a GPU.
"""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl import bench
from reference_impl.client import SamplingParams
from reference_impl.loadgen import (ClosedLoop, PathResult, RawSender, Reply, generate_body, make_prompts,
                                    sampling_json)
from reference_impl.metrics import ModelShape, decode_roofline_tok_s, mbu
from reference_impl.models import shape_config
from reference_impl.results import ResultsWriter, read_results
from suite.unit.adapters_for_tests import ATTENTION, make_adapter

WARMUP = 1


class RecordingState(FakeSGLangState):
    """The fake, plus a log of every /generate body it accepted (canonical JSON)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.bodies: list[str] = []

    def generate(self, body):
        with self.cond:
            self.bodies.append(json.dumps(body, sort_keys=True))
        return super().generate(body)


@pytest.fixture
def fake(tmp_path):
    state = RecordingState(enable_lora=True, max_lora_rank=16, target_modules=ATTENTION, request_delay_s=0.005)
    with FakeSGLangServer(state) as srv:
        yield srv


def _by_gen_len(bodies: list[str], gen_len: int) -> list[dict]:
    out = [json.loads(b) for b in bodies]
    return [b for b in out if b["sampling_params"]["max_new_tokens"] == gen_len]


def run_rounds(url: str, spec: bench.LoadSpec, rounds: int = 2) -> bench.SideBySide:
    sbs = bench.SideBySide(url, spec, timeout_s=30)
    try:
        for _ in range(WARMUP + rounds):
            sbs()
    finally:
        sbs.close()
    return sbs


# ---------------------------------------------------------------- prompts and request bodies

def test_prompts_are_seeded_in_range_and_new_each_round():
    a0, a0_again, a1 = make_prompts(8, 32, 7, 0), make_prompts(8, 32, 7, 0), make_prompts(8, 32, 7, 1)
    assert a0 == a0_again
    assert not set(map(tuple, a0)) & set(map(tuple, a1))
    assert make_prompts(8, 32, 7, 0, purpose="ttft") != a0
    flat = [t for p in a0 + a1 for t in p]
    assert all(1000 <= t < 150000 for t in flat) and all(len(p) == 32 for p in a0)


def test_raw_body_equals_what_the_client_sends():
    sp = SamplingParams(max_new_tokens=9, temperature=1.0, ignore_eos=True).as_json()
    assert sampling_json(9) == sp
    logprobs = {"return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 0}  # GRPO's old logprobs
    assert generate_body([5, 6], 9, "a1") == {"input_ids": [[5, 6]], "sampling_params": sp, "lora_path": "a1",
                                               **logprobs}
    assert "lora_path" not in generate_body([5, 6], 9, None)


# ---------------------------------------------------------------- side by side against the fake

def test_raw_and_harness_send_identical_request_sets(fake):
    spec = bench.LoadSpec(concurrency=4, prompt_len=8, gen_len=5, requests_per_slot=2, ttft_probes=6, seed=3)
    sbs = run_rounds(fake.url, spec)
    per_round = spec.requests * 2 + max(spec.concurrency, spec.ttft_probes)
    assert fake.state.counters["generate"] == per_round * (WARMUP + 2)
    loads = _by_gen_len(fake.state.bodies, spec.gen_len)
    assert len(loads) == 2 * spec.requests * (WARMUP + 2)
    # every distinct body was sent exactly twice: once by raw, once by harness
    counts = collections.Counter(json.dumps(b, sort_keys=True) for b in loads)
    assert set(counts.values()) == {2} and len(counts) == spec.requests * (WARMUP + 2)
    for b in loads:
        assert b["sampling_params"] == sampling_json(spec.gen_len) and "lora_path" not in b
    for r in sbs.rounds:
        assert set(r.paths) == {"raw", "harness"}
        assert r.paths["raw"].requests == r.paths["harness"].requests == spec.requests


def test_rounds_use_different_prompts(fake):
    spec = bench.LoadSpec(concurrency=2, prompt_len=6, gen_len=3, requests_per_slot=2, ttft_probes=2)
    run_rounds(fake.url, spec, rounds=2)
    prompts_by_round = collections.defaultdict(set)
    loads = _by_gen_len(fake.state.bodies, 3)
    for i, b in enumerate(loads):  # each round sends 2 * requests load bodies, in round order
        prompts_by_round[i // (2 * spec.requests)].add(tuple(b["input_ids"][0]))
    assert len(prompts_by_round) == WARMUP + 2
    sets = list(prompts_by_round.values())
    assert all(len(s) == spec.requests for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])


def test_throughput_matches_the_tokens_received(fake):
    spec = bench.LoadSpec(concurrency=3, prompt_len=10, gen_len=7, requests_per_slot=3, ttft_probes=4)
    sbs = run_rounds(fake.url, spec)
    measured = sbs.measured(WARMUP)
    assert len(measured) == 2 and bench.reply_problems(measured, spec.gen_len, spec.prompt_len) == []
    for path in ("raw", "harness"):
        s = bench.summarize(measured, path)
        passes = [r.paths[path] for r in measured]
        replies = [rep for p in passes for rep in p.replies]
        assert s.requests == len(replies) == 2 * spec.requests
        assert s.completion_tokens == sum(rep.output_ids for rep in replies) == s.requests * spec.gen_len
        assert s.prompt_tokens == s.requests * spec.prompt_len
        wall = sum(p.wall_s for p in passes)
        assert s.output_tok_s == pytest.approx(s.requests * spec.gen_len / wall)
        assert s.total_tok_s == pytest.approx(s.requests * (spec.gen_len + spec.prompt_len) / wall)
        assert s.cached_tokens_ratio == 0.0  # the cache is flushed before each pass
    assert all(len(r.ttft_s) == 4 and all(t > 0 for t in r.ttft_s) for r in measured)


def test_without_flush_the_second_path_would_hit_the_cache(fake):
    """Why SideBySide flushes: the same prompts twice on the fake give cached tokens the second time."""
    prompts = make_prompts(4, 12, 0, 0)
    with ClosedLoop(2) as loop:
        first = loop.run(RawSender(fake.url), prompts, 2, None)
        second = loop.run(RawSender(fake.url), prompts, 2, None)
    assert first.cached_tokens == 0 and second.cached_tokens == 4 * 11


def test_lora_requests_name_the_adapter_on_both_paths(fake, tmp_path):
    from reference_impl.client import SGLangClient

    SGLangClient(fake.url).load_lora_adapter("a1", make_adapter(tmp_path / "a1", seed=1))
    spec = bench.LoadSpec(concurrency=2, prompt_len=5, gen_len=4, lora="a1", lora_rank=8, requests_per_slot=1,
                          ttft_probes=2)
    sbs = run_rounds(fake.url, spec, rounds=1)
    assert all(json.loads(b)["lora_path"] == "a1" for b in fake.state.bodies)
    rows = bench.load_rows(bench.row_base("t", "fake"), spec, sbs.measured(WARMUP))
    assert {r.params["lora"] for r in rows} == {8}


# ---------------------------------------------------------------- rows, MBU, percentiles

def test_rows_validate_and_round_trip(fake, tmp_path):
    spec = bench.LoadSpec(concurrency=2, prompt_len=8, gen_len=4, requests_per_slot=2, ttft_probes=3)
    measured = run_rounds(fake.url, spec).measured(WARMUP)
    cfg = shape_config("qwen3-0.6b")
    rows = bench.load_rows(bench.row_base("rollout", "qwen3-0.6b", mode="split"), spec, measured, model_config=cfg,
                           gpu_name="NVIDIA H100 80GB HBM3", extra_params={"mem_fraction": 0.5})
    rows += bench.vram_rows(bench.row_base("rollout", "qwen3-0.6b"), {0: 1234.5, 1: 10.0}, {"concurrency": 2})
    path = tmp_path / "r.csv"
    assert ResultsWriter(path, fingerprint={}).append(rows) == len(rows)
    df = read_results(path)
    assert set(df["suite"]) == {"benchmark"}
    got = {(m, json.loads(p).get("path")) for m, p in zip(df["metric"], df["params"])}
    for path_name in ("raw", "harness"):
        for m in ("output_tok_s", "total_tok_s", "requests_count", "mbu", "cached_tokens_ratio"):
            assert (m, path_name) in got
    assert ("ttft_p50_ms", "raw") in got and ("ttft_p99_ms", "raw") in got
    assert ("harness_over_raw_ratio", "harness") in got and ("ttft_p50_ms", "harness") not in got
    params = json.loads(df[df.metric == "output_tok_s"]["params"].iloc[0])
    assert params | {"path": "x"} == {"concurrency": 2, "prompt_len": 8, "gen_len": 4, "lora": "base", "rounds": 2,
                                      "mem_fraction": 0.5, "path": "x"}
    vram = df[df.metric == "peak_vram_mib"]
    assert sorted(json.loads(p)["gpu"] for p in vram["params"]) == [0, 1]
    by = {(r.metric, r.params["path"]): r.value for r in rows if "path" in r.params}
    assert by[("harness_over_raw_ratio", "harness")] == pytest.approx(
        by[("output_tok_s", "harness")] / by[("output_tok_s", "raw")])
    want_mbu = mbu(ModelShape.from_config(cfg), 2, 8, 4, by[("output_tok_s", "raw")], 3.35e12)
    assert by[("mbu", "raw")] == pytest.approx(want_mbu)
    assert by[("requests_count", "raw")] == 2 * spec.requests


def test_mbu_uses_metrics_and_is_one_at_the_roofline():
    cfg = shape_config("qwen3-1.7b")
    shape = ModelShape.from_config(cfg)
    roof = decode_roofline_tok_s(shape, 256, 256, 256, 4.8e12)
    assert bench.mbu_value(cfg, 256, 256, 256, roof, "NVIDIA H200") == pytest.approx(1.0)
    assert bench.mbu_value(cfg, 64, 256, 256, 1000.0, "NVIDIA H100 80GB HBM3") == pytest.approx(
        mbu(shape, 64, 256, 256, 1000.0, 3.35e12))
    # two tensor-parallel GPUs: twice the bandwidth, half the utilisation for the same tok/s
    assert bench.mbu_value(cfg, 64, 256, 256, 1000.0, "H100", n_gpus=2) == pytest.approx(
        mbu(shape, 64, 256, 256, 1000.0, 3.35e12) / 2)
    assert bench.mbu_value(cfg, 64, 256, 256, 1000.0, "Some Unknown GPU") is None


def test_decode_batch_is_capped_by_token_capacity():
    assert bench.decode_batch(256, 256, 256) == 256
    assert bench.decode_batch(256, 256, 256, token_capacity=512 * 100) == 100
    assert bench.decode_batch(16, 256, 256, token_capacity=10**6) == 16
    assert bench.decode_batch(4, 256, 256, token_capacity=10) == 1
    assert bench.decode_batch(256, 256, 256, token_capacity=10**6, max_running=48) == 48


def test_server_capacity_reads_server_info(fake):
    from reference_impl.client import SGLangClient

    assert bench.server_capacity(SGLangClient(fake.url).server_info()) == (100000, 64)
    assert bench.server_capacity({}) == (None, None)


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    xs = [0.3, 0.1, 0.7, 0.25, 2.0, 0.05, 0.9]
    assert bench.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_reply_problems_flags_short_or_eos_truncated_replies():
    good, short = Reply(8, 4, 0, 4), Reply(8, 3, 0, 3)
    rounds = [bench.RoundResult(0, {"raw": PathResult("raw", 1, 1.0, [good, short])})]
    problems = bench.reply_problems(rounds, gen_len=4, prompt_len=8)
    assert len(problems) == 1 and "raw #1" in problems[0]


def test_env_helpers(monkeypatch):
    monkeypatch.setenv("SPLITRL_BENCH_CONCURRENCY", " 1, 16 ,64")
    assert bench.env_ints("SPLITRL_BENCH_CONCURRENCY", "9") == [1, 16, 64]
    monkeypatch.delenv("SPLITRL_BENCH_CONCURRENCY")
    assert bench.env_ints("SPLITRL_BENCH_CONCURRENCY", "1,256") == [1, 256]
    assert bench.env_list("SPLITRL_BENCH_NOPE", "") == []
    assert bench.env_float("SPLITRL_BENCH_NOPE", None) is None
    monkeypatch.setenv("SPLITRL_BENCH_X", "abc")
    with pytest.raises(ValueError, match="SPLITRL_BENCH_X"):
        bench.env_ints("SPLITRL_BENCH_X", "1")


def test_scalar_rows_drop_unmeasured_values():
    rows = bench.scalar_rows(bench.row_base("sync", "tiny"), {"sync_ms": 3.0, "released_mib": None}, {"rank": 8})
    assert [(r.metric, r.value, r.params) for r in rows] == [("sync_ms", 3.0, {"rank": 8})]
    assert bench.stat_values({"a_s": [3.0, 1.0, 2.0], "b_s": []}) == {"a_s": 2.0}


def test_step_time_ratio_rows_cover_the_pairs_that_ran():
    base = bench.row_base("step_summary", "tiny", mode="split")
    rows = bench.step_time_ratio_rows(base, {"split": 2.0, "split_pipelined": 1.5, "trl_peer": 6.0}, {"steps": 5})
    got = {(r.params["numerator"], r.params["denominator"]): r.value for r in rows}
    assert got == {("split_pipelined", "split"): 0.75, ("split_pipelined", "trl_peer"): 0.25,
                   ("split", "trl_peer"): pytest.approx(1 / 3)}
    assert {r.metric for r in rows} == {"step_time_ratio"} and all(r.params["steps"] == 5 for r in rows)
    assert {r.params["stat"] for r in rows} == {"wall_per_step"}
    only = bench.step_time_ratio_rows(base, {"split": 2.0, "split_pipelined": 1.0}, {}, stat="median_after_first")
    assert [(r.params["numerator"], r.value, r.params["stat"]) for r in only] == [
        ("split_pipelined", 0.5, "median_after_first")]


def test_busy_rows_per_gpu(tmp_path):
    base = bench.row_base("step_split", "tiny", mode="split")
    rows = bench.busy_rows(base, {1: 0.4, 0: 0.9}, {0: 1.0, 1: 0.5}, {"steps": 5})
    assert [(r.metric, r.params["gpu"], r.value) for r in rows] == [
        ("gpu_busy_ratio", 0, 0.9), ("gpu_busy_ratio", 1, 0.4), ("gpu_active_ratio", 0, 1.0),
        ("gpu_active_ratio", 1, 0.5)]
    writer = ResultsWriter(tmp_path / "r.csv", fingerprint={})
    writer.append(rows)  # the metric names pass the results schema
    assert len(read_results(tmp_path / "r.csv")) == 4
