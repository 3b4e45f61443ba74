"""Benchmark logic without a GPU: side-by-side rounds (raw vs harness), their summaries, MBU, results rows.

Definitions (one results row per number, suite="benchmark"):
  output_tok_s    completion tokens (server-counted, meta_info.completion_tokens) / wall, summed over the
                  measured rounds; wall = first send to last reply of a closed-loop pass at concurrency C
  total_tok_s     (prompt + completion tokens) / the same wall
  requests_count  replies received over the measured rounds
  ttft_p50_ms / ttft_p99_ms
                  SGLang's non-streaming /generate has no time-to-first-token field, so TTFT is measured with
                  a PROBE: max(C, ttft_probes) fresh prompts of the same length with max_new_tokens=1, sent by
                  the raw path at the same concurrency C on a flushed cache; each probe's latency (send ->
                  reply) is one TTFT sample (prefill + one decode step + queueing behind the other C-1).
  mbu             metrics.mbu(shape from config.json, decode batch, prompt_len, gen_len, output_tok_s,
                  peak BW of the GPU name x inference GPUs). Wall time includes prefill and ramp-up/down, so
                  this is a lower bound on decode MBU. Decode batch = min(C, token capacity // (P + G), max
                  running requests) with what the server reports (requests beyond it queue), else C.
                  LoRA weight reads are not counted (a rank-16 adapter is ~1% of W).
  cached_tokens_ratio  cached / prompt tokens (should be ~0: prompts are new each round, cache flushed)
  harness_over_raw_ratio  harness output_tok_s / raw output_tok_s on the same request set (1.0 = no overhead)
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

from .loadgen import ClosedLoop, PathResult, make_prompts, senders_for
from .metrics import ModelShape, mbu, peak_bandwidth_bytes_s
from .results import ResultRow

SUITE = "benchmark"


# ---------------------------------------------------------------- configuration from the environment

def env_list(name: str, default: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, default).split(",") if s.strip()]


def env_ints(name: str, default: str) -> list[int]:
    try:
        return [int(s) for s in env_list(name, default)]
    except ValueError as e:
        raise ValueError(f"{name}={os.environ.get(name)!r}: expected integers joined by commas") from e


def env_int(name: str, default: int) -> int:
    return env_ints(name, str(default))[0]


def env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


# ---------------------------------------------------------------- rounds

@dataclass
class LoadSpec:
    concurrency: int
    prompt_len: int = 256
    gen_len: int = 256
    lora: str | None = None          # adapter NAME sent with every request; None = base model
    lora_rank: int | None = None     # for the params label only
    requests_per_slot: int = 2       # requests per round = concurrency * this
    ttft_probes: int = 16            # at least this many TTFT probes per round (never fewer than C)
    seed: int = 0
    temperature: float = 1.0

    @property
    def requests(self) -> int:
        return self.concurrency * self.requests_per_slot

    @property
    def lora_label(self) -> int | str:
        return "base" if self.lora is None else (self.lora_rank if self.lora_rank is not None else self.lora)


@dataclass
class RoundResult:
    round_idx: int
    paths: dict[str, PathResult]
    ttft_s: list[float] = field(default_factory=list)


class SideBySide:
    """One call = one round (the function handed to benchmark.pedantic). Each round draws a NEW prompt set
    (seed includes the round), probes TTFT, then sends that set through raw and harness, flushing the radix
    cache before each pass and alternating which path goes first, so neither path inherits cache or
    warm-up from the other."""

    def __init__(self, base_url: str, spec: LoadSpec, timeout_s: float = 600.0, senders=None,
                 backend: str = "sglang", model: str | None = None):
        self.spec = spec
        # senders[0] is the raw path: it also probes TTFT and flushes the cache between passes
        self.senders = senders or senders_for(backend, base_url, model, timeout_s)
        self.raw = self.senders[0]
        self.loop = ClosedLoop(spec.concurrency)
        self.rounds: list[RoundResult] = []

    def __call__(self) -> RoundResult:
        s, i = self.spec, len(self.rounds)
        prompts = make_prompts(s.requests, s.prompt_len, s.seed, i)
        probes = make_prompts(max(s.concurrency, s.ttft_probes), s.prompt_len, s.seed, i, purpose="ttft")
        self.raw.flush_cache()
        ttft = self.loop.run(self.raw, probes, 1, s.lora, s.temperature).latencies_s
        order = self.senders if i % 2 == 0 else self.senders[::-1]
        paths = {}
        for send in order:
            self.raw.flush_cache()
            paths[send.path] = self.loop.run(send, prompts, s.gen_len, s.lora, s.temperature)
        result = RoundResult(i, paths, ttft)
        self.rounds.append(result)
        return result

    def measured(self, warmup_rounds: int) -> list[RoundResult]:
        """Rounds after pedantic's warm-up calls (pedantic runs warm-up first, then the rounds)."""
        return self.rounds[warmup_rounds:]

    def close(self) -> None:
        self.loop.close()


