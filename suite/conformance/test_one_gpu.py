"""The one-GPU strategies on a real server: restart fallback (conformance 7), release/resume (conformance 8).

Both backends: SGLang restarts with --lora-paths and releases through its memory saver (with a CPU copy of the
weights); vLLM restarts with --lora-modules and releases through sleep mode (level 1: weights to the CPU, KV
dropped). Both passed on vLLM 0.26.0 in conformance run n (2x H100)."""
import dataclasses

import pytest

from reference_impl import conformance as C
from reference_impl.client import SamplingParams
from reference_impl.procs import pids_in_group
from reference_impl.results import ResultRow
from reference_impl.sync import ReleaseResume, Restart

from fixtures.gpu import server_overrides

from .probes import PROMPTS, reference_logprobs, served_logprobs
from .test_prefix_cache import LONG

pytestmark = [pytest.mark.gpu, pytest.mark.gpus(1)]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def test_restart_serves_newest_adapter_cold(server_pool, adapter_factory, hf_reference, results_writer, backend):
    cfg = dataclasses.replace(server_pool.base, **server_overrides(backend, mem_fraction_static=0.2))
    srv = server_pool.server_cls(cfg).start()
    try:
        strategy = Restart(srv)
        paused = strategy.pause_for_training()
        assert strategy.current is None  # the loop refuses to roll out now
        old_group = srv.process.pid
        adapter = adapter_factory(rank=16, seed=71)
        rec = strategy.publish(1, str(adapter))
        assert pids_in_group(old_group) == [], "a process of the old server survived the restart"
        C.assert_served(srv.client.models(), "policy-v1")
        first = srv.client.generate([LONG], GREEDY, lora="policy-v1")[0]
        C.assert_cold(first.cached_tokens, "first request after restart")
        C.assert_matches(served_logprobs(srv.client, "policy-v1"), reference_logprobs(hf_reference, adapter),
                         "restarted server vs HF+PEFT")
    finally:
        srv.stop()
    results_writer.append([ResultRow("conformance", "restart_fallback", "restart_s", rec.extra["restart_s"],
                                     strategy="restart"),
                           ResultRow("conformance", "restart_fallback", "server_stop_s", paused["stop_s"],
                                     strategy="restart")])


def test_release_frees_memory_and_outputs_survive(server_pool, adapter_factory, gpu_plan, results_writer, backend):
    cfg = dataclasses.replace(server_pool.base, **server_overrides(backend, mem_fraction_static=0.2),
                              **server_pool.base.memory_release_changes())
    gpu = gpu_plan["plan"].inference[0].index
    adapter = adapter_factory(rank=16, seed=81)
    with server_pool.server_cls(cfg) as srv:
        strategy = ReleaseResume(srv.client, gpu_index=gpu, server_pids=lambda: pids_in_group(srv.pid))
        strategy.publish(1, str(adapter))
        before = srv.client.generate(PROMPTS, GREEDY, lora=strategy.current, return_logprob=True)
        device_before = strategy.device_used_mib()
        paused = strategy.pause_for_training()
        device_freed = device_before - strategy.device_used_mib()
        note = f"{paused}; whole-GPU reading freed {device_freed:.0f} MiB; {_preload_note(srv.pid)}"
        rec = strategy.publish(2, str(adapter))  # resume, then hot-load the (same) weights as v2
        after = srv.client.generate(PROMPTS, GREEDY, lora=strategy.current, return_logprob=True)
    results_writer.append([ResultRow("conformance", "release_resume", m, float(v), strategy="release-resume")
                           for m, v in (("released_mib", paused["released_mib"]), ("release_s", paused["release_s"]),
                                        ("resume_s", rec.extra["resume_s"]))])
    # outputs must survive whether or not memory was freed: this half never xfails
    assert [r.output_ids for r in after] == [r.output_ids for r in before]
    C.assert_matches([r.output_logprobs for r in after], [r.output_logprobs for r in before], "after resume")
    # NVML, not torch stats (vllm #11743, sglang #4336: "released" memory that NVML still counts)
    assert paused["released_mib"] is not None, note
    if paused["released_mib"] <= RELEASE_FLOOR_MIB:
        if backend == "sglang":
            pytest.xfail(f"{SGLANG_4336} Measured: {note}")
        pytest.fail(f"sleep freed {paused['released_mib']:.0f} MiB (floor {RELEASE_FLOOR_MIB} MiB): {note}")


RELEASE_FLOOR_MIB = 1024  # the tiny model's KV pool alone is GBs at mem_fraction 0.2; 1 GiB is a floor
SGLANG_4336 = ("Upstream sglang #4336 (release_memory_occupation does not release memory): SGLang 0.5.14 answers "
               "200 in ~6 ms, logs the KV flush, and NVML shows nothing freed, while torch_memory_saver 0.0.10 "
               "alone, in the same venv and hook mode (LD_PRELOAD), frees 2044 of 2048 MiB "
               "(scripts/probe_tms.py, nvidia-h200, 2026-11-26); upstream's own test_release_memory_occupation "
               "is disabled in this version.")


def _preload_note(pgid: int) -> str:
    """torch_memory_saver frees memory only through its LD_PRELOAD hook: say which server processes have it."""
    notes = []
    for pid in pids_in_group(pgid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:40]
        except OSError:
            continue
        preload = [e.decode(errors="replace") for e in env if e.startswith(b"LD_PRELOAD=")]
        notes.append(f"{pid} {cmd.strip()}: {preload[0] if preload else 'no LD_PRELOAD'}")
    return "server processes: " + "; ".join(notes)
