"""`splitrl run`: plan the GPUs, start SGLang and the trainer, run N GRPO steps, write results rows.

    splitrl run --model tiny --steps 30                       # 2+ GPUs: split, hot reload
    splitrl run --model tiny --steps 30 --no-sync             # the control: rollouts stay on v0 (policy-<run>-v0)
    splitrl run --model tiny --steps 30 --strategy restart    # 1 GPU fallback
    splitrl run --model tiny --steps 5 --engine hf --trainer peft   # no GPU: HF engine, PEFT trainer
    splitrl run --model tiny --steps 30 --pipeline            # split: rollouts of step n+1 overlap training n

No process is left behind on success, error, SIGTERM or Ctrl-C: the server is stopped by its own pid group.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .devices import SplitPlan, inventory_status, make_plan
from .ddp import DDP_ENV, DistContext, torchrun_argv
from .loop import LoopConfig, follow_loop, print_step, run_loop, step_rows
from .models import resolve_model
from .server import ALL_LINEAR, LoraPoolConfig, SGLangServer, ServerConfig


DEFAULT_PIPELINE_TIS_CAP = 2.0


@dataclass
class RunConfig:
    model: str = "tiny"
    loop: LoopConfig = field(default_factory=LoopConfig)
    strategy: str = "auto"            # auto | hot-reload | restart | release-resume | none | merged
    engine: str = "sglang"            # sglang | hf (in-process, CPU-capable)
    trainer: str = "auto"             # auto (unsloth on GPU, peft otherwise) | unsloth | peft
    inference_gpus: list[str] | None = None
    training_gpus: list[str] | None = None
    tp: int = 1
    sglang_python: str | None = None
    rank: int = 16
    alpha: int = 32
    lr: float = 2e-2
    seed: int = 0
    mem_fraction: float | None = None
    cuda_graphs: bool = False
    results: Path = Path("results/run.csv")
    log_dir: Path = Path("results/logs")
    pipeline: bool = False            # overlap rollouts with training (reference_impl.pipeline)
    max_staleness: int = 1            # pipelined: a batch is sampled by a version at most this many steps old
    # Decoupled off-policy objective with this importance-weight cap (grpo.decoupled_offpolicy). None: 2.0 when
    # pipelined (plain clipping against a one-step-stale sampler stalled learning at lr 2e-2 on the toy task:
    # suite/unit/test_pipeline.py), off when sequential; 0: off.
    tis_cap: float | None = None

    def effective_tis_cap(self) -> float | None:
        if self.tis_cap is None:
            return DEFAULT_PIPELINE_TIS_CAP if self.pipeline else None
        return self.tis_cap or None


def resolve_strategy(requested: str, plan: SplitPlan | None) -> str:
    if requested != "auto":
        return requested
    if plan is None:              # HF engine: in-process, adapters hot-load
        return "hot-reload"
    return "hot-reload" if plan.mode == "split" else "restart"


def _pin_trainer_gpus(plan: SplitPlan) -> None:
    """CUDA_VISIBLE_DEVICES only works if set before CUDA initialises in this process."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the GPU plan was applied; start a fresh process")
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = plan.training_cvd()


def _server_config(cfg: RunConfig, plan: SplitPlan, model_path: str, strategy: str) -> ServerConfig:
    from .envs import require_sglang_python

    shared = plan.mode == "shared"
    extra = ["--enable-weights-cpu-backup"] if strategy == "release-resume" else []
    return ServerConfig(python=require_sglang_python(cfg.sglang_python), model_path=model_path,
                        gpu_ids=plan.inference_cvd(), tp_size=plan.tp_size,
                        # merged serves full weights by the base name: no LoRA pool (it costs throughput)
                        lora=None if strategy == "merged" else LoraPoolConfig(max_rank=max(cfg.rank, 16),
                                                                              target_modules=ALL_LINEAR),
                        mem_fraction_static=cfg.mem_fraction or (0.3 if shared else 0.5),
                        cuda_graphs=cfg.cuda_graphs, memory_saver=strategy == "release-resume",
                        extra_args=extra, log_dir=cfg.log_dir)


