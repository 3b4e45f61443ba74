"""GPU memory sampling and process lists through NVML, plus the decode roofline / MBU.

No torch here: the sampler runs in the parent process, which must not create a CUDA context.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from reference_impl.devices import MIB, NoGpuError, close_nvml, nvml_session, open_nvml


# ---------------------------------------------------------------- NVML reads

def gpu_memory_used_mib(indices, nvml=None) -> dict[int, float]:
    """One-shot used memory (MiB) per physical index; NoGpuError when NVML can't answer."""
    with nvml_session(nvml) as lib:
        try:
            return {i: lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByIndex(i)).used / MIB
                    for i in indices}
        except lib.NVMLError as err:
            raise NoGpuError(f"NVML could not read memory of GPUs {list(indices)}: {err}") from err


def _running_pids(lib, handle, kind: str) -> list[int]:
    return [int(p.pid) for p in _running_procs(lib, handle, kind)]


def _running_procs(lib, handle, kind: str) -> list:
    """Process records from nvmlDeviceGet{kind}RunningProcesses. The plain name binds the newest (v3)
    struct; an older driver lacks that symbol, so fall back to the _v2 layout."""
    version_errors = tuple(getattr(lib, n) for n in (
        "NVMLError_FunctionNotFound", "NVMLLibraryMismatchError",
        "NVMLError_ArgumentVersionMismatch") if hasattr(lib, n))
    names = [f"nvmlDeviceGet{kind}RunningProcesses{v}" for v in ("", "_v3", "_v2")]
    last_err = None
    for fn in [getattr(lib, n) for n in names if hasattr(lib, n)]:
        try:
            return list(fn(handle))
        except version_errors as err:
            last_err = err
    raise NoGpuError(f"no {kind} process query matches this NVML library: {last_err}")


def gpu_processes(indices=None, nvml=None) -> dict[int, list[int]]:
    """Physical index → sorted PIDs (compute and graphics) on it. indices=None: every GPU.
    Raises NoGpuError with the reason when NVML is unavailable, so callers can skip clearly."""
    with nvml_session(nvml) as lib:
        if indices is None:
            indices = range(lib.nvmlDeviceGetCount())
        out = {}
        for i in indices:
            handle = lib.nvmlDeviceGetHandleByIndex(i)
            pids = _running_pids(lib, handle, "Compute") + _running_pids(lib, handle, "Graphics")
            out[i] = sorted(set(pids))
        return out


def process_memory_mib(index: int, pids, nvml=None) -> float:
    """GPU memory NVML attributes to `pids` on physical GPU `index` (per process, so other tenants of the
    GPU don't move the number). usedGpuMemory is None where the driver hides it: counted as 0."""
    wanted = set(pids)
    with nvml_session(nvml) as lib:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        procs = _running_procs(lib, handle, "Compute")
        return sum((p.usedGpuMemory or 0) for p in procs if int(p.pid) in wanted) / 2**20


