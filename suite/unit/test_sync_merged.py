"""MergedSync against the FAKE SGLang (a test double: protocol and error paths only, never GPU evidence).

The fake models the real hazard (shared notes section 3): an update that flushes the cache while requests
run or wait crashes SGLang 0.5.14's scheduler, also after a "retract" pause (sglang PR #31962). A naive update
under load crashes the fake here; MergedSync (retract, update without flush, continue, flush when idle, rollouts
namespaced by version) loses no request, and every request finishes on the new weights' version.
"""
from __future__ import annotations

import threading
import time

import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl import conformance as C
from reference_impl.client import GenerateResult, SamplingParams, ServerHTTPError, SGLangClient
from reference_impl.merge import WeightMerger
from reference_impl.sync import SyncError
from reference_impl.sync_merged import MergedSync

from .bugcatch_common import served_logprobs

SLOW = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture
def merger(micro_base, tmp_path):
    m = WeightMerger(micro_base, root=tmp_path / "merged", device="cpu")
    yield m
    m.close()


def serve(micro_base, **kw):
    return FakeSGLangServer(FakeSGLangState(model_path=str(micro_base), **kw))


def in_flight(client, n: int, prompt_len: int = 8):
    """n single requests on threads; returns (threads, results, errors) lists filled as they finish."""
    results, errors = [], []

    def one(i):
        try:
            results.append(client.generate([[10 + i] * prompt_len], SLOW, timeout_s=60)[0])
        except Exception as e:  # noqa: BLE001 - collected: the test asserts there are none (or some)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def wait_busy(state, n: int, limit_s: float = 10.0) -> None:
    """Poll (a request starting notifies no one) until n requests are in flight."""
    deadline = time.monotonic() + limit_s
    while state.busy < n:
        assert time.monotonic() < deadline, f"only {state.busy} of {n} requests ever ran"
        time.sleep(0.01)


def test_client_update_weights_protocol(micro_base, merger, micro_adapters, tmp_path):
    merged = merger.merge(micro_adapters[0], "policy-v1").path
    with serve(micro_base) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        before = client.generate([[5, 6, 7]], SLOW)[0]
        assert before.weight_version == "default"
        answer = client.update_weights_from_disk(str(merged), weight_version="policy-v1")
        assert answer["success"] is True
        assert client.model_info()["weight_version"] == "policy-v1" and client.weight_version() == "policy-v1"
        assert client.model_info()["model_path"] == str(merged)
        after = client.generate([[5, 6, 7]], SLOW)[0]
        assert after.weight_version == "policy-v1" and after.output_ids != before.output_ids  # new weights
        with pytest.raises(ServerHTTPError, match="not a model dir.*Rolling back"):
            client.update_weights_from_disk(str(tmp_path / "nowhere"), weight_version="policy-v2")
        assert client.weight_version() == "policy-v1"  # rolled back: still the last good version
    with serve(micro_base, load_format="dummy") as srv:  # a dummy-weights server must be told load_format auto
        client = SGLangClient(srv.url, timeout_s=10)
        with pytest.raises(ServerHTTPError, match="Failed to get model loader"):
            client.update_weights_from_disk(str(merged))
        client.update_weights_from_disk(str(merged), load_format="auto", weight_version="policy-v1")
        assert client.weight_version() == "policy-v1"


def test_a_naive_update_under_load_crashes_the_fake_scheduler(micro_base, merger, micro_adapters):
    """The hazard is modelled: without a pause, flushing with running requests kills the (fake) scheduler."""
    merged = merger.merge(micro_adapters[0], "policy-v1").path
    with serve(micro_base, request_delay_s=0.5) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        threads, results, errors = in_flight(client, 3)
        wait_busy(srv.state, 3)
        with pytest.raises(ServerHTTPError, match="Cache flush failed after updating weights"):
            client.update_weights_from_disk(str(merged), weight_version="policy-v1")
        for t in threads:
            t.join(30)
        assert len(errors) == 3 and not results, "running requests must fail when the scheduler dies"
        assert not client.health()


def test_merged_sync_pauses_first_and_loses_no_request(micro_base, merger, micro_adapters):
    with serve(micro_base, request_delay_s=0.5) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = MergedSync(client, merger=merger)
        assert strategy.current is None and strategy.request_lora is None
        strategy.publish(0, str(micro_adapters[0]))
        threads, results, errors = in_flight(client, 6)
        wait_busy(srv.state, 6)
        rec = strategy.publish(1, str(micro_adapters[1]))
        for t in threads:
            t.join(30)
        assert not errors and len(results) == 6, errors
        assert srv.state.crashed is None and srv.state.paused is None
        assert {r.finish_reason for r in results} == {"length"} and all(r.completion_tokens == 3 for r in results)
        # retracted while running, finished after continue: on the new weights, naming the new version
        C.assert_weight_version([r.weight_version for r in results], "policy-v1", "requests in flight")
        assert rec.extra["num_paused_requests"] == 6
        for key in ("merge_ms", "write_ms", "update_ms", "pause_ms"):
            assert rec.extra[key] >= 0, key
        assert rec.sync_ms >= rec.extra["merge_ms"] + rec.extra["write_ms"] + rec.extra["update_ms"]
        assert strategy.current == "policy-v1" and strategy.current_version == 1


