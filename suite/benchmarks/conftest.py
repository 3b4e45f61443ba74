"""Fixtures shared by the GPU benchmarks: one benchmark server at a time, NVML peak-memory rows, the plan.

Configuration is by environment variable (SPLITRL_BENCH_*; see each module) because only the root conftest
may add command-line options. No fixture here starts anything on a machine without GPUs: the `gpu` marker
skips the tests first (fixtures/plugin.py).
"""
from __future__ import annotations

import gc
import importlib.util
import sys
from contextlib import contextmanager

import pytest

from fixtures.gpu import server_overrides  # noqa: F401 - the benchmark modules import it from here
from reference_impl.bench import busy_rows, vram_rows
from reference_impl.metrics import NvmlSampler, UtilizationSampler


class ServerSlot:
    """Holds at most one server of this module from the session ServerPool: asking for a different config
    stops the previous one first (one GPU has memory for one benchmark server), and the module's end stops
    the last. `started` is True when the last get() launched the server (its start time is fresh)."""

    def __init__(self, pool):
        self.pool = pool
        self.key: dict | None = None
        self.started = False

    def get(self, **overrides):
        if self.key is not None and self.key != overrides:
            self.release()
        before = self.pool.servers.get(self.pool.key(overrides))
        srv = self.pool.get(**overrides)
        self.started = srv is not before  # the pool (re)launched it
        self.key = overrides
        return srv

    def release(self) -> None:
        if self.key is not None:
            self.pool.release(**self.key)
            self.key = None


@pytest.fixture(scope="module")
def server_slot(server_pool):
    slot = ServerSlot(server_pool)
    yield slot
    slot.release()


@pytest.fixture(scope="session")
def bench_plan(gpu_plan):
    plan = gpu_plan["plan"]
    if plan is None or plan.mode == "none":
        pytest.skip(f"no GPU plan: {gpu_plan['error'] or gpu_plan['reason']}")
    return plan


@contextmanager
def watch_vram(indices, writer, base: dict, params: dict, info: dict, interval_s: float = 0.05):
    """NVML-sample the physical GPUs `indices` for the block; on success append one peak_vram_mib row per
    GPU and copy the peaks into `info` (benchmark.extra_info). NVML trouble is recorded, never raised."""
    sampler = NvmlSampler(sorted(set(indices)), interval_s=interval_s).start()
    try:
        yield sampler
    finally:
        sampler.stop()
    if sampler.error:
        info["nvml_error"] = sampler.error
    peaks = sampler.peak_mib()
    info.update({f"peak_vram_mib[gpu{i}]": v for i, v in peaks.items()})
    if peaks:
        writer.append(vram_rows(base, peaks, params))


@contextmanager
def watch_busy(indices, writer, base: dict, params: dict, info: dict, interval_s: float = 0.05):
    """NVML utilisation of the physical GPUs `indices` over the block: gpu_busy_ratio / gpu_active_ratio rows per
    GPU (bench.busy_rows) and the fractions in `info`. NVML trouble is recorded, never raised."""
    sampler = UtilizationSampler(sorted(set(indices)), interval_s=interval_s).start()
    try:
        yield sampler
    finally:
        sampler.stop()
    if sampler.error:
        info["nvml_util_error"] = sampler.error
    busy, active = sampler.busy_fraction(), sampler.active_fraction()
    info.update({f"gpu_busy_ratio[gpu{i}]": v for i, v in busy.items()})
    if busy:
        writer.append(busy_rows(base, busy, active, params))


def trainer_backend() -> str:
    return "unsloth" if importlib.util.find_spec("unsloth") is not None else "peft"


def free_cuda_cache() -> None:
    """Give back what this (trainer) process cached on the GPU, so a server on the same GPU can have it."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def model_with_weights(shape: str):
    """A real-(random-)weights dir; shapes other than tiny are built on the GPU (CPU init of 4B is slow)."""
    from reference_impl.models import resolve_model

    model = resolve_model(shape, device="cpu" if shape == "tiny" else "cuda")
    free_cuda_cache()
    return model


@pytest.fixture(autouse=True)
def _backends_of_the_benchmark(request):
    """A benchmark body runs against the backends its `backends` marker names (SGLang when it has none: its
    config is SGLang's); under --backend vllm|both the others skip, saying so."""
    if request.config.getoption("--backend") == "sglang" or "backend" not in request.fixturenames:
        return
    backend = request.getfixturevalue("backend")
    marker = request.node.get_closest_marker("backends")
    supported = marker.args if marker else ("sglang",)
    if backend not in supported:
        pytest.skip(f"this benchmark runs on {', '.join(supported)} only, not {backend}")
