"""Adapter lifecycle (conformance 6): after 50 syncs the server holds at most the configured adapters and its
NVML memory is flat. Bound: 64 MiB of growth on the inference GPU (adapter weights are ~2 MB each on the tiny
model; 50 leaked versions would be ~100 MB, and SGLang's LoRA pool is preallocated, so real leaks show).
With tensor parallelism every inference GPU holds a shard of each adapter: each one is checked."""
import pytest

from reference_impl import conformance as C
from reference_impl.client import SamplingParams
from reference_impl.metrics import gpu_memory_used_mib
from reference_impl.results import ResultRow
from reference_impl.sync import HotReload

pytestmark = pytest.mark.gpu
SYNCS, MAX_GROWTH_MIB = 50, 64.0


def test_fifty_syncs_stay_bounded(lora_server, adapter_factory, gpu_plan, results_writer):
    client = lora_server.client
    gpus = [g.index for g in gpu_plan["plan"].inference]
    adapters = [adapter_factory(rank=16, seed=s) for s in (61, 62)]
    strategy = HotReload(client)
    samples, sync_ms = {g: [] for g in gpus}, []
    try:
        for v in range(SYNCS):
            rec = strategy.publish(v, str(adapters[v % 2]))
            sync_ms.append(rec.sync_ms)
            client.generate([[11, 12, 13, 14]], SamplingParams(max_new_tokens=2), lora=strategy.current)
            if v >= 2:  # after the first loads have sized the pool
                used = gpu_memory_used_mib(gpus)
                for g in gpus:
                    samples[g].append(used[g])
            adapters_now = [m for m in client.models() if m.startswith("policy-")]
            C.assert_adapter_count(adapters_now, 1)
        growth = max(C.assert_memory_flat(samples[g], MAX_GROWTH_MIB) for g in gpus)
    finally:
        client.unload_lora_adapter(strategy.current)
    results_writer.append([ResultRow("conformance", "adapter_lifecycle", "memory_growth_mib", growth,
                                     params={"syncs": SYNCS}),
                           ResultRow("conformance", "adapter_lifecycle", "sync_ms", sorted(sync_ms)[SYNCS // 2],
                                     params={"syncs": SYNCS, "stat": "median"})])
