"""The conformance properties as plain functions, so the GPU suite and users' scripts check the same way, and
CPU tests can show each check fails on a server that has the bug (fixtures/fake_sglang.py bug modes).

Tolerance for SGLang vs HF+PEFT input logprobs (bf16): max |diff| <= 0.15 and mean |diff| <= 0.05 nats.
Why: both sides run bf16 weights and activations (8-bit mantissa, relative rounding ~4e-3) through kernels
that sum in different orders; the tiny model's logits have std ~2.3 and reach |10|, so positions move by a few
hundredths and, rarely, ~0.1. SGLang's own HF comparison uses 0.1 on max |diff| with fp16 (3 more mantissa
bits). Measured on 2xH200 (suite run, 2026-11-26): max 0.03-0.05, mean 0.011-0.030. A different adapter moves
the mean by 0.65-1.44, so "clearly different" is a mean |diff| of at least 5x the measured noise and >= 0.1.

The bound grows with the logprob's own size: a bf16 number of magnitude L is only known to ~L*2^-8, and after
training steps at lr 2e-2 the policy is so sharp that fixed prompts score -27 nats on average (logits near 40).
There the two stacks differed by mean 0.29 / max 0.89 (about 1% / 2% of |logprob|) on 2xH200, while the same
adapter file loaded fresh on the server matched to the bit, so that is rounding, not a stale slot. Hence
per position |d| <= 0.15 + 2^-5*|ref| (4 bf16 ulps of the value) and mean |d| <= 0.05 + 2^-6*mean|ref|.
At the moderate logprobs of the first steps (|ref| ~ 3) this adds < 0.1 to the max and < 0.05 to the mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MAX_ABS_TOL = 0.15
MEAN_ABS_TOL = 0.05
MIN_DISTINCT_MEAN = 0.1
MAX_REL_TOL = 2 ** -5    # of |reference logprob|, per position
MEAN_REL_TOL = 2 ** -6   # of mean |reference logprob|


class ConformanceError(AssertionError):
    pass


@dataclass(frozen=True)
class LogprobDiff:
    max_abs: float
    mean_abs: float
    positions: int
    mean_ref: float = 0.0     # mean |b| (the reference side)
    worst_excess: float = 0.0  # max over positions of |d| - (MAX_ABS_TOL + MAX_REL_TOL*|b|); > 0 fails

    def __str__(self) -> str:
        return (f"max|d|={self.max_abs:.4f} mean|d|={self.mean_abs:.4f} over {self.positions} positions "
                f"(mean|ref|={self.mean_ref:.2f})")

    @property
    def mean_tolerance(self) -> float:
        return MEAN_ABS_TOL + MEAN_REL_TOL * self.mean_ref

    def within_tolerance(self) -> bool:
        return self.worst_excess <= 0 and self.mean_abs <= self.mean_tolerance


def logprob_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> LogprobDiff:
    """Per-position |a-b| over prompts; None entries (SGLang's position 0) are skipped."""
    if len(a) != len(b):
        raise ConformanceError(f"{len(a)} vs {len(b)} prompts")
    diffs, refs = [], []
    for i, (ra, rb) in enumerate(zip(a, b)):
        ra = [x for x in ra if x is not None]
        rb = [x for x in rb if x is not None]
        if len(ra) != len(rb):
            raise ConformanceError(f"prompt {i}: {len(ra)} vs {len(rb)} logprobs (misaligned)")
        diffs += [abs(x - y) for x, y in zip(ra, rb)]
        refs += [abs(y) for y in rb]
    if not diffs:
        raise ConformanceError("no positions to compare")
    excess = max(d - (MAX_ABS_TOL + MAX_REL_TOL * r) for d, r in zip(diffs, refs))
    return LogprobDiff(max(diffs), sum(diffs) / len(diffs), len(diffs), sum(refs) / len(refs), excess)


def assert_matches(served, reference, what: str) -> LogprobDiff:
    d = logprob_diff(served, reference)
    if not d.within_tolerance():
        raise ConformanceError(f"{what}: served logprobs differ from the reference beyond bf16 tolerance "
                               f"(per position {MAX_ABS_TOL} + 2^-5*|ref|, mean {d.mean_tolerance:.3f}): {d}; "
                               f"worst position exceeds its bound by {max(d.worst_excess, 0):.3f}")
    return d


def assert_differs(a, b, what: str, noise: LogprobDiff | None = None) -> LogprobDiff:
    d = logprob_diff(a, b)
    floor = max(MIN_DISTINCT_MEAN, 5 * noise.mean_abs) if noise else MIN_DISTINCT_MEAN
    if d.mean_abs < floor:
        raise ConformanceError(f"{what}: outputs are not clearly different ({d}; need mean >= {floor:.3f}): "
                               "the served policy did not change")
    return d


def assert_served(models: Sequence[str], current: str, retired: Sequence[str] = ()) -> None:
    """/v1/models must list the current adapter and none of the retired ones."""
    if current not in models:
        raise ConformanceError(f"{current} is not served: /v1/models lists {list(models)}")
    stale = [r for r in retired if r in models]
    if stale:
        raise ConformanceError(f"retired adapters still loaded: {stale} (server lists {list(models)})")


def assert_cold(cached_tokens: int, what: str) -> None:
    if cached_tokens != 0:
        raise ConformanceError(f"{what}: first request on a freshly loaded adapter reused {cached_tokens} cached "
                               "tokens (stale KV from the previous weights)")


def assert_warm(cached_tokens: int, prompt_len: int, what: str, page_size: int = 1) -> None:
    floor = ((prompt_len - 1) // page_size) * page_size
    if cached_tokens < floor:
        raise ConformanceError(f"{what}: expected >= {floor} cached tokens on a repeated prompt, got {cached_tokens}")


def assert_adapter_count(loaded: Sequence[str], limit: int) -> None:
    if len(loaded) > limit:
        raise ConformanceError(f"{len(loaded)} adapters loaded, more than the configured {limit}: old versions "
                               f"pile up ({sorted(loaded)[:8]}...)")


def assert_memory_flat(samples_mib: Sequence[float], max_growth_mib: float) -> float:
    growth = max(samples_mib) - samples_mib[0]
    if growth > max_growth_mib:
        raise ConformanceError(f"server GPU memory grew by {growth:.0f} MiB over the syncs (bound "
                               f"{max_growth_mib:.0f} MiB): adapters or buffers are not released")
    return growth


def check_inplace_reload(client, name: str, old_path: str, new_path: str, prompt, sampling) -> None:
    """vLLM's same-name reload (`load_inplace`) must neither reuse the old weights' prefix KV (vllm #42125)
    nor answer differently from the same weights on a cold cache. `client` is a VLLMClient."""
    client.load_lora_adapter(name, old_path)
    client.generate([prompt], sampling, lora=name)  # warm the prefix on the old weights
    client.load_lora_adapter(name, new_path, load_inplace=True)
    served = client.generate([prompt], sampling, lora=name, return_logprob=True)[0]
    client.flush_cache()
    fresh = client.generate([prompt], sampling, lora=name, return_logprob=True)[0]
    assert_matches([served.output_logprobs], [fresh.output_logprobs], "output after load_inplace")
    assert_cold(served.cached_tokens, "first request after load_inplace")


def assert_weight_version(versions: Sequence[str | None], expected: str, what: str) -> None:
    """Every response must name the weight version pushed (meta_info.weight_version): a server that answered
    the update with success but serves older weights says so here, or the logprob checks catch it."""
    wrong = sorted({str(v) for v in versions if v != expected})
    if wrong:
        raise ConformanceError(f"{what}: responses name weight_version {wrong}, the version pushed is {expected!r}")
