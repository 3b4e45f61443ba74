"""Sync under traffic (conformance 5): hot reloads while rollouts are in flight lose no request, cut none short,
every response is attributable to the version it named, and /health stays 200 (OpenPipe/ART #678, trl #7017)."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reference_impl.client import SamplingParams
from reference_impl.sync import HotReload

pytestmark = pytest.mark.gpu
GEN = 64


def test_syncs_during_rollouts_lose_nothing(lora_server, adapter_factory):
    client = lora_server.client
    adapters = [adapter_factory(rank=16, seed=40 + i) for i in range(4)]
    strategy = HotReload(client)
    strategy.publish(0, str(adapters[0]))
    stop, health_failures, results = threading.Event(), [], []

    def watch_health():
        while not stop.is_set():
            if not client.health(timeout_s=5):
                health_failures.append(time.time())
            time.sleep(0.05)

    def one(i):
        name = strategy.current  # the request names the version current when it is sent
        prompt = [(i * 7919 + k) % 150000 + 10 for k in range(64)]
        r = client.generate([prompt], SamplingParams(max_new_tokens=GEN, ignore_eos=True), lora=name)[0]
        return name, r

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(48)]
            for v, path in enumerate(adapters[1:], start=1):
                time.sleep(0.2)
                strategy.publish(v, str(path))
            results = [f.result(timeout=300) for f in futures]
    finally:
        stop.set()
        watcher.join(timeout=10)
        client.unload_lora_adapter(strategy.current)
    names = {n for n, _ in results}
    assert len(results) == 48 and len(names) >= 2, f"syncs did not overlap the traffic: versions {names}"
    cut = [(n, r.completion_tokens, r.finish_reason) for n, r in results if r.completion_tokens != GEN]
    assert not cut, f"requests cut short during sync: {cut}"
    assert not health_failures, f"/health failed {len(health_failures)} times during syncs"
