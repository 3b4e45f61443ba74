"""The SGLang server as a context manager (modelled on vLLM's tests/utils.py RemoteOpenAIServer).

    with SGLangServer(ServerConfig(python=..., model_path=..., gpu_ids="0")) as srv:
        srv.client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))

Free port in 20000-50000 (SGLang derives a gRPC port at +10000), binds 127.0.0.1 only, the child's
environment sets CUDA_VISIBLE_DEVICES and offline flags *before* it starts, own process group, log file,
bounded /health wait that fails fast when the process exits, stop() = TERM then KILL of its own group.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .client import SGLangClient
from .managed_server import ManagedServer, ServerStartError
from .procs import PortInUseError

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_ONLY = ("q_proj", "k_proj", "v_proj", "o_proj")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
# One host: the sockets of NCCL's bootstrap and of gloo stay on loopback. Without these a TP=2 server's schedulers
# held 14 listeners on the host's network address (conformance run k, 4x H200); with them, none (run l, 4x H100).
# A value the user set is kept.
LOOPBACK_COLLECTIVES_ENV = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
# Variables of the trainer's environment that must not leak into the server's venv.
ENV_NOT_INHERITED = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "UNSLOTH_RETURN_LOGITS", "UNSLOTH_COMPILE_LOCATION",
                     # a DDP trainer's rank 0 starts the server: torchrun's rendezvous must not leak into
                     # SGLang's own process group (its TP ranks would read rank/world from them)
                     "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                     "SPLITRL_DDP_WORKER")
ENV_PREFIXES_NOT_INHERITED = ("TORCHELASTIC_",)


def inheritable_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """What a server child keeps of the trainer's environment (`base`, default os.environ), over the loopback
    defaults for its collectives."""
    kept = {k: v for k, v in (base if base is not None else os.environ).items()
            if k not in ENV_NOT_INHERITED and not k.startswith(ENV_PREFIXES_NOT_INHERITED)}
    return {**LOOPBACK_COLLECTIVES_ENV, **kept}


@dataclass
class LoraPoolConfig:
    """The server's LoRA memory pool. Explicit so later pushes can't be rejected by an inferred shape."""
    max_rank: int = 64
    target_modules: tuple[str, ...] = ALL_LINEAR
    max_loras_per_batch: int = 4
    max_loaded_loras: int | None = None
    lora_backend: str | None = None  # None: SGLang's default (csgmv)
    startup_adapters: dict[str, str] = field(default_factory=dict)  # name -> path, registered at start

    def argv(self) -> list[str]:
        args = ["--enable-lora", "--max-lora-rank", str(self.max_rank),
                "--lora-target-modules", *self.target_modules,
                "--max-loras-per-batch", str(self.max_loras_per_batch)]
        if self.max_loaded_loras is not None:
            args += ["--max-loaded-loras", str(self.max_loaded_loras)]
        if self.lora_backend:
            args += ["--lora-backend", self.lora_backend]
        if self.startup_adapters:
            args += ["--lora-paths", *(f"{n}={p}" for n, p in self.startup_adapters.items())]
        return args


@dataclass
class ServerConfig:
    python: str                       # the SGLang venv's interpreter (never the trainer's)
    model_path: str
    gpu_ids: str = "0"                # physical indices for the child's CUDA_VISIBLE_DEVICES (PCI order)
    tokenizer_path: str | None = None
    tp_size: int = 1
    attention_backend: str = "triton"  # no FA3 (stripped from the kit) and no JIT for flashinfer
    sampling_backend: str = "pytorch"
    lora: LoraPoolConfig | None = None
    mem_fraction_static: float = 0.5
    cuda_graphs: bool = True
    # SGLang's piecewise (torch.compile) prefill graphs: ~90 s of a cold start for a 1.7B shape, and never
    # used with LoRA (SGLang turns them off there), so base-vs-LoRA comparisons may want them off on both
    prefill_cuda_graphs: bool = True
    # largest decode batch captured (None: SGLang's default, up to 256 and more): each start captures every size,
    # ~74 s of a 0.6B start on an H100, so a server restarted per step caps it at the batch it will serve
    cuda_graph_max_bs: int | None = None
    memory_saver: bool = False
    load_format: str = "auto"          # "dummy": config-only dirs (no LoRA possible, see notes)
    context_length: int = 4096
    disable_radix_cache: bool = False
    random_seed: int = 0
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path("results/logs")
    port: int | None = None            # None: pick a free one
    startup_timeout_s: float = 600.0
    launch_module: str = "sglang.launch_server"

    def argv(self, port: int) -> list[str]:
        args = [self.python, "-m", self.launch_module, "--model-path", self.model_path,
                "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
                "--tp-size", str(self.tp_size), "--attention-backend", self.attention_backend,
                "--sampling-backend", self.sampling_backend, "--mem-fraction-static", str(self.mem_fraction_static),
                "--context-length", str(self.context_length), "--random-seed", str(self.random_seed),
                "--load-format", self.load_format]
        if self.tokenizer_path:
            args += ["--tokenizer-path", self.tokenizer_path]
        if self.lora:
            args += self.lora.argv()
        if not self.cuda_graphs:
            args += ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]
        elif not self.prefill_cuda_graphs:
            args += ["--cuda-graph-backend-prefill", "disabled"]
        if self.cuda_graphs and self.cuda_graph_max_bs is not None:
            args += ["--cuda-graph-max-bs-decode", str(self.cuda_graph_max_bs)]
        if self.memory_saver:
            args += ["--enable-memory-saver"]
        if self.disable_radix_cache:
            args += ["--disable-radix-cache"]
        return args + list(self.extra_args)

    @staticmethod
    def memory_release_changes() -> dict:
        """Config changes that let the server give its GPU memory back while idle (release/resume): the memory
        saver, with a CPU copy of the weights to resume from."""
        return {"memory_saver": True, "extra_args": ["--enable-weights-cpu-backup"]}

    def startup_adapter_changes(self, name: str, path: str) -> dict:
        """Config changes that register adapter `name` at the next start (--lora-paths): the restart fallback."""
        if self.lora is None:
            raise ValueError("a server without a LoRA pool cannot register adapters at startup")
        return {"lora": dataclasses.replace(self.lora, startup_adapters={name: str(path)})}

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = inheritable_env(base)
        env.update(OFFLINE_ENV)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # physical indices = NVML order
        env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids
        # the venv's bin first: Triton finds its tools and console scripts resolve to this venv
        env["PATH"] = os.path.dirname(self.python) + os.pathsep + env.get("PATH", "")
        env.update(self.extra_env)
        return env


class SGLangServer(ManagedServer):
    name = "SGLang"
    interpreter_hint = "run `splitrl env create` or pass --sglang-python / SPLITRL_SGLANG_PYTHON"

    def make_client(self, url: str, timeout_s: float | None = None) -> SGLangClient:
        return SGLangClient(url) if timeout_s is None else SGLangClient(url, timeout_s=timeout_s)

    @staticmethod
    def absolute_paths(config: "ServerConfig") -> "ServerConfig":
        return _absolute_paths(config)


def _absolute_paths(cfg: ServerConfig) -> ServerConfig:
    """The child runs in the log dir: relative paths must not change meaning there. abspath, not realpath,
    keeps a venv's symlinked interpreter (resolving it would leave the venv)."""
    lora = cfg.lora
    if lora and lora.startup_adapters:
        lora = dataclasses.replace(lora, startup_adapters={n: os.path.abspath(p)
                                                           for n, p in lora.startup_adapters.items()})
    return dataclasses.replace(
        cfg, python=os.path.abspath(cfg.python) if os.sep in cfg.python else cfg.python,
        model_path=os.path.abspath(cfg.model_path),
        tokenizer_path=os.path.abspath(cfg.tokenizer_path) if cfg.tokenizer_path else None,
        log_dir=Path(os.path.abspath(cfg.log_dir)), lora=lora)


__all__ = ["ALL_LINEAR", "ATTENTION_ONLY", "LoraPoolConfig", "PortInUseError", "SGLangServer", "ServerConfig",
           "ServerStartError"]