def _make_strategy(name: str, server, engine, plan: SplitPlan | None, base_model_path: str | None = None):
    from . import sync
    from .procs import pids_in_group

    if name == "hot-reload":
        return sync.HotReload(engine)
    if name == "none":
        return sync.NoSync(engine)
    if name == "restart":
        return sync.Restart(server)
    if name == "merged":  # full weights: merged into the base on the trainer side, loaded whole by the server
        from .sync_merged import MergedSync
        return MergedSync(engine, base_model_path)
    if name == "release-resume":
        return sync.ReleaseResume(engine, gpu_index=plan.inference[0].index if plan else None,
                                  server_pids=lambda: pids_in_group(server.pid))
    raise ValueError(f"unknown strategy {name!r}")


def _has_unsloth() -> bool:
    import importlib.util
    return importlib.util.find_spec("unsloth") is not None


class _ServerClient:
    """The client of a server that may come back on another port (the restart strategy picks a free port on
    every start): resolved per call, so the loop never talks to a stopped server's old address."""

    def __init__(self, server):
        self._server = server

    def __getattr__(self, name):
        return getattr(self._server.client, name)


class _Terminated(BaseException):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"signal {signum}")


def ddp_relaunch_argv(cfg: RunConfig, cli_args: list[str], inventory=None) -> list[str] | None:
    """The torchrun command this run must become (a training group of several GPUs), or None.
    Ranks re-plan from the same NVML inventory, so the relaunch keeps every GPU visible."""
    if os.environ.get(DDP_ENV) or cfg.engine != "sglang":
        return None
    plan = make_plan(inventory if inventory is not None else inventory_status()[0], cfg.inference_gpus,
                     cfg.training_gpus, cfg.tp)
    if plan.mode != "split" or len(plan.training) < 2:
        return None
    return torchrun_argv(plan, ["-m", "reference_impl.cli", *cli_args])


def _shared_model_dir(cfg: RunConfig, dist: DistContext | None):
    """Rank 0 builds (or finds) the model dir; the other ranks use the path it sends."""
    if dist is None or dist.is_main:
        model = resolve_model(cfg.model, seed=cfg.seed)
        if dist is not None:
            dist.broadcast(str(model.path))
        return model
    return resolve_model(dist.broadcast(None))


