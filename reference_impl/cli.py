"""`splitrl` command line: plan, doctor, env, run, compare.

    splitrl plan [--inventory 4xH100-80GB] [--inference-gpus 0] [--training-gpus 1,2,3] [--tp 1] [--model qwen3-4b]
    splitrl doctor [--sglang-python PATH]
    splitrl env create [--prefix DIR] [--dry-run] | splitrl env check [--sglang-python PATH]
    splitrl run --model tiny --steps 30 [--strategy auto|hot-reload|restart|release-resume|merged] [--no-sync]
                [--pipeline [--max-staleness 1] [--tis-cap 2.0]]
    splitrl compare results/*.csv [--baseline LABEL] [--plot out.png] [--label-by device|file|backend|param:NAME]
                    [--metric NAME ...] [--ignore-param NAME ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _gpu_list(text: str | None) -> list[str] | None:
    return None if text is None else [t for t in text.split(",") if t.strip()]


def _model_weight_bytes(model: str | None) -> int | None:
    if not model:
        return None
    from .metrics import ModelShape
    from .models import SHAPES, resolve_model, shape_config

    config = shape_config(model) if model in SHAPES else resolve_model(model).config
    return ModelShape.from_config(config).weight_bytes


def cmd_plan(args) -> int:
    from .devices import format_plan, inventory_status, make_plan, parse_inventory_spec

    if args.inventory:
        gpus, reason = parse_inventory_spec(args.inventory), f"described inventory {args.inventory}"
    else:
        gpus, reason = inventory_status()
    plan = make_plan(gpus, _gpu_list(args.inference_gpus), _gpu_list(args.training_gpus), args.tp,
                     model_weight_bytes=_model_weight_bytes(args.model))
    print(format_plan(plan, reason))
    if args.ddp and plan.mode == "split" and len(plan.training) > 1:
        from .ddp import relaunch_env, torchrun_argv
        env = " ".join(f"{k}={v}" for k, v in relaunch_env().items())
        print(f"training:      {len(plan.training)} DDP ranks, each pinned to CUDA_VISIBLE_DEVICES="
              f"{plan.training_cvd()} (rank i on cuda:i)")
        print("launch:       ", env, " ".join(torchrun_argv(plan, ["-m", "reference_impl.cli", "run", "..."])))
    return 0


def cmd_doctor(args) -> int:
    from .devices import inventory_status
    from .envs import find_sglang_python
    from .fingerprint import collect_fingerprint, format_fingerprint

    gpus, reason = inventory_status()
    print(format_fingerprint(collect_fingerprint(find_sglang_python(args.sglang_python), gpus=gpus or None)))
    if not gpus:
        print(f"gpus: none ({reason})")
    return 0


def cmd_env(args) -> int:
    from .envs import check_env, create_envs, default_prefix, find_sglang_python

    if args.env_cmd == "create":
        return create_envs(Path(args.prefix or default_prefix()), PROJECT_DIR, dry_run=args.dry_run)
    print(check_env(sys.executable, "train"))
    sglang = find_sglang_python(args.sglang_python)
    if not sglang:
        raise SystemExit("sglang: no interpreter found (pass --sglang-python, set SPLITRL_SGLANG_PYTHON, or run "
                         "`splitrl env create`)")
    print(check_env(sglang, "sglang"))
    return 0


def cmd_run(args) -> int:
    from .job import RunConfig, ddp_relaunch_argv, run_job
    from .loop import LoopConfig

    loop = LoopConfig(steps=args.steps, prompts_per_step=args.prompts, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens)
    strategy = "none" if args.no_sync else args.strategy
    cfg = RunConfig(model=args.model, loop=loop, strategy=strategy, engine=args.engine, trainer=args.trainer,
                    inference_gpus=_gpu_list(args.inference_gpus), training_gpus=_gpu_list(args.training_gpus),
                    tp=args.tp, sglang_python=args.sglang_python, lr=args.lr, rank=args.rank, seed=args.seed,
                    results=Path(args.results), log_dir=Path(args.log_dir), cuda_graphs=args.cuda_graphs,
                    mem_fraction=args.mem_fraction, pipeline=args.pipeline, max_staleness=args.max_staleness,
                    tis_cap=args.tis_cap)
    relaunch = ddp_relaunch_argv(cfg, args.raw_argv)
    if relaunch:  # a training group of several GPUs: one process per GPU
        import os
        import subprocess
        from .ddp import relaunch_env
        print("training group of several GPUs: relaunching as", " ".join(relaunch), flush=True)
        return subprocess.call(relaunch, env={**os.environ, **relaunch_env()})
    records = run_job(cfg)
    if not records:  # a DDP rank other than 0: rank 0 reports
        return 0
    first, last = records[0].reward, sum(r.reward for r in records[-5:]) / min(5, len(records))
    print(f"done: {len(records)} steps, reward {first:.3f} -> {last:.3f} (mean of last 5); rows in {cfg.results}")
    return 0


def cmd_compare(args) -> int:
    from .compare import main_compare
    return main_compare(args.csv, baseline=args.baseline, plot_path=args.plot, label_by=args.label_by,
                        metrics=args.metric, ignore_params=args.ignore_param, exclude=args.exclude)


def _gpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inference-gpus", help="visible GPU ordinals or UUIDs for SGLang, e.g. 0 or 0,1")
    p.add_argument("--training-gpus", help="visible GPU ordinals or UUIDs for the trainer")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the inference group")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitrl", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="print the GPU split plan")
    p.add_argument("--inventory", help="describe a machine instead of reading NVML, e.g. 4xH100-80GB")
    p.add_argument("--model", help="shape or local dir: check that it fits the inference GPUs")
    p.add_argument("--ddp", action="store_true", help="also print the trainer's torchrun launch")
    _gpu_args(p)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("doctor", help="print the hardware/software fingerprint")
    p.add_argument("--sglang-python")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("env", help="create or check the SGLang and training environments")
    p.add_argument("env_cmd", choices=["create", "check"])
    p.add_argument("--prefix")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--sglang-python")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("run", help="the main job: split-GPU GRPO with LoRA sync")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--strategy", default="auto", choices=["auto", "hot-reload", "restart", "release-resume", "merged"])
    p.add_argument("--no-sync", action="store_true", help="control run: never publish new adapters")
    p.add_argument("--engine", default="sglang", choices=["sglang", "hf"])
    p.add_argument("--trainer", default="auto", choices=["auto", "unsloth", "peft"])
    p.add_argument("--sglang-python")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--mem-fraction", type=float, help="SGLang --mem-fraction-static (default 0.5 split, 0.3 shared)")
    p.add_argument("--pipeline", action="store_true",
                   help="overlap rollouts of step n+1 with training of step n (split + hot reload, or --engine hf)")
    p.add_argument("--max-staleness", type=int, default=1,
                   help="pipelined: sample each batch with a version at most this many steps behind (0: sequential)")
    p.add_argument("--tis-cap", type=float, default=None,
                   help="decoupled off-policy objective: weight tokens by min(pi_trainer/pi_sampler, CAP) "
                        "(default 2.0 with --pipeline, off otherwise; 0 turns it off)")
    p.add_argument("--results", default="results/run.csv")
    p.add_argument("--log-dir", default="results/logs")
    _gpu_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("compare", help="compare results CSVs across hardware")
    p.add_argument("csv", nargs="+")
    p.add_argument("--baseline")
    p.add_argument("--plot")
    p.add_argument("--label-by", default="device", metavar="device|file|backend|param:NAME",
                   help="what a column is: the machine (default), the file, backend@machine, or machine plus one "
                        "parameter's value (param:layout puts the 1+1, 1+3 and 2+2 runs side by side)")
    p.add_argument("--metric", action="append", help="only this metric (repeatable)")
    p.add_argument("--ignore-param", action="append",
                   help="drop this parameter before matching rows across files (repeatable), e.g. mem_fraction")
    p.add_argument("--exclude", action="append", metavar="NAME=VALUE",
                   help="leave out rows whose parameter NAME is VALUE (repeatable), e.g. step=0 (the warm-up step)")
    p.set_defaults(fn=cmd_compare)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(argv) if argv is not None else sys.argv[1:]  # a DDP relaunch repeats them
    from .devices import NoGpuError, PlanError
    from .envs import EnvError
    from .models import ModelError
    from .pipeline import PipelineError
    try:
        return args.fn(args)
    except (PlanError, NoGpuError, EnvError, ModelError, PipelineError) as e:
        print(f"splitrl {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"splitrl {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
