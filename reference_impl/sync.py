"""Weight-sync strategies behind one interface: how a new LoRA version reaches the rollout server.

    hot reload      (split mode)  load policy-<run>-v{n+1}, switch rollouts to it, unload policy-<run>-v{n}
    restart         (one GPU)     stop the server while training, start it with the newest adapter registered
    release/resume  (one GPU)     SGLang releases its GPU memory while training, resumes, then hot-loads
    none            (control)     never publish: rollouts stay on v0 (reward must stay flat)

Every strategy exposes `current`: the adapter name every rollout request must carry. It is None while no
adapter is servable (a restarting server), and the loop refuses to roll out then: the base model is never
served by accident. Versioned names avoid SGLang's same-name unload/load race and its "resurrection" of
unloaded names (see shared notes). The hot-loading strategies also put a per-run tag in the name: a persistent
server outlives a run, and a second run's policy-v1 under the first run's name would meet vLLM 0.26.0's prefix
cache keyed by the adapter's name (run m: 496 of 512 prompt tokens of stale KV reused) and SGLang's resurrection.
A restart starts an empty server, so its names need no tag.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

from .client import ServerHTTPError, ServerUnreachable


class SyncError(RuntimeError):
    """A sync that did not take effect; the previous version is still the one served."""


def version_name(version: int, run_tag: str = "") -> str:
    """policy-v3, or policy-<run_tag>-v3: the name an adapter version is served under."""
    return f"policy-{run_tag}-v{version}" if run_tag else f"policy-v{version}"


def new_run_tag() -> str:
    """Six hex digits, fresh per strategy: no two runs against one server share an adapter name."""
    return secrets.token_hex(3)


@dataclass
class SyncRecord:
    version: int
    adapter: str
    sync_ms: float
    extra: dict = field(default_factory=dict)  # strategy-specific timings (restart_s, released_mib, ...)


class AdapterServer(Protocol):
    """What a strategy needs from the server: SGLangClient and HFEngine both provide it."""
    def load_lora_adapter(self, name: str, path: str, pinned: bool = False, timeout_s: float | None = None) -> dict: ...
    def unload_lora_adapter(self, name: str, timeout_s: float | None = None) -> dict: ...
    def models(self) -> list[str]: ...


class HotReload:
    name = "hot-reload"

    def __init__(self, server: AdapterServer, timeout_s: float = 60.0, keep_previous: bool = False,
                 run_tag: str | None = None):
        self.server = server
        self.timeout_s = timeout_s
        self.keep_previous = keep_previous  # True only for tests that compare versions side by side
        self.run_tag = new_run_tag() if run_tag is None else run_tag
        self.current: str | None = None
        self.current_version: int | None = None

    def adapter_name(self, version: int) -> str:
        return version_name(version, self.run_tag)

    def pause_for_training(self) -> dict:
        return {}

    def publish(self, version: int, adapter_path: str) -> SyncRecord:
        t0 = time.perf_counter()
        new = self.adapter_name(version)
        loaded = self._call(self.server.load_lora_adapter, new, str(adapter_path))
        if new not in loaded:
            raise SyncError(f"load of {new} answered success but loaded_adapters={sorted(loaded)}")
        old, self.current, self.current_version = self.current, new, version  # switch rollouts first
        if old and old != new and not self.keep_previous:
            loaded = self._call(self.server.unload_lora_adapter, old)
            if old in loaded:
                raise SyncError(f"unload of {old} answered success but it is still loaded: {sorted(loaded)}")
        return SyncRecord(version, new, (time.perf_counter() - t0) * 1e3, {"loaded_adapters": len(loaded)})

    def _call(self, fn, *args):
        try:
            return fn(*args, timeout_s=self.timeout_s)
        except (ServerHTTPError, ServerUnreachable) as e:
            raise SyncError(f"{fn.__name__}{args}: {e}; still serving {self.current}") from e

    def close(self) -> None:
        pass


class NoSync(HotReload):
    """The control run: v0 is published once, later versions are trained but never reach the server."""
    name = "none"

    def publish(self, version: int, adapter_path: str) -> SyncRecord:
        if self.current is None:
            return super().publish(version, adapter_path)
        return SyncRecord(version, self.current, 0.0, {"skipped": 1})


class Restart:
    """One GPU: the server is stopped while the trainer uses the GPU, then started again with the newest
    adapter registered at startup (SGLang --lora-paths, vLLM --lora-modules), so no rollout can run before it is
    servable."""
    name = "restart"

    def __init__(self, server, verify_timeout_s: float = 30.0):
        self.server = server  # an SGLangServer or VLLMServer (stop(), restart(**changes), client, config)
        self.current: str | None = None
        self.current_version: int | None = None
        self.verify_timeout_s = verify_timeout_s

    def pause_for_training(self) -> dict:
        t0 = time.perf_counter()
        self.server.stop()
        self.current = None  # nothing servable until the restart registers the new adapter
        return {"stop_s": time.perf_counter() - t0}

    def publish(self, version: int, adapter_path: str) -> SyncRecord:
        new = version_name(version)
        restart_s = self.server.restart(**self.server.config.startup_adapter_changes(new, str(adapter_path)))
        served = self.server.client.models()
        if new not in served:
            raise SyncError(f"server restarted but {new} is not registered: /v1/models lists {served}")
        self.current, self.current_version = new, version
        return SyncRecord(version, new, restart_s * 1e3, {"restart_s": restart_s, "start_s": self.server.start_s})

    def close(self) -> None:
        pass


class ReleaseResume(HotReload):
    """One GPU, for comparison: the server releases KV cache and weights while training (SGLang's memory saver
    with a CPU backup, vLLM's sleep mode), resumes, then hot-loads."""
    name = "release-resume"

    def __init__(self, client, gpu_index: int | None = None, timeout_s: float = 120.0, server_pids=None,
                 run_tag: str | None = None):
        super().__init__(client, timeout_s, run_tag=run_tag)
        self.client = client
        self.gpu_index = gpu_index
        self.server_pids = server_pids  # callable -> pids: measure the server's own memory, not the GPU's
        self._before_mib: float | None = None
        self._paused: dict = {}

    def pause_for_training(self) -> dict:
        self._before_mib = self._used_mib()
        t0 = time.perf_counter()
        self.client.release_memory_occupation(timeout_s=self.timeout_s)
        release_s = time.perf_counter() - t0
        after = self._settled_mib()
        freed = (self._before_mib - after) if (self._before_mib is not None and after is not None) else None
        # measure_s: the NVML settle wait is this benchmark's own measurement, not a cost of the strategy; the
        # loop leaves it out of the step's times
        self._paused = {"release_s": release_s, "released_mib": freed,
                        "measure_s": time.perf_counter() - t0 - release_s}
        return dict(self._paused)

    def publish(self, version: int, adapter_path: str) -> SyncRecord:
        resume_s = 0.0
        if self._paused:
            t0 = time.perf_counter()
            self.client.resume_memory_occupation(timeout_s=self.timeout_s)
            resume_s = time.perf_counter() - t0
        record = super().publish(version, adapter_path)
        record.extra.update(self._paused, resume_s=resume_s)
        record.sync_ms += resume_s * 1e3
        self._paused = {}
        return record

    def _settled_mib(self, settle_s: float = 5.0) -> float | None:
        """The lowest reading within settle_s: the scheduler may free memory after the HTTP call returns."""
        readings = []
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            readings.append(self._used_mib())
            if None in readings:
                return None
            time.sleep(0.2)
        return min(readings)

    def _used_mib(self) -> float | None:
        if self.gpu_index is None:
            return None
        from .metrics import gpu_memory_used_mib, process_memory_mib
        if self.server_pids is not None:
            return process_memory_mib(self.gpu_index, self.server_pids())
        return gpu_memory_used_mib([self.gpu_index]).get(self.gpu_index)

    def device_used_mib(self) -> float | None:
        from .metrics import gpu_memory_used_mib
        return None if self.gpu_index is None else gpu_memory_used_mib([self.gpu_index]).get(self.gpu_index)


STRATEGIES = ("auto", "hot-reload", "restart", "release-resume", "none", "merged")  # merged: sync_merged.py
