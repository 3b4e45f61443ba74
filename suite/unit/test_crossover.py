"""The crossover math (reference_impl/crossover.py): N* is where the two step-time lines meet; named edge
cases; crossover rows from a results CSV; the compare chart copes with an inf crossover."""
from __future__ import annotations

import math

import pytest

from reference_impl.compare import compare, plot
from reference_impl.crossover import METRIC, crossover, crossover_rows, crossover_table, step_s
from reference_impl.results import ResultRow, ResultsWriter, metric_unit, read_results


def test_crossover_is_where_the_step_times_meet():
    sm, sh, tm, tl = 3000.0, 40.0, 28_500.0, 18_100.0  # 1.7B-like: merged moves 3.4 GB, LoRA decode 36% slower
    c = crossover(sm, sh, tm, tl)
    assert c.direction == "above" and 0 < c.tokens_per_step < math.inf
    n = c.tokens_per_step
    assert step_s(sm, tm, n) == pytest.approx(step_s(sh, tl, n), rel=1e-9)
    assert step_s(sm, tm, 2 * n) < step_s(sh, tl, 2 * n)      # above N*: merged is faster
    assert step_s(sm, tm, n / 2) > step_s(sh, tl, n / 2)      # below: hot reload is faster
    assert "merged wins above" in c.reason


def test_edge_cases_are_named():
    always = crossover(20.0, 40.0, 28_000.0, 18_000.0)
    assert (always.tokens_per_step, always.direction) == (0.0, "always")
    never = crossover(3000.0, 40.0, 18_000.0, 18_000.0)
    assert (never.tokens_per_step, never.direction) == (math.inf, "never") and "never wins" in never.reason
    never_slower = crossover(3000.0, 40.0, 17_000.0, 18_000.0)
    assert never_slower.direction == "never"
    below = crossover(10.0, 40.0, 17_000.0, 18_000.0)  # faster sync, slower rollouts
    assert below.direction == "below" and 0 < below.tokens_per_step < math.inf
    n = below.tokens_per_step
    assert step_s(10.0, 17_000.0, n / 2) < step_s(40.0, 18_000.0, n / 2)
    assert step_s(10.0, 17_000.0, 2 * n) > step_s(40.0, 18_000.0, 2 * n)


@pytest.mark.parametrize("args", [(-1.0, 1.0, 1.0, 1.0), (1.0, math.nan, 1.0, 1.0), (1.0, 1.0, 0.0, 1.0),
                                  (1.0, 1.0, 1.0, math.inf)])
def test_bad_inputs_are_refused(args):
    with pytest.raises(ValueError):
        crossover(*args)


def _rows(model, rank, sync_merged, sync_hot, tok_lora, tok_merged=None):
    base = dict(suite="benchmark", backend="sglang", model=model)
    rows = [ResultRow(test="sync_merged", metric="sync_ms", value=sync_merged, strategy="merged",
                      params={"rank": rank}, **base),
            ResultRow(test="sync_merged", metric="sync_ms", value=sync_hot, strategy="hot-reload",
                      params={"rank": rank}, **base)]
    if tok_lora is not None:
        rows.append(ResultRow(test="rollout_merged", metric="output_tok_s", value=tok_lora, strategy="hot-reload",
                              params={"rank": rank, "serving": "lora"}, **base))
    if tok_merged is not None:
        rows.append(ResultRow(test="rollout_merged", metric="output_tok_s", value=tok_merged, strategy="merged",
                              params={"rank": rank, "serving": "merged"}, **base))
    return rows


def test_crossover_table_from_results_csv(tmp_path):
    w = ResultsWriter(tmp_path / "r.csv", fingerprint={"gpu_name": "NVIDIA H100", "gpu_count": "1"})
    w.append(_rows("qwen3-1.7b", 8, 3000.0, 30.0, 18_000.0, 28_000.0))
    w.append(_rows("qwen3-1.7b", 16, 3100.0, 40.0, 17_000.0, 27_000.0))
    w.append(_rows("qwen3-1.7b", 64, 3000.0, 60.0, None))  # no LoRA throughput at r=64: no row
    table = crossover_table(read_results(w.path))
    assert list(table["rank"]) == [8, 16] and set(table["device"]) == {"1xNVIDIA H100"}
    r16 = table[table["rank"] == 16].iloc[0]
    merged_median = (28_000.0 + 27_000.0) / 2  # merged throughput does not depend on the rank: all its rows
    assert r16[METRIC] == pytest.approx(crossover(3100.0, 40.0, merged_median, 17_000.0).tokens_per_step)
    assert r16["direction"] == "above"


def test_crossover_rows_validate_and_the_chart_copes_with_inf(tmp_path):
    assert metric_unit(METRIC) == "tokens_per_step"
    w = ResultsWriter(tmp_path / "c.csv", fingerprint={"gpu_name": "H100", "gpu_count": "1"})
    base = dict(suite="benchmark", test="x", backend="sglang", mode="split", strategy="merged", model="tiny")
    w.append(crossover_rows(base, crossover(3000.0, 40.0, 28_000.0, 18_000.0), {"rank": 16}))
    w.append(crossover_rows(base, crossover(3000.0, 40.0, 18_000.0, 18_000.0), {"rank": 64}))
    df = read_results(w.path)
    assert set(df["test"]) == {"crossover_merged"} and math.isinf(df["value"].max())
    table = compare([w.path])
    plot(table, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
