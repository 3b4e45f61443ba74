"""Hardware/software fingerprint stamped on every results row.

Every number in results/*.csv must say what produced it, otherwise numbers from
different machines or library versions get compared as if they were alike.
All values are strings ("" when unknown) so they round-trip through CSV unchanged.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

FINGERPRINT_KEYS: list[str] = [
    "gpu_name",
    "gpu_count",
    "gpu_memory_mib",
    "driver_version",
    "cuda_version",
    "python_version",
    "torch_version",
    "transformers_version",
    "peft_version",
    "trl_version",
    "unsloth_version",
    "sglang_version",
    "vllm_version",
    "splitrl_version",
    "git_sha",
    "hostname",
    "device_kind",
]

# Packages read from this interpreter's metadata: key -> distribution name.
_LOCAL_PACKAGES = {
    "torch_version": "torch",
    "transformers_version": "transformers",
    "peft_version": "peft",
    "trl_version": "trl",
    "unsloth_version": "unsloth",
    "splitrl_version": "splitrl",
}

PROJECT_DIR = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 30
GIT_TIMEOUT_S = 10


def collect_fingerprint(
    sglang_python: str | None = None, gpus=None, extra: dict | None = None
) -> dict[str, str]:
    """Return the fingerprint dict (a fresh copy; the cached original stays pristine).

    gpus: optional list of objects with `.name` and `.total_mib` (devices.GpuInfo);
    they replace NVML's view, e.g. when only the GPUs a test was given should count.
    extra: entries added/overriding at the end (keys outside FINGERPRINT_KEYS are
    kept here for `splitrl doctor` but are not CSV columns).
    """
    gpu_key = None if gpus is None else tuple((str(g.name), int(g.total_mib)) for g in gpus)
    extra_key = tuple(sorted((str(k), str(v)) for k, v in (extra or {}).items()))
    return dict(_collect_cached(sglang_python, gpu_key, extra_key))


@functools.lru_cache(maxsize=32)
def _collect_cached(sglang_python, gpu_key, extra_key) -> dict[str, str]:
    fp = {key: "" for key in FINGERPRINT_KEYS}
    fp.update(_nvml_info())
    if gpu_key is not None:
        fp.update(_gpu_fields(gpu_key))
    fp["python_version"] = platform.python_version()
    for key, dist in _LOCAL_PACKAGES.items():
        fp[key] = _local_version(dist)
    fp["sglang_version"] = _version_via(sglang_python, "sglang")
    fp["vllm_version"] = _version_via(os.environ.get("SPLITRL_VLLM_PYTHON"), "vllm")
    fp["git_sha"] = _git_sha(PROJECT_DIR)
    fp["hostname"] = socket.gethostname()
    fp["device_kind"] = os.environ.get("SPLITRL_DEVICE_KIND", "")
    fp.update(dict(extra_key))
    return fp


def _gpu_fields(gpu_key: tuple[tuple[str, int], ...]) -> dict[str, str]:
    # Identical GPUs collapse to one value; a mixed box shows each distinct value, joined by "+".
    def distinct(values):
        return "+".join(dict.fromkeys(str(v) for v in values))

    return {
        "gpu_name": distinct(name for name, _ in gpu_key),
        "gpu_count": str(len(gpu_key)),
        "gpu_memory_mib": distinct(mib for _, mib in gpu_key),
    }


def _nvml_info() -> dict[str, str]:
    """GPU facts from NVML; gpu_count "0" when NVML (or a driver) is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {"gpu_count": "0"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = tuple(
            (_text(pynvml.nvmlDeviceGetName(h)), pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20)
            for h in handles
        )
        info = _gpu_fields(gpus)
        info["driver_version"] = _text(pynvml.nvmlSystemGetDriverVersion())
        info["cuda_version"] = _cuda_version_text(pynvml.nvmlSystemGetCudaDriverVersion())
        return info
    except Exception:
        return {"gpu_count": "0"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _cuda_version_text(version: int) -> str:
    # NVML encodes 13.0 as 13000 and 12.4 as 12040.
    return f"{version // 1000}.{(version % 1000) // 10}"


def _text(value) -> str:
    # Older pynvml returns bytes, newer returns str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _local_version(dist: str) -> str:
    # Metadata only: importing torch/unsloth just for a version costs seconds (and a GPU for unsloth).
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _version_via(python: str | None, dist: str) -> str:
    """Version of `dist` as seen by another venv's interpreter, else by this one."""
    if not python or not Path(python).exists():
        return _local_version(dist)
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _git_sha(project_dir: Path) -> str:
    # A copy shipped to a GPU node may carry no .git, or a stale one (seen: the device copy reported the
    # session's first commit, dirty): the sender, who knows the commit, says it with SPLITRL_GIT_SHA
    sent = os.environ.get("SPLITRL_GIT_SHA", "").strip()
    if sent:
        return sent
    sha = _git(project_dir, "rev-parse", "--short", "HEAD")
    if sha is None:
        return ""
    status = _git(project_dir, "status", "--porcelain")
    return f"{sha}-dirty" if status else sha


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def format_fingerprint(fp: dict[str, str]) -> str:
    """Aligned `key: value` lines (known keys first, in schema order) for `splitrl doctor`."""
    keys = [k for k in FINGERPRINT_KEYS if k in fp] + sorted(k for k in fp if k not in FINGERPRINT_KEYS)
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k.ljust(width)}: {fp[k] or '-'}" for k in keys)
