"""Merged full-weight sync (issue #10) on a real server: the LoRA merged into the base weights, loaded whole with
/update_weights_from_disk between /pause_generation (retract) and /continue_generation.

  * served input logprobs equal HF on the merged checkpoint (reference_impl.conformance tolerance: bf16 on
    both sides) and differ from the previous version;
  * meta_info.weight_version and /model_info name the version pushed;
  * a prefix cached before the sync is not reused after it (cached_tokens == 0) and its output matches the
    new weights on a flushed cache;
  * requests running during the sync all complete (none fail, none aborted), each naming a weight version.

The merged sync rewrites the server's BASE weights, so this module runs on the session's plain_server (no LoRA,
mem fraction 0.15, launched at session start: fixtures/gpu.py) and never touches the shared lora_server. CPU counterparts against the FAKE SGLang's
bug modes: suite/unit/test_catches_bugs_merged.py. Budget: < 45 s on one GPU once the server is up.
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fixtures.plugin import sglang_only
from reference_impl import conformance as C
from reference_impl.client import SamplingParams
from reference_impl.hf_engine import input_logprobs
from reference_impl.results import ResultRow
from reference_impl.server import ALL_LINEAR

from .probes import PROMPTS, served_logprobs
from .test_prefix_cache import LONG

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(1)]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
IN_FLIGHT = 32
IN_FLIGHT_TOKENS = 384  # long enough that requests are mid-decode when the sync lands (tiny model, no graphs)
_versions = itertools.count(1)


@pytest.fixture(scope="module")
def merged_server(plain_server, backend):
    sglang_only(backend, "SGLang's /update_weights_from_disk with pause/continue (vLLM: not wired)")
    return plain_server


@pytest.fixture(scope="module")
def strategy(merged_server, model_dir):
    from reference_impl.merge import WeightMerger
    from reference_impl.sync_merged import MergedSync

    s = MergedSync(merged_server.client, merger=WeightMerger(model_dir.path))
    yield s
    s.close()


@pytest.fixture(scope="module")
def merged_reference(model_dir):
    """HF (bf16, training GPU) reloaded from each merged checkpoint: the reference for the served logprobs."""
    from reference_impl.hf_engine import HFEngine
    return HFEngine(str(model_dir.path), device="cuda", dtype="bfloat16")


def _rows(rec, params=None) -> list[ResultRow]:
    values = {"sync_ms": rec.sync_ms, **{k: rec.extra[k] for k in ("merge_ms", "write_ms", "update_ms", "pause_ms")}}
    return [ResultRow("conformance", "merged_sync", m, float(v), strategy="merged", params=params or {})
            for m, v in values.items()]


def test_merged_logprobs_equal_hf_on_the_merged_checkpoint(merged_server, strategy, merged_reference,
                                                          adapter_factory, results_writer):
    client = merged_server.client
    previous = served_logprobs(client, None)  # the base weights
    rows = []
    for seed in (301, 302):
        adapter = adapter_factory(rank=16, modules=ALL_LINEAR, seed=seed)
        rec = strategy.publish(next(_versions), str(adapter))
        assert client.model_info()["weight_version"] == strategy.current
        C.assert_weight_version([r.weight_version for r in client.generate(PROMPTS[:2], GREEDY)], strategy.current,
                                "responses after the sync")
        served = served_logprobs(client, None)
        merged_reference.update_weights_from_disk(strategy.current_path, weight_version=strategy.current)
        noise = C.assert_matches(served, input_logprobs(merged_reference, PROMPTS, None),
                                 f"{strategy.current}: SGLang vs HF on the merged checkpoint")
        effect = C.assert_differs(served, previous, f"{strategy.current} vs the previous weights", noise)
        previous = served
        params = {"rank": 16, "modules": "all-linear"}
        rows += _rows(rec, params)
        rows += [ResultRow("conformance", "merged_sync", "logprob_max_abs_diff_ratio", noise.max_abs,
                           strategy="merged", params=params),
                 ResultRow("conformance", "merged_sync", "adapter_effect_mean_abs_ratio", effect.mean_abs,
                           strategy="merged", params=params)]
    results_writer.append(rows)


def test_kv_from_before_the_sync_is_never_reused(merged_server, strategy, adapter_factory, page_size):
    client = merged_server.client
    client.generate([LONG], GREEDY)
    warm = client.generate([LONG], GREEDY, return_logprob=True)[0]
    C.assert_warm(warm.cached_tokens, len(LONG), "the same prompt again before the sync", page_size)
    strategy.publish(next(_versions), str(adapter_factory(rank=16, modules=ALL_LINEAR, seed=311)))
    first = client.generate([LONG], GREEDY, return_logprob=True)[0]
    C.assert_cold(first.cached_tokens, "first request on a prefix cached before the merged sync")
    client.flush_cache(wait_idle_s=30)
    fresh = client.generate([LONG], GREEDY, return_logprob=True)[0]
    assert first.output_ids == fresh.output_ids, "first answer after the sync differs from the new weights' own"
    noise = C.assert_matches([first.output_logprobs], [fresh.output_logprobs], "first after sync vs flushed cache")
    C.assert_differs([first.output_logprobs], [warm.output_logprobs], "after vs before the sync", noise)


def test_requests_in_flight_during_the_sync_complete(merged_server, strategy, adapter_factory, results_writer):
    client = merged_server.client
    adapter = adapter_factory(rank=16, modules=ALL_LINEAR, seed=321)
    if strategy.current is None:
        strategy.publish(next(_versions), str(adapter))
    old = strategy.current
    sampling = SamplingParams(max_new_tokens=IN_FLIGHT_TOKENS, temperature=1.0, ignore_eos=True)
    prompts = [[1000 + i] * 32 for i in range(IN_FLIGHT)]

    def one(prompt):
        t0 = time.monotonic()
        res = client.generate([prompt], sampling, timeout_s=300)[0]
        return t0, time.monotonic(), res

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        time.sleep(0.5)  # let them reach decode
        t_sync = time.monotonic()
        rec = strategy.publish(next(_versions), str(adapter))
        done = [f.result(timeout=300) for f in futures]  # re-raises any failed request
    overlapped = [d for d in done if d[0] < t_sync < d[1]]
    assert overlapped, "no request was in flight when the sync started: the test proved nothing (raise " \
                       "IN_FLIGHT_TOKENS)"
    results = [d[2] for d in done]
    assert {r.finish_reason for r in results} == {"length"}, [r.meta.get("finish_reason") for r in results]
    assert all(r.completion_tokens == IN_FLIGHT_TOKENS for r in results)
    versions = {r.weight_version for r in results}
    assert versions <= {old, strategy.current}, f"responses name {versions}, expected {old} or {strategy.current}"
    assert merged_server.client.health(), "the server did not survive the sync under load"
    results_writer.append(_rows(rec, {"rank": 16, "in_flight": len(overlapped)}))
