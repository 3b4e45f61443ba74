"""The merged strategy: the LoRA is merged into a copy of the base weights and the server loads them whole.

    merge (WeightMerger, tmpfs)  ->  POST /pause_generation {"mode":"retract"}
    ->  POST /update_weights_from_disk {model_path, load_format:"auto", weight_version:"policy-vN",
                                       flush_cache: false}
    ->  POST /continue_generation (always, in a finally)  ->  POST /flush_cache (best effort)
    ->  GET /model_info: weight_version must be policy-vN

Why pause first: SGLang 0.5.14 asserts that the post-update cache flush succeeds, and the flush fails while
requests are running, so an update under load crashes the scheduler (upstream #14062, #12099). "retract"
puts running requests back in the waiting queue with their own KV freed; after continue they run on the new
weights, so none is lost.
Why no flush inside the update: in 0.5.14 the flush also needs an empty WAITING queue, which is exactly where
retract put those requests, so retract + `flush_cache: true` still kills the scheduler (upstream sglang PR
#31962, read in the 0.5.14 source: is_fully_idle requires len(waiting_queue) == 0). Stale prefixes are kept
out two other ways: every rollout names its version as the radix-cache `extra_key` (request_extra_key), so a
prefix cached by older weights never matches; and the cache is flushed right after continue when the server
is idle (the loop syncs between batches, so it is; `flushed` in the record says whether it was).

Rollouts are served by the base model name (`request_lora = None`): LoRA serving costs throughput (see
shared notes, performance). The version is then proven per response instead: `check_result` raises when
meta_info.weight_version is not the version pushed, since a server that silently kept (or fell back to) the
old weights is exactly the bug this strategy must not hide.
"""
from __future__ import annotations

import time

from .client import ServerHTTPError, ServerUnreachable
from .merge import MergeError, WeightMerger
from .sync import SyncError, SyncRecord, version_name


class MergedSync:
    name = "merged"
    request_lora = None  # rollouts name the base model: the merged weights ARE the base now

    def __init__(self, server, base_model_path: str | None = None, merger: WeightMerger | None = None,
                 load_format: str | None = "auto", pause_mode: str = "retract", timeout_s: float = 600.0):
        """server: SGLangClient or HFEngine (update_weights_from_disk, pause/continue_generation, model_info).
        load_format "auto": a --load-format dummy server must be told to read real weights (shared notes)."""
        if merger is None and base_model_path is None:
            raise ValueError("MergedSync needs the base model dir (or a WeightMerger built on it)")
        self.server = server
        self.merger = merger or WeightMerger(base_model_path)
        self.load_format = load_format
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s
        self.current: str | None = None  # "policy-vN" once published: the loop refuses to roll out before
        self.current_version: int | None = None
        self.current_path: str | None = None

    def pause_for_training(self) -> dict:
        return {}  # split mode: the server keeps serving while the trainer trains

    def publish(self, version: int, adapter_path: str) -> SyncRecord:
        t0 = time.perf_counter()
        new = version_name(version)
        try:
            merged = self.merger.merge(adapter_path, new)
        except (MergeError, OSError) as e:
            raise SyncError(f"merge of {adapter_path} failed: {e}; still serving {self.current}") from e
        t1 = time.perf_counter()
        self._call(self.server.pause_generation, mode=self.pause_mode)
        t2 = time.perf_counter()
        answer: dict = {}
        try:
            answer = self._call(self.server.update_weights_from_disk, str(merged.path), load_format=self.load_format,
                                weight_version=new, flush_cache=False)
        finally:
            t3 = time.perf_counter()
            # always resume, even after a failed update: SGLang rolled back, and paused requests must not hang
            self._call(self.server.continue_generation)
        t4 = time.perf_counter()
        flushed = self._flush_if_idle()
        try:
            served = self.server.model_info().get("weight_version")
        except (ServerHTTPError, ServerUnreachable) as e:
            raise SyncError(f"/model_info after the update to {new}: {e}; which version is served is unknown") from e
        if served != new:
            raise SyncError(f"update to {new} answered success but /model_info reports weight_version={served!r}: "
                            f"the server still serves {served!r}, not {new}")
        self.current, self.current_version, self.current_path = new, version, str(merged.path)
        extra = {"merge_ms": merged.merge_ms, "write_ms": merged.write_ms, "load_base_ms": merged.load_base_ms,
                 "pause_ms": (t2 - t1) * 1e3, "update_ms": (t3 - t2) * 1e3, "continue_ms": (t4 - t3) * 1e3,
                 "merged_bytes": merged.bytes_written, "flushed": float(flushed),
                 "num_paused_requests": (answer or {}).get("num_paused_requests")}
        return SyncRecord(version, new, (time.perf_counter() - t0) * 1e3, extra)

    @property
    def request_extra_key(self) -> str | None:
        """The radix-cache namespace of every rollout: its version, so older weights' prefixes never match."""
        return self.current

    def _flush_if_idle(self) -> bool:
        """Drop every cached prefix now if the server is idle (it answers 400 while requests run: not an error,
        the extra_key namespaces still keep old prefixes out of rollouts)."""
        flush = getattr(self.server, "flush_cache", None)
        if flush is None:
            return True  # an engine without a prefix cache (HFEngine)
        try:
            flush()
            return True
        except ServerHTTPError:
            return False

    def check_result(self, result) -> None:
        """Every rollout response must name the version pushed last (meta_info.weight_version)."""
        if result.weight_version != self.current:
            raise SyncError(f"a rollout was served by weight_version={result.weight_version!r}, the version pushed "
                            f"is {self.current!r}: stale or base weights were served")

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, timeout_s=self.timeout_s, **kw)
        except (ServerHTTPError, ServerUnreachable) as e:
            served = self._served_version()
            raise SyncError(f"{getattr(fn, '__name__', fn)}: {e}; the server still serves weight_version "
                            f"{served!r} (last pushed: {self.current})") from e

    def _served_version(self) -> str | None:
        try:
            return self.server.model_info().get("weight_version")
        except Exception:  # noqa: BLE001 - only for the error message; the server may be gone
            return "unknown (server unreachable)"

    def close(self) -> None:
        self.merger.close()
