"""The vLLM OpenAI api_server as a context manager: the comparison backend, mirroring server.SGLangServer.

    with VLLMServer(VLLMServerConfig(python=..., model_path=..., gpu_ids="0")) as srv:
        srv.client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8), lora="policy-v0")

Same lifecycle guarantees as SGLangServer (and the same code, reference_impl.procs): binds 127.0.0.1 only,
CUDA_VISIBLE_DEVICES and offline flags set in the child's environment before it starts, own process group,
log file, bounded /health wait that fails fast with the log tail when the process exits, stop() = TERM then
KILL of its own group only. The interpreter is a separate vLLM venv (env SPLITRL_VLLM_PYTHON), never the
trainer's. Runtime LoRA loading needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (set here); /sleep, /wake_up,
/is_sleeping and /reset_prefix_cache are vLLM "dev" endpoints that need VLLM_SERVER_DEV_MODE=1 (set when
`dev_mode` or `sleep_mode` is on).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .managed_server import ManagedServer, ServerStartError
from .server import OFFLINE_ENV, inheritable_env
from .vllm_client import VLLMClient

VLLM_PYTHON_ENV = "SPLITRL_VLLM_PYTHON"


def default_vllm_python() -> str:
    return os.environ.get(VLLM_PYTHON_ENV, "")


@dataclass
class VLLMServerConfig:
    python: str = field(default_factory=default_vllm_python)  # the vLLM venv's interpreter
    model_path: str = ""
    gpu_ids: str = "0"                 # physical indices (PCI order) for the child's CUDA_VISIBLE_DEVICES
    served_model_name: str | None = None  # None: vLLM serves the base under model_path
    tokenizer_path: str | None = None
    tp_size: int = 1
    enable_lora: bool = True
    max_lora_rank: int = 64
    max_loras: int = 4                 # adapters per batch (GPU slots)
    max_cpu_loras: int | None = 8      # adapters cached in CPU memory (>= max_loras)
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path, registered at start
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 4096
    sleep_mode: bool = False           # --enable-sleep-mode: /sleep and /wake_up free and restore GPU memory
    dev_mode: bool = True              # VLLM_SERVER_DEV_MODE=1: /reset_prefix_cache (flush_cache) and sleep routes
    enable_prefix_caching: bool = True
    prompt_tokens_details: bool = True  # usage.prompt_tokens_details.cached_tokens in every answer
    attention_backend: str = "TRITON_ATTN"  # no FlashAttention kernels needed (stripped from an offline kit)
    enforce_eager: bool = True         # no CUDA graphs / torch.compile: fast, predictable start
    max_cudagraph_capture_size: int | None = None  # largest batch captured when not eager (None: vLLM's default)
    load_format: str = "auto"          # "dummy": random weights from config.json (throughput of a shape)
    seed: int = 0
    dtype: str = "bfloat16"
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path("results/logs")
    port: int | None = None            # None: pick a free one
    startup_timeout_s: float = 900.0
    launch_module: str = "vllm.entrypoints.openai.api_server"

    def argv(self, port: int) -> list[str]:
        args = [self.python, "-m", self.launch_module, "--model", self.model_path,
                "--host", "127.0.0.1", "--port", str(port), "--dtype", self.dtype,
                "--tensor-parallel-size", str(self.tp_size),
                "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                "--max-model-len", str(self.max_model_len), "--seed", str(self.seed)]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.tokenizer_path:
            args += ["--tokenizer", self.tokenizer_path]
        if self.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
            if self.max_cpu_loras is not None:
                args += ["--max-cpu-loras", str(self.max_cpu_loras)]
            if self.lora_modules:  # JSON items: a path may hold "=" or ",", which the name=path form splits on
                args += ["--lora-modules", *(json.dumps({"name": n, "path": p}) for n, p in self.lora_modules.items())]
        if self.enforce_eager:
            args += ["--enforce-eager"]
        elif self.max_cudagraph_capture_size is not None:
            args += ["--max-cudagraph-capture-size", str(self.max_cudagraph_capture_size)]
        if self.load_format != "auto":
            args += ["--load-format", self.load_format]
        if self.sleep_mode:
            args += ["--enable-sleep-mode"]
        args += ["--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"]
        if self.prompt_tokens_details:
            args += ["--enable-prompt-tokens-details"]
        if self.attention_backend:  # 0.26.0 reads no VLLM_ATTENTION_BACKEND variable any more (run m's log warned)
            args += ["--attention-backend", self.attention_backend]
        return args + list(self.extra_args)

    @staticmethod
    def memory_release_changes() -> dict:
        """Config changes that let the server give its GPU memory back while idle (release/resume): sleep mode
        (/sleep?level=1 moves the weights to the CPU and drops the KV cache; dev mode carries the routes)."""
        return {"sleep_mode": True, "dev_mode": True}

    def startup_adapter_changes(self, name: str, path: str) -> dict:
        """Config changes that register adapter `name` at the next start (--lora-modules): the restart fallback."""
        if not self.enable_lora:
            raise ValueError("a server without --enable-lora cannot register adapters at startup")
        return {"lora_modules": {name: str(path)}}

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = inheritable_env(base)
        env.update(OFFLINE_ENV)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1" if self.enable_lora else "0"
        if self.dev_mode or self.sleep_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        else:
            env.pop("VLLM_SERVER_DEV_MODE", None)
        env.pop("VLLM_ATTENTION_BACKEND", None)  # 0.26.0 warns on it and ignores it: --attention-backend decides
        # torch.distributed's init_method takes VLLM_HOST_IP, else the host's own address (run m: tcp://<host>:port);
        # on loopback, nothing of the server waits for connections from the network beyond its TCPStore
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        env["VLLM_NO_USAGE_STATS"] = "1"  # no usage reporting attempts from an offline machine
        env["PATH"] = os.path.dirname(self.python) + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        return env


class VLLMServer(ManagedServer):
    name = "vLLM"
    interpreter_hint = f"set {VLLM_PYTHON_ENV} to the python of a venv with vllm installed"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.config.model_path

    def make_client(self, url: str, timeout_s: float | None = None) -> VLLMClient:
        kw = {} if timeout_s is None else {"timeout_s": timeout_s}
        return VLLMClient(url, model=self.model_name, **kw)

    @staticmethod
    def absolute_paths(config: "VLLMServerConfig") -> "VLLMServerConfig":
        return _absolute_paths(config)


def _absolute_paths(cfg: VLLMServerConfig) -> VLLMServerConfig:
    """The child runs in the log dir; abspath (not realpath) keeps a venv's symlinked interpreter."""
    return dataclasses.replace(
        cfg, python=os.path.abspath(cfg.python) if os.sep in cfg.python else cfg.python,
        model_path=os.path.abspath(cfg.model_path) if cfg.model_path else cfg.model_path,
        tokenizer_path=os.path.abspath(cfg.tokenizer_path) if cfg.tokenizer_path else None,
        log_dir=Path(os.path.abspath(cfg.log_dir)),
        lora_modules={n: os.path.abspath(p) for n, p in cfg.lora_modules.items()})


__all__ = ["VLLMServer", "VLLMServerConfig", "VLLM_PYTHON_ENV", "ServerStartError"]
