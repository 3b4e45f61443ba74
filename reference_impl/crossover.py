"""Merged full-weight sync vs LoRA hot reload: the rollout size per step above which merged wins.

One step (training is the same for both and left out) costs

    hot reload:  sync_hot_s    + N / tok_s_lora      (rollouts served with the adapter: slower decode)
    merged:      sync_merged_s + N / tok_s_merged    (the whole model moves each step; base-speed decode)

for N rollout output tokens per step. Merged wins when sync_merged_s - sync_hot_s < N * (1/tok_s_lora -
1/tok_s_merged), so the crossover is

    N* = (sync_merged_s - sync_hot_s) / (1/tok_s_lora - 1/tok_s_merged)      [tokens per step]

Edge cases are named, never divided through: merged rollouts no faster and its sync slower -> inf (never
wins); rollouts faster and sync no slower -> 0 (always wins); rollouts slower but sync faster -> merged wins
only BELOW N* (direction "below").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

METRIC = "crossover_tokens_per_step"


@dataclass(frozen=True)
class Crossover:
    tokens_per_step: float   # N*; inf: merged never wins; 0: merged always wins
    direction: str           # "above" (merged wins for N > N*), "below", "never", "always"
    reason: str


def crossover(sync_merged_ms: float, sync_hot_ms: float, tok_s_merged: float, tok_s_lora: float) -> Crossover:
    for name, v in (("sync_merged_ms", sync_merged_ms), ("sync_hot_ms", sync_hot_ms)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}={v!r}: a sync time must be finite and >= 0")
    for name, v in (("tok_s_merged", tok_s_merged), ("tok_s_lora", tok_s_lora)):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}={v!r}: a throughput must be finite and > 0")
    d_sync = (sync_merged_ms - sync_hot_ms) / 1e3          # extra seconds merged pays per step
    d_rate = 1.0 / tok_s_lora - 1.0 / tok_s_merged          # seconds merged saves per rollout token
    if d_rate > 0 and d_sync <= 0:
        return Crossover(0.0, "always", "merged syncs no slower and serves faster: it wins at every rollout size")
    if d_rate <= 0 and d_sync >= 0:
        return Crossover(math.inf, "never", "merged serves no faster and syncs no faster: it never wins")
    n = d_sync / d_rate
    if d_rate > 0:
        return Crossover(n, "above", f"merged wins above {n:.0f} rollout tokens per step")
    return Crossover(n, "below", f"merged serves slower but syncs faster: it wins only below {n:.0f} tokens "
                                 "per step")


def step_s(sync_ms: float, tok_s: float, tokens_per_step: float) -> float:
    """Predicted sync + rollout seconds of one step (the model behind the crossover)."""
    return sync_ms / 1e3 + tokens_per_step / tok_s


# ---------------------------------------------------------------- from results rows

SYNC_TEST = "sync_merged"          # rows: metric sync_ms, strategy merged | hot-reload, params rank
ROLLOUT_TEST = "rollout_merged"    # rows: metric output_tok_s, params serving lora | merged, rank
CROSSOVER_TEST = "crossover_merged"


def _label(row) -> str:
    if row.get("device_kind"):
        return row["device_kind"]
    return f"{row.get('gpu_count', '')}x{row.get('gpu_name', '')}" if row.get("gpu_name") else "cpu"


def crossover_table(df: pd.DataFrame) -> pd.DataFrame:
    """Crossover rows from the long results table (read_results): per (device, model, rank) the median
    sync_ms of merged and hot-reload (test sync_merged) and output_tok_s serving lora at that rank and
    merged (test rollout_merged). Returns columns device, model, rank, sync_merged_ms, sync_hot_ms,
    tok_s_merged, tok_s_lora, crossover_tokens_per_step, direction, reason; rows lacking a number are left
    out."""
    import json

    if df.empty:
        return pd.DataFrame()
    df = df.assign(device=df.apply(lambda r: _label(r), axis=1),
                   rank=df["params"].map(lambda p: json.loads(p).get("rank")),
                   serving=df["params"].map(lambda p: json.loads(p).get("serving")))
    out = []
    for (device, model), g in df.groupby(["device", "model"], sort=False):
        sync = g[(g["test"] == SYNC_TEST) & (g["metric"] == "sync_ms")]
        tput = g[(g["test"] == ROLLOUT_TEST) & (g["metric"] == "output_tok_s")]
        merged_tok = tput[tput["serving"] == "merged"]["value"].median()
        for rank in sorted({r for r in sync["rank"] if r is not None}):
            sm = sync[(sync["rank"] == rank) & (sync["strategy"] == "merged")]["value"].median()
            sh = sync[(sync["rank"] == rank) & (sync["strategy"] == "hot-reload")]["value"].median()
            tl = tput[(tput["serving"] == "lora") & (tput["rank"] == rank)]["value"].median()
            if any(pd.isna(v) for v in (sm, sh, tl, merged_tok)):
                continue
            c = crossover(sm, sh, merged_tok, tl)
            out.append({"device": device, "model": model, "rank": rank, "sync_merged_ms": sm, "sync_hot_ms": sh,
                        "tok_s_merged": merged_tok, "tok_s_lora": tl, METRIC: c.tokens_per_step,
                        "direction": c.direction, "reason": c.reason})
    return pd.DataFrame(out)


def crossover_rows(base: dict, c: Crossover, params: dict) -> list:
    """One results row (metric crossover_tokens_per_step). inf (merged never wins) is written as inf and the
    direction names it; a reader must not mistake it for a measured size."""
    from .results import ResultRow

    return [ResultRow(metric=METRIC, value=float(c.tokens_per_step),
                      params={**params, "direction": c.direction}, **{**base, "test": CROSSOVER_TEST})]