# ---------------------------------------------------------------- summaries

@dataclass
class Summary:
    path: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    wall_s: float

    @property
    def output_tok_s(self) -> float:
        return self.completion_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.wall_s

    @property
    def cached_tokens_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def summarize(rounds: list[RoundResult], path: str) -> Summary:
    passes = [r.paths[path] for r in rounds]
    if not passes:
        raise ValueError(f"no measured rounds for path {path!r}")
    return Summary(path, sum(p.requests for p in passes), sum(p.prompt_tokens for p in passes),
                   sum(p.completion_tokens for p in passes), sum(p.cached_tokens for p in passes),
                   sum(p.wall_s for p in passes))


def percentile(values, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def reply_problems(rounds: list[RoundResult], gen_len: int, prompt_len: int) -> list[str]:
    """Replies whose token counts would make the throughput numbers lie (ignore_eos must give exactly
    gen_len tokens; the server must have seen the whole prompt)."""
    out = []
    for r in rounds:
        for path, res in r.paths.items():
            for j, rep in enumerate(res.replies):
                if rep.completion_tokens != gen_len or rep.output_ids != gen_len or rep.prompt_tokens != prompt_len:
                    out.append(f"round {r.round_idx} {path} #{j}: prompt {rep.prompt_tokens}, completion "
                               f"{rep.completion_tokens}, output_ids {rep.output_ids} (want {prompt_len}/{gen_len})")
    return out


def decode_batch(concurrency: int, prompt_len: int, gen_len: int, token_capacity: int | None = None,
                 max_running: int | None = None) -> int:
    """Requests that can decode together: C, capped by the KV token capacity (each holds up to P + G tokens)
    and by the server's max running requests, when known."""
    batch = concurrency
    if token_capacity:
        batch = min(batch, int(token_capacity) // (prompt_len + gen_len))
    if max_running:
        batch = min(batch, int(max_running))
    return max(1, batch)


def server_capacity(server_info: dict) -> tuple[int | None, int | None]:
    """(KV token capacity, max running requests) from SGLang's /server_info; None where it says nothing."""
    states = server_info.get("internal_states") or [{}]
    running = states[0].get("effective_max_running_requests_per_dp") or server_info.get("max_running_requests")
    tokens = server_info.get("max_total_num_tokens")
    return (int(tokens) if tokens else None), (int(running) if running else None)


def mbu_value(model_config: dict, batch: int, prompt_len: int, gen_len: int, output_tok_s: float,
              gpu_name: str, n_gpus: int = 1) -> float | None:
    """metrics.mbu with the shape from config.json and the GPU name's peak bandwidth (None: unknown GPU)."""
    bw = peak_bandwidth_bytes_s(gpu_name)
    if bw is None:
        return None
    return mbu(ModelShape.from_config(model_config), batch, prompt_len, gen_len, output_tok_s, bw * n_gpus)


# ---------------------------------------------------------------- results rows

def row_base(test: str, model: str, mode: str = "", strategy: str = "", backend: str = "") -> dict:
    """The identifying columns of a benchmark's rows. backend "" leaves it to the writer: the backend of the test
    that writes the row (a vLLM session's trainer warm-up wrote "sglang" while this defaulted to it)."""
    return {"suite": SUITE, "test": test, "backend": backend, "mode": mode, "strategy": strategy, "model": model}


def scalar_rows(base: dict, values: dict[str, float | None], params: dict) -> list[ResultRow]:
    """One row per (metric, value); None values are left out (a number that could not be measured)."""
    return [ResultRow(metric=m, value=float(v), params=dict(params), **base)
            for m, v in values.items() if v is not None]


def load_rows(base: dict, spec: LoadSpec, rounds: list[RoundResult], *, model_config: dict | None = None,
              gpu_name: str = "", n_gpus: int = 1, token_capacity: int | None = None,
              max_running: int | None = None, extra_params: dict | None = None) -> list[ResultRow]:
    """Rows for a side-by-side measurement: per path output/total tok/s, requests, cache ratio, MBU;
    TTFT percentiles on the raw path; harness_over_raw_ratio on the harness path."""
    params = {"concurrency": spec.concurrency, "prompt_len": spec.prompt_len, "gen_len": spec.gen_len,
              "lora": spec.lora_label, "rounds": len(rounds), **(extra_params or {})}
    batch = decode_batch(spec.concurrency, spec.prompt_len, spec.gen_len, token_capacity, max_running)
    sums = {path: summarize(rounds, path) for path in rounds[0].paths}
    rows = []
    for path, s in sums.items():
        values = {"output_tok_s": s.output_tok_s, "total_tok_s": s.total_tok_s, "requests_count": s.requests,
                  "cached_tokens_ratio": s.cached_tokens_ratio,
                  "mbu": mbu_value(model_config, batch, spec.prompt_len, spec.gen_len, s.output_tok_s, gpu_name,
                                   n_gpus) if model_config else None}
        if path == "raw":
            ttft = [t for r in rounds for t in r.ttft_s]
            if ttft:
                values.update(ttft_p50_ms=percentile(ttft, 50) * 1e3, ttft_p99_ms=percentile(ttft, 99) * 1e3)
        if path == "harness" and "raw" in sums:
            values["harness_over_raw_ratio"] = s.output_tok_s / sums["raw"].output_tok_s
        rows += scalar_rows(base, values, {**params, "path": path})
    return rows


def extra_info(spec: LoadSpec, rounds: list[RoundResult], rows: list[ResultRow]) -> dict:
    """What goes into benchmark.extra_info: every row's number plus per-round tok/s."""
    info = {f"{r.metric}[{r.params.get('path', '')}]": r.value for r in rows}
    for r in rounds:
        for path, res in r.paths.items():
            info[f"round{r.round_idx}_{path}_output_tok_s"] = res.completion_tokens / res.wall_s
    info["concurrency"], info["lora"] = spec.concurrency, spec.lora_label
    return info


def vram_rows(base: dict, peaks_mib: dict[int, float], params: dict,
              roles: dict[int, str] | None = None) -> list[ResultRow]:
    """peak_vram_mib per physical GPU index (NVML: used memory of the whole GPU, all processes). `roles` adds what
    each GPU did (param role: inference / training), so layouts that put them on other indices line up."""
    roles = roles or {}
    return [ResultRow(metric="peak_vram_mib", value=float(v), params={
        **params, "gpu": int(i), **({"role": roles[i]} if i in roles else {})}, **base)
        for i, v in sorted(peaks_mib.items())]


def stat_values(samples: dict[str, list[float]]) -> dict[str, float]:
    """{metric: median} for each non-empty sample list (metric names keep their unit suffix)."""
    return {m: statistics.median(v) for m, v in samples.items() if v}


def busy_rows(base: dict, busy: dict[int, float], active: dict[int, float], params: dict) -> list[ResultRow]:
    """gpu_busy_ratio (mean NVML utilisation / 100) and gpu_active_ratio (share of samples > 0) per GPU."""
    rows = [ResultRow(metric="gpu_busy_ratio", value=float(v), params={**params, "gpu": int(i)}, **base)
            for i, v in sorted(busy.items())]
    return rows + [ResultRow(metric="gpu_active_ratio", value=float(v), params={**params, "gpu": int(i)}, **base)
                   for i, v in sorted(active.items())]


# (numerator, denominator) variant pairs of the step benchmark's summary: < 1 means the numerator is faster.
STEP_RATIO_PAIRS = (("split_pipelined", "split"), ("split_pipelined", "trl_peer"), ("split", "trl_peer"))


def step_time_ratio_rows(base: dict, step_s: dict[str, float], params: dict,
                         stat: str = "wall_per_step") -> list[ResultRow]:
    """step_time_ratio = step time of one variant / another's, for each pair whose two variants ran. `stat`
    names which step time: wall_per_step (whole run / steps: includes whichever variant paid the first-use
    compile) or median_after_first (steady state: step 0, the warm-up, left out)."""
    return [ResultRow(metric="step_time_ratio", value=step_s[a] / step_s[b],
                      params={**params, "numerator": a, "denominator": b, "stat": stat}, **base)
            for a, b in STEP_RATIO_PAIRS if a in step_s and b in step_s and step_s[b] > 0]
