"""Roofline arithmetic on Qwen3-1.7B and the NVML readers' behaviour without a GPU."""
import time

import pytest

from reference_impl.devices import NoGpuError
from reference_impl.metrics import (
    ModelShape, NvmlSampler, decode_roofline_tok_s, decode_step_bytes, gpu_memory_used_mib,
    gpu_processes, mbu, peak_bandwidth_bytes_s,
)

QWEN3_1_7B = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "tie_word_embeddings": True, "attention_bias": False,
}


def nvml_works() -> bool:
    try:
        gpu_memory_used_mib([])
        return True
    except NoGpuError:
        return False


no_nvml = pytest.mark.skipif(nvml_works(), reason="NVML works here: these cover the GPU-less path")


@pytest.fixture
def shape():
    return ModelShape.from_config(QWEN3_1_7B)


def test_qwen3_1_7b_param_count(shape):
    assert shape.n_params == pytest.approx(1.72e9, rel=0.02)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (28, 8, 128)
    assert shape.weight_bytes == 2 * shape.n_params


def test_untied_embeddings_add_lm_head(shape):
    untied = ModelShape.from_config({**QWEN3_1_7B, "tie_word_embeddings": False})
    assert untied.n_params - shape.n_params == 151936 * 2048


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = {k: v for k, v in QWEN3_1_7B.items() if k != "head_dim"}
    assert ModelShape.from_config(cfg).head_dim == 2048 // 16


def test_kv_bytes_per_token(shape):
    assert shape.kv_bytes_per_token == 114688  # 2 * 28 * 8 * 128 * 2


def test_worked_example_h200_ceiling(shape):
    # B=256, 256 prompt + 256 generated → Lbar = 384; ~84k output tok/s on 4.8 TB/s.
    tok_s = decode_roofline_tok_s(shape, 256, 256, 256, 4.8e12)
    assert tok_s == pytest.approx(84_000, rel=0.05)
    assert decode_step_bytes(shape, 256, 256, 256) == shape.weight_bytes + 256 * 384 * 114688


def test_batch_one_is_weight_bound(shape):
    tok_s = decode_roofline_tok_s(shape, 1, 0, 0, 3.35e12)
    assert tok_s == pytest.approx(3.35e12 / shape.weight_bytes)


def test_mbu_round_trip(shape):
    bw = 3.35e12
    ceiling = decode_roofline_tok_s(shape, 64, 512, 1024, bw)
    assert mbu(shape, 64, 512, 1024, ceiling, bw) == pytest.approx(1.0)
    assert mbu(shape, 64, 512, 1024, ceiling / 4, bw) == pytest.approx(0.25)


@pytest.mark.parametrize("name, bw", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("H100-80GB", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12),
    ("H200-141GB", 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12),
    ("A100-40GB", 1.555e12),
    ("NVIDIA L4", 0.3e12),
    ("NVIDIA L40S", None),          # not an L4
    ("NVIDIA GH200 480GB", None),   # not an H200
    ("NVIDIA A100", None),          # A100 memory size unknown → no guess
    ("NVIDIA GeForce RTX 4090", None),
])
def test_bandwidth_lookup(name, bw):
    assert peak_bandwidth_bytes_s(name) == bw


@no_nvml
def test_sampler_without_nvml_records_error_and_stops_promptly():
    start = time.monotonic()
    with NvmlSampler([0], interval_s=0.01) as sampler:
        time.sleep(0.05)
    assert time.monotonic() - start < 1.0
    assert sampler.error and "NVML unavailable" in sampler.error
    assert sampler.peak_mib() == {} and sampler.last_mib() == {} and sampler.samples == 0


def test_sampler_polls_and_keeps_peak():
    class FakeNvml:  # only the sampler's threading/peak logic is under test here
        NVMLError = RuntimeError
        used = iter([100, 300, 200] + [50] * 10_000)

        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetHandleByIndex(self, i): return i

        def nvmlDeviceGetMemoryInfo(self, handle):
            return type("Mem", (), {"used": next(self.used) * 1024 * 1024})

    with NvmlSampler([3], interval_s=0.001, nvml=FakeNvml()) as sampler:
        deadline = time.monotonic() + 2
        while sampler.samples < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert sampler.error is None and sampler.peak_mib() == {3: 300.0}
    assert sampler.last_mib() == {3: 50.0}


@no_nvml
def test_one_shot_reads_raise_no_gpu_here():
    with pytest.raises(NoGpuError, match="NVML unavailable"):
        gpu_processes()
    with pytest.raises(NoGpuError, match="NVML unavailable"):
        gpu_processes([0])
    with pytest.raises(NoGpuError, match="NVML unavailable"):
        gpu_memory_used_mib([0])


def test_utilization_sampler_reports_busy_and_active_fractions():
    from reference_impl.metrics import UtilizationSampler

    class FakeNvml:  # per-GPU utilisation series; the last value repeats (the sampler may poll more)
        NVMLError = RuntimeError
        series = {0: [100, 50, 0, 50], 1: [0, 0, 20, 0]}
        calls = {0: 0, 1: 0}

        def nvmlInit(self): pass
        def nvmlShutdown(self): pass
        def nvmlDeviceGetHandleByIndex(self, i): return i

        def nvmlDeviceGetUtilizationRates(self, handle):
            values = self.series[handle]
            n = self.calls[handle]
            self.calls[handle] += 1
            return type("Util", (), {"gpu": values[n] if n < len(values) else 0, "memory": 0})

    sampler = UtilizationSampler([0, 1], interval_s=0.001, nvml=FakeNvml()).start()
    deadline = time.monotonic() + 2
    while sampler.samples < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    sampler.stop()  # the sampler may have polled more than 4 times: the expectation counts what ran
    n = sampler.samples
    assert sampler.error is None and n >= 4
    assert sampler.busy_fraction() == {0: pytest.approx(sum([100, 50, 0, 50]) / n / 100),
                                       1: pytest.approx(20 / n / 100)}
    assert sampler.active_fraction() == {0: pytest.approx(3 / n), 1: pytest.approx(1 / n)}
    assert sampler.peak_mib() == {}  # memory is not what this sampler reads