def run_job(cfg: RunConfig) -> list:
    from .fingerprint import collect_fingerprint
    from .results import ResultsWriter
    from .trainer import LoraTrainer

    plan = None
    gpus, reason = inventory_status()
    if cfg.engine == "sglang":
        plan = make_plan(gpus, cfg.inference_gpus, cfg.training_gpus, cfg.tp)
        plan.require_gpu(reason, needs="`splitrl run` with the SGLang engine (use --engine hf on a CPU machine)")
        _pin_trainer_gpus(plan)
    if os.environ.get(DDP_ENV):
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL picks a device
    dist = DistContext.from_env() if os.environ.get(DDP_ENV) else None
    strategy_name = resolve_strategy(cfg.strategy, plan)
    on_gpu = plan is not None
    trainer_backend = cfg.trainer if cfg.trainer != "auto" else ("unsloth" if on_gpu and _has_unsloth() else "peft")
    if trainer_backend == "unsloth":  # before anything imports transformers (building the model does)
        from .trainer_unsloth import import_unsloth_first
        import_unsloth_first()
    model = _shared_model_dir(cfg, dist)
    device = f"cuda:{dist.local_rank if dist else 0}" if on_gpu else "cpu"
    if dist is not None and not dist.is_main:
        return _follow(cfg, model, trainer_backend, device, dist)
    writer = ResultsWriter(cfg.results, fingerprint=collect_fingerprint(cfg.sglang_python, gpus=gpus or None))
    base = {"suite": "run", "test": f"grpo_{strategy_name}", "backend": cfg.engine,
            "mode": plan.mode if plan else "cpu", "strategy": strategy_name, "model": model.name,
            **({"test": f"grpo_{strategy_name}_pipelined"} if cfg.pipeline else {}),
            "params": {"group_size": cfg.loop.group_size, "prompts": cfg.loop.prompts_per_step,
                       "max_new_tokens": cfg.loop.max_new_tokens, "lr": cfg.lr, "rank": cfg.rank,
                       "trainer": trainer_backend, "sync": strategy_name != "none",
                       "training_ranks": dist.world if dist else 1, **_layout_params(plan),
                       **({"max_staleness": cfg.max_staleness} if cfg.pipeline else {}),
                       **({"tis_cap": cfg.effective_tis_cap()} if cfg.effective_tis_cap() else {})}}
    if cfg.pipeline:  # refuse before any server starts
        from .pipeline import NOT_PIPELINABLE, PipelineError
        if strategy_name in NOT_PIPELINABLE:
            raise PipelineError(f"--pipeline needs the server serving while the trainer trains; strategy "
                                f"{strategy_name!r} (plan mode {plan.mode if plan else 'cpu'}) stops it: use a "
                                "split (2+ GPUs, hot reload) or --engine hf")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    server = trainer = strategy = vram = None
    finished = False
    try:
        if on_gpu:  # peak memory of every GPU of the plan, all processes (NVML), over the whole run
            from .metrics import NvmlSampler
            vram = NvmlSampler(sorted({g.index for g in plan.inference + plan.training}), interval_s=0.1).start()
            server = SGLangServer(_server_config(cfg, plan, str(model.path), strategy_name)).start()
            engine = _ServerClient(server)
        else:
            from .hf_engine import HFEngine
            engine = HFEngine(str(model.path), seed=cfg.seed)
        trainer = LoraTrainer(_trainer_config(cfg, model, trainer_backend, device))
        from .tasks import WordStartTask
        task = WordStartTask(str(model.path), seed=cfg.seed)
        strategy = _make_strategy(strategy_name, server, engine, plan, str(model.path))
        show = print_step(cfg.loop.steps)

        def on_step(rec):
            show(rec)
            writer.append(step_rows(rec, base))

        if cfg.pipeline:
            from .pipeline import PipelineConfig, run_pipelined
            records = run_pipelined(cfg.loop, trainer, engine, strategy, task,
                                    PipelineConfig(max_staleness=cfg.max_staleness), on_step=on_step, dist=dist)
        else:
            records = run_loop(cfg.loop, trainer, engine, strategy, task, on_step=on_step, dist=dist)
        if vram is not None:
            writer.append(_vram_rows(vram, base, plan))
        finished = True
        return records
    finally:
        signal.signal(signal.SIGTERM, previous)
        if vram is not None:
            vram.stop()
        if strategy is not None:
            strategy.close()  # the merged strategy removes its merged checkpoints from tmpfs
        if server is not None:
            server.stop()
        if trainer is not None:
            trainer.close()
        if dist is not None:
            dist.close(abort=not finished)  # failing: the other ranks wait for rollouts that never come


def _layout_params(plan: SplitPlan | None) -> dict:
    """How the GPUs were split ("1+3": one inference GPU, three training ranks), to tell layouts apart."""
    if plan is None:
        return {}
    return {"layout": f"{len(plan.inference)}+{len(plan.training)}", "tp": plan.tp_size}


def _vram_rows(sampler, base: dict, plan: SplitPlan | None = None) -> list:
    from .bench import vram_rows

    sampler.stop()
    run_base = {k: v for k, v in base.items() if k != "params"}
    roles = {} if plan is None else {**{g.index: "training" for g in plan.training},
                                     **{g.index: "inference" for g in plan.inference}}  # a shared GPU serves
    return vram_rows(run_base, sampler.peak_mib(), base["params"], roles) if not sampler.error else []


def _trainer_config(cfg: RunConfig, model, backend: str, device: str):
    from .trainer import LoraSpec, TrainerConfig

    return TrainerConfig(model_path=str(model.path), backend=backend, lora=LoraSpec(rank=cfg.rank, alpha=cfg.alpha),
                         lr=cfg.lr, seed=cfg.seed, device=device, tis_cap=cfg.effective_tis_cap(),
                         dtype="bfloat16" if device.startswith("cuda") else "float32")


def _follow(cfg: RunConfig, model, backend: str, device: str, dist: DistContext) -> list:
    """A training rank other than 0: no server, no results; the same steps as rank 0."""
    from .trainer import LoraTrainer

    trainer = LoraTrainer(_trainer_config(cfg, model, backend, device))
    finished = False
    try:
        follow_loop(cfg.loop, trainer, dist)
        finished = True
        return []
    finally:
        trainer.close()
        dist.close(abort=not finished)