class NvmlSampler:
    """Polls used memory of physical GPU `indices` every `interval_s` in a daemon thread.

    Never raises from the thread: an NVML failure (at start or while polling) is stored in
    `error` and sampling stops, so a benchmark on a machine without NVML still completes.
    """

    def __init__(self, indices, interval_s: float = 0.1, nvml=None, join_timeout_s: float = 2.0):
        self.indices = list(indices)
        self.interval_s = interval_s
        self.join_timeout_s = join_timeout_s
        self.error: str | None = None
        self.samples = 0
        self._nvml = nvml
        self._lib = None
        self._peak: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "NvmlSampler":
        # NVML is initialised here, synchronously, so `error` is already set when start() returns.
        try:
            self._lib = open_nvml(self._nvml)
            handles = [self._lib.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        except Exception as err:
            self.error = str(err)
            self._close_nvml()
            return self
        self._thread = threading.Thread(target=self._run, args=(handles,),
                                        name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self, handles) -> None:
        while True:
            try:
                values = {i: self._read(h) for i, h in zip(self.indices, handles)}
            except Exception as err:
                self.error = f"NVML sampling failed: {err}"
                return
            with self._lock:
                self._store(values)
                self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def _read(self, handle) -> float:
        return self._lib.nvmlDeviceGetMemoryInfo(handle).used / MIB

    def _store(self, used: dict[int, float]) -> None:
        self._last = used
        for i, mib in used.items():
            self._peak[i] = max(mib, self._peak.get(i, 0.0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.join_timeout_s)
            if self._thread.is_alive():
                # Stuck inside an NVML call: shutting NVML down under it could crash the process.
                self.error = f"sampler thread did not stop within {self.join_timeout_s}s"
                return
        self._close_nvml()

    def _close_nvml(self) -> None:
        if self._lib is not None:
            close_nvml(self._lib)
            self._lib = None

    def peak_mib(self) -> dict[int, float]:
        with self._lock:
            return dict(self._peak)

    def last_mib(self) -> dict[int, float]:
        with self._lock:
            return dict(self._last)

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class UtilizationSampler(NvmlSampler):
    """Polls nvmlDeviceGetUtilizationRates(h).gpu (% of the last sample period in which a kernel ran) per GPU.

    busy_fraction(): mean utilisation / 100 per GPU, the share of time the GPU was executing something over
    the run; active_fraction(): the share of samples with utilisation > 0 (idle gaps, e.g. an inference GPU
    waiting for the trainer). NVML's own period is 1/6 s to 1 s depending on the product, so short gaps blur:
    compare variants sampled the same way, not absolute numbers."""

    def __init__(self, indices, interval_s: float = 0.1, nvml=None, join_timeout_s: float = 2.0):
        super().__init__(indices, interval_s, nvml, join_timeout_s)
        self._util: dict[int, list[float]] = {i: [] for i in self.indices}

    def _read(self, handle) -> float:
        return float(self._lib.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _store(self, util: dict[int, float]) -> None:
        self._last = util
        for i, pct in util.items():
            self._util[i].append(pct)

    def busy_fraction(self) -> dict[int, float]:
        with self._lock:
            return {i: sum(v) / len(v) / 100.0 for i, v in self._util.items() if v}

    def active_fraction(self) -> dict[int, float]:
        with self._lock:
            return {i: sum(x > 0 for x in v) / len(v) for i, v in self._util.items() if v}


# ---------------------------------------------------------------- roofline / MBU

# Peak HBM bandwidth (bytes/s). Keys are token sets that must all appear in the GPU name;
# more specific keys are tried first so "H100 PCIe" does not get the SXM number.
PEAK_BANDWIDTH_BYTES_S = {
    "H100-PCIe": 2.0e12,
    "H100-NVL": 3.9e12,
    "A100-80GB": 2.0e12,
    "A100-40GB": 1.555e12,
    "H100": 3.35e12,  # SXM
    "H200": 4.8e12,
    "L4": 0.3e12,
}


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[^A-Z0-9]+", text.upper()) if t}


def peak_bandwidth_bytes_s(gpu_name: str) -> float | None:
    """Peak bandwidth for an NVML name or label ("NVIDIA H100 80GB HBM3", "A100-40GB");
    None when unknown. Whole tokens are matched, so "GH200" or "L40S" don't match H200/L4."""
    name = _tokens(gpu_name)
    for key in sorted(PEAK_BANDWIDTH_BYTES_S, key=lambda k: -len(_tokens(k))):
        if _tokens(key) <= name:
            return PEAK_BANDWIDTH_BYTES_S[key]
    return None


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2  # bf16 weights and KV cache

    @classmethod
    def from_config(cls, config, bytes_per_param: int = 2) -> "ModelShape":
        """Parameter count of a Qwen3-style decoder from its HF config dict (or config object)."""
        c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        hidden, heads = c["hidden_size"], c["num_attention_heads"]
        kv, layers, vocab = c["num_key_value_heads"], c["num_hidden_layers"], c["vocab_size"]
        hd = c.get("head_dim") or hidden // heads
        attn = 2 * hidden * heads * hd + 2 * hidden * kv * hd  # q and o, k and v
        if c.get("attention_bias"):
            attn += heads * hd + 2 * kv * hd + hidden
        # + q_norm/k_norm (head_dim each), the SwiGLU MLP (3 matrices), 2 RMSNorms
        per_layer = attn + 2 * hd + 3 * hidden * c["intermediate_size"] + 2 * hidden
        # Qwen3Config defaults to untied embeddings, so a missing key counts the lm_head.
        embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
        n = layers * per_layer + embeddings + hidden  # + final norm
        return cls(n, layers, kv, hd, bytes_per_param)

    @property
    def weight_bytes(self) -> int:
        """W: bytes read per decode step (every weight once)."""
        return self.n_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """k = 2 (K and V) * layers * kv_heads * head_dim * bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param


def decode_step_bytes(shape: ModelShape, batch: int, prompt_len: int, gen_len: int) -> float:
    """Bytes one decode step must read: W + B * Lbar * k, with Lbar = prompt_len + gen_len/2
    (the mean context length over the generation)."""
    if batch < 1:
        raise ValueError(f"batch {batch} must be >= 1")
    mean_context = prompt_len + gen_len / 2
    return shape.weight_bytes + batch * mean_context * shape.kv_bytes_per_token


def decode_roofline_tok_s(shape: ModelShape, batch: int, prompt_len: int, gen_len: int,
                          bw: float) -> float:
    """Output tok/s ceiling. t_step >= (W + B*Lbar*k) / BW and each step emits B tokens, so
    tok/s <= B * BW / (W + B*Lbar*k)."""
    return batch * bw / decode_step_bytes(shape, batch, prompt_len, gen_len)


def mbu(shape: ModelShape, batch: int, prompt_len: int, gen_len: int, output_tok_s: float,
        bw: float) -> float:
    """Model bandwidth utilisation = achieved bytes/s / BW, where achieved bytes/s =
    (W + B*Lbar*k) * steps/s and steps/s = output_tok_s / B. 1.0 means at the roofline."""
    steps_per_s = output_tok_s / batch
    return decode_step_bytes(shape, batch, prompt_len, gen_len) * steps_per_s / bw
