"""The conformance properties as plain functions, so the GPU suite and users' scripts check the same way, and
CPU tests can show each check fails on a server that has the bug (fixtures/fake_sglang.py bug modes).

Tolerance for SGLang vs HF+PEFT input logprobs (bf16): max |diff| <= 0.15 and mean |diff| <= 0.05 nats.
Why: both sides run bf16 weights and activations (8-bit mantissa, relative rounding ~4e-3) through kernels
that sum in different orders; the tiny model's logits have std ~2.3 and reach |10|, so positions move by a few
hundredths and, rarely, ~0.1. SGLang's own HF comparison uses 0.1 on max |diff| with fp16 (3 more mantissa
bits). Measured on 2xH200 (suite run, 2026-11-26): max 0.03-0.05, mean 0.011-0.030. A different adapter moves
the mean by 0.65-1.44, so "clearly different" is a mean |diff| of at least 5x the measured noise and >= 0.1.

The bound grows with how sharp the policy is. After a few training steps at lr 2e-2 the fixed (random-token)
probe prompts score -27 nats on average: the logits then span ~40, and a bf16 logit of 40 is only known to
+-0.125. The error shows up as a shift shared by a whole row (the log-normaliser), not per token: a CPU run of
the same probes, bf16 against fp32, shifts every position of a row by the same amount. On 2xH200 (run d) the
two stacks then differed by mean 0.29 / max 0.89 nats, while the same adapter file loaded fresh on the server
matched the served one exactly. So it is rounding, not a stale slot. The scale used is the excess over a uniform policy,
e = max(0, |ref| - ln V), with V = 151936 (Qwen3's vocabulary; ln V = 11.93 nats), averaged per prompt:
    per position  |d| <= 0.15 + 2^-4 * mean_row(e)        mean  |d| <= 0.05 + 2^-5 * mean(e)
For an untrained model e is ~1 and the bounds stay near 0.15 / 0.05. At run d's step 2 (mean e ~15.5) they are
~1.1 / 0.53: 1.9x the mean measured there. A wrong or stale adapter moves the mean by 0.65-1.6 nats at e ~1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MAX_ABS_TOL = 0.15
MEAN_ABS_TOL = 0.05
MIN_DISTINCT_MEAN = 0.1
MAX_REL_TOL = 2 ** -4   # of the prompt's mean excess over uniform, per position
MEAN_REL_TOL = 2 ** -5  # of the mean excess over uniform
UNIFORM_NATS = math.log(151936)  # |logprob| of a token under a uniform policy over Qwen3's vocabulary


class ConformanceError(AssertionError):
    pass


@dataclass(frozen=True)
class LogprobDiff:
    max_abs: float
    mean_abs: float
    positions: int
    mean_sharpness: float = 0.0  # mean excess of |b| (the reference side) over a uniform policy
    worst_excess: float = 0.0  # max over positions of |d| - its bound; > 0 fails

    def __str__(self) -> str:
        return (f"max|d|={self.max_abs:.4f} mean|d|={self.mean_abs:.4f} over {self.positions} positions "
                f"(mean sharpness |ref|-lnV={self.mean_sharpness:.2f})")

    @property
    def mean_tolerance(self) -> float:
        return MEAN_ABS_TOL + MEAN_REL_TOL * self.mean_sharpness

    def within_tolerance(self) -> bool:
        return self.worst_excess <= 0 and self.mean_abs <= self.mean_tolerance


def logprob_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> LogprobDiff:
    """Per-position |a-b| over prompts; None entries (SGLang's position 0) are skipped."""
    if len(a) != len(b):
        raise ConformanceError(f"{len(a)} vs {len(b)} prompts")
    diffs, bounds, sharpness = [], [], []
    for i, (ra, rb) in enumerate(zip(a, b)):
        ra = [x for x in ra if x is not None]
        rb = [x for x in rb if x is not None]
        if len(ra) != len(rb):
            raise ConformanceError(f"prompt {i}: {len(ra)} vs {len(rb)} logprobs (misaligned)")
        row = [max(0.0, abs(y) - UNIFORM_NATS) for y in rb]
        row_bound = MAX_ABS_TOL + MAX_REL_TOL * (sum(row) / len(row) if row else 0.0)
        diffs += [abs(x - y) for x, y in zip(ra, rb)]
        bounds += [row_bound] * len(rb)
        sharpness += row
    if not diffs:
        raise ConformanceError("no positions to compare")
    excess = max(d - bound for d, bound in zip(diffs, bounds))
    return LogprobDiff(max(diffs), sum(diffs) / len(diffs), len(diffs), sum(sharpness) / len(sharpness), excess)


def assert_matches(served, reference, what: str) -> LogprobDiff:
    d = logprob_diff(served, reference)
    if not d.within_tolerance():
        raise ConformanceError(f"{what}: served logprobs differ from the reference beyond bf16 tolerance "
                               f"(per position {MAX_ABS_TOL} + 2^-4 x the prompt's sharpness, mean {d.mean_tolerance:.3f}): {d}; "
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


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp* print them
WILDCARD_HEX = {"00000000", "00000000000000000000000000000000"}  # 0.0.0.0 and ::


# process titles that initialise torch.distributed: SGLang's scheduler ("sglang::scheduler"), vLLM's engine
# core ("VLLM::EngineCore", run m's TP=1 server)
TCPSTORE_HOLDERS = ("scheduler", "enginecore")


def _holds_tcpstore(owner: str) -> bool:
    return any(title in owner.lower() for title in TCPSTORE_HOLDERS)


def listeners_beyond_loopback(listeners, tp_size: int) -> list:
    """[(hex address, port, owner)] LISTEN sockets of a server -> its TCPStore listeners (wildcard, held by the
    process that initialises torch.distributed: PyTorch binds them so even for a loopback init_method; at most
    one per TP rank). Raises ConformanceError for anything else beyond loopback, e.g. a socket on the host's own
    network address (a TP=2 server had 14, from its collectives' bootstrap)."""
    beyond = [(a, p, who) for a, p, who in listeners if a not in LOOPBACK_HEX]
    store = [(p, who) for a, p, who in beyond if a in WILDCARD_HEX and _holds_tcpstore(who)]
    others = [(a, p, who) for a, p, who in beyond if (p, who) not in store]
    if others or len(store) > tp_size:
        raise ConformanceError(f"server ports beyond loopback: {beyond}")
    return store