def test_merged_sync_serves_the_merged_weights(micro_base, merger, micro_adapters):
    with serve(micro_base) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = MergedSync(client, merger=merger)
        base_lps = served_logprobs(client, None)
        strategy.publish(1, str(micro_adapters[1]))
        served = served_logprobs(client, None)
        with serve(strategy.current_path) as ref:  # a correct server started on the merged checkpoint
            reference = served_logprobs(SGLangClient(ref.url, timeout_s=10), None)
    noise = C.assert_matches(served, reference, "after merged sync vs a server started on the merged dir")
    C.assert_differs(served, base_lps, "after merged sync vs micro_base", noise)


def test_check_result_rejects_any_other_weight_version(micro_base, merger):
    strategy = MergedSync(SGLangClient("http://127.0.0.1:9", timeout_s=1), merger=merger)
    strategy.current = "policy-v2"
    ok = GenerateResult([1], 1, 1, 0, "length", weight_version="policy-v2")
    strategy.check_result(ok)
    for stale in ("policy-v1", "default", None):
        with pytest.raises(SyncError, match=f"weight_version={stale!r}.*pushed is 'policy-v2'"):
            strategy.check_result(GenerateResult([1], 1, 1, 0, "length", weight_version=stale))


def test_a_failed_update_says_which_version_is_served_and_resumes(micro_base, merger, micro_adapters):
    with serve(micro_base, load_format="dummy") as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = MergedSync(client, merger=merger, load_format=None)  # forgot "auto" on a dummy server
        with pytest.raises(SyncError, match="model loader.*still serves weight_version 'default'"):
            strategy.publish(1, str(micro_adapters[0]))
        assert srv.state.paused is None, "continue_generation must run after a failed update"
        assert strategy.current is None
        assert client.generate([[1, 2]], SLOW)[0].weight_version == "default"


def test_ignored_update_is_refused_by_publish(micro_base, merger, micro_adapters):
    with serve(micro_base, bugs={"ignore_weight_update"}) as srv:
        strategy = MergedSync(SGLangClient(srv.url, timeout_s=10), merger=merger)
        with pytest.raises(SyncError, match="answered success but /model_info reports weight_version='default'"):
            strategy.publish(1, str(micro_adapters[0]))


def test_retract_then_update_with_flush_still_crashes_the_fake_scheduler(micro_base, merger, micro_adapters):
    """Why MergedSync passes flush_cache false: retract moves running requests into the waiting queue, and the
    0.5.14 flush needs that queue empty too (read in its source; upstream PR #31962 fixes it later)."""
    merged = merger.merge(micro_adapters[0], "policy-v1").path
    with serve(micro_base, request_delay_s=0.5) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        threads, results, errors = in_flight(client, 3)
        wait_busy(srv.state, 3)
        client.pause_generation(mode="retract")
        with pytest.raises(ServerHTTPError, match="Cache flush failed after updating weights"):
            client.update_weights_from_disk(str(merged), weight_version="policy-v1", flush_cache=True)
        for t in threads:
            t.join(30)
        assert len(errors) == 3 and not results


def test_flush_after_continue_happens_when_idle_and_is_skipped_when_busy(micro_base, merger, micro_adapters):
    with serve(micro_base, request_delay_s=0.5) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = MergedSync(client, merger=merger)
        assert strategy.publish(0, str(micro_adapters[0])).extra["flushed"] == 1.0  # idle: flushed at once
        threads, results, errors = in_flight(client, 4)
        wait_busy(srv.state, 4)
        rec = strategy.publish(1, str(micro_adapters[1]))
        for t in threads:
            t.join(30)
        assert rec.extra["flushed"] == 0.0 and not errors and len(results) == 4  # busy: a 400, not an error


def test_rollouts_are_namespaced_by_version_so_unflushed_prefixes_never_match(micro_base, merger, micro_adapters):
    """With a cache that is never emptied (bug mode no_flush_on_update makes /flush_cache a no-op), a rollout
    through the loop names its version as extra_key and finds nothing cached by the previous version's weights,
    while a request without the key (an outside client) does reuse the stale prefix."""
    from reference_impl.loop import LoopConfig, rollout

    class OnePrompt:
        def prompts(self, step, n):
            return [[7, 8, 9, 10, 11, 12, 13, 14]] * n

        def reward(self, prompt, ids):
            return 0.0

    cfg = LoopConfig(prompts_per_step=1, group_size=1, max_new_tokens=2)
    with serve(micro_base, bugs={"no_flush_on_update"}) as srv:
        client = SGLangClient(srv.url, timeout_s=10)
        strategy = MergedSync(client, merger=merger)
        strategy.publish(0, str(micro_adapters[0]))
        rollout(client, strategy, OnePrompt(), cfg, 0)                # cached under policy-v0
        client.generate([[7, 8, 9, 10, 11, 12, 13, 14]], SLOW)        # and without a key
        strategy.publish(1, str(micro_adapters[1]))
        fresh = rollout(client, strategy, OnePrompt(), cfg, 1)[0]
        outside = client.generate([[7, 8, 9, 10, 11, 12, 13, 14]], SLOW)[0]
    assert fresh.cached_tokens == 0, "a rollout of policy-v1 reused a prefix cached by policy-v0's weights"
    assert outside.cached_tokens > 0  # the fake's cache really kept it: the namespace is what protected the rollout
