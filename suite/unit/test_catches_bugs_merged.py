"""The suite catches the bug (merged full-weight sync): the checks of suite/conformance/test_merged_sync.py,
driven the same way, pass on the normal FAKE SGLang and raise on a fake with the bug. The fake is a test
double (fixtures/fake_sglang_weights.py), never GPU evidence; on a GPU the reference is HF on the merged dir.

    update_label_only      success + new weight_version, old weights served   -> logprobs vs reference
    no_flush_on_update     prefix cached before the sync reused after it      -> cached_tokens must be 0
    ignore_weight_update   success, nothing changes                           -> weight_version check
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fixtures.fake_sglang import FakeSGLangServer
from fixtures.fake_sglang_state import FakeSGLangState
from reference_impl import conformance as C
from reference_impl.client import SamplingParams, SGLangClient
from reference_impl.conformance import ConformanceError
from reference_impl.merge import WeightMerger
from reference_impl.sync import SyncError
from reference_impl.sync_merged import MergedSync

from .bugcatch_common import LONG, probe, served_logprobs

C_SAMPLING = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)


@dataclass
class MergedRun:
    served: list = field(default_factory=list)      # per version: input logprobs after the sync
    references: list = field(default_factory=list)  # per version: a correct server started on the merged dir
    first_cached: list = field(default_factory=list)  # cached_tokens of a prompt warmed BEFORE the sync
    versions: list = field(default_factory=list)    # per version: (pushed, weight_versions of its responses)


def drive_merged(micro_base, micro_adapters, tmp_path, bugs=()) -> MergedRun:
    """As the GPU test: warm a prefix, sync, probe that prefix once, take logprobs, compare with a server on the
    merged checkpoint."""
    run = MergedRun()
    merger = WeightMerger(micro_base, root=tmp_path / "merged", device="cpu")
    try:
        with FakeSGLangServer(FakeSGLangState(model_path=str(micro_base), bugs=bugs)) as srv:
            client = SGLangClient(srv.url, timeout_s=10)
            strategy = MergedSync(client, merger=merger)
            for i, adapter in enumerate(micro_adapters):
                probe(client, None, LONG)  # the prefix is now in the radix cache, computed by the old weights
                strategy.publish(i + 1, adapter)
                cached, _, _ = probe(client, None, LONG)
                run.first_cached.append(cached)
                res = client.generate([LONG[:8], LONG[:12]], C_SAMPLING)
                run.versions.append((strategy.current, [r.weight_version for r in res]))
                run.served.append(served_logprobs(client, None))
                with FakeSGLangServer(FakeSGLangState(model_path=strategy.current_path)) as ref:
                    run.references.append(served_logprobs(SGLangClient(ref.url, timeout_s=10), None))
    finally:
        merger.close()
    return run


def check_merged(run: MergedRun) -> None:
    for i, (served, ref) in enumerate(zip(run.served, run.references)):
        noise = C.assert_matches(served, ref, f"version {i + 1} vs the merged checkpoint")
        if i:
            C.assert_differs(served, run.served[i - 1], f"version {i + 1} vs version {i}", noise)
        C.assert_cold(run.first_cached[i], f"version {i + 1}: first request on a prefix cached before the sync")
        pushed, seen = run.versions[i]
        C.assert_weight_version(seen, pushed, f"version {i + 1}")


def test_merged_checks_pass_on_the_normal_fake(micro_base, micro_adapters, tmp_path):
    run = drive_merged(micro_base, micro_adapters[:2], tmp_path)
    check_merged(run)
    assert run.first_cached == [0, 0]


def test_merged_checks_catch_old_weights_under_a_new_label(micro_base, micro_adapters, tmp_path):
    run = drive_merged(micro_base, micro_adapters[:2], tmp_path, bugs={"update_label_only"})
    with pytest.raises(ConformanceError, match="version 1 vs the merged checkpoint: served logprobs differ"):
        check_merged(run)


def test_merged_checks_catch_kv_reused_across_the_sync(micro_base, micro_adapters, tmp_path):
    run = drive_merged(micro_base, micro_adapters[:2], tmp_path, bugs={"no_flush_on_update"})
    assert run.first_cached[0] > 0
    with pytest.raises(ConformanceError, match="version 1: first request on a prefix cached before the sync"):
        check_merged(run)


def test_merged_checks_catch_an_ignored_update(micro_base, micro_adapters, tmp_path):
    with pytest.raises(SyncError, match="still serves 'default', not policy-v1"):
        drive_merged(micro_base, micro_adapters[:1], tmp_path, bugs={"ignore_weight_update"})
    with pytest.raises(ConformanceError, match=r"weight_version \['default'\], the version pushed is 'policy-v1'"):
        C.assert_weight_version(["default", "default"], "policy-v1", "responses")
