"""The two environments: SGLang in a venv of its own (its pins conflict with Unsloth's), the trainer in this one.

    splitrl env create [--prefix ~/.cache/splitrl] [--dry-run]     # needs PyPI
    splitrl env check [--sglang-python PATH]

On an air-gapped GPU node use the device kit instead (README, "GPU nodes without network").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SGLANG_PIN = "sglang==0.5.14"
ENV_VAR = "SPLITRL_SGLANG_PYTHON"

_VERSIONS_SNIPPET = r"""
import importlib, importlib.metadata as md, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "versions": {}, "errors": {}}
for dist in sys.argv[1].split(","):
    try: out["versions"][dist] = md.version(dist)
    except Exception: out["versions"][dist] = None
for mod in filter(None, sys.argv[2].split(",")):
    try: importlib.import_module(mod)
    except BaseException as e: out["errors"][mod] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(out))
"""

CHECKS = {
    # kind: (distributions to report, modules that must import)
    "sglang": ("sglang,sglang-kernel,flashinfer-python,torch,transformers", "sglang,sglang.srt.server_args"),
    "sglang-kernels": ("sglang-kernel", "sgl_kernel"),  # needs a visible sm90 GPU with the device kit
    "train": ("torch,transformers,peft,trl,unsloth,splitrl", "torch,transformers,peft"),
    "unsloth": ("unsloth", "unsloth"),
}


class EnvError(RuntimeError):
    pass


def default_prefix() -> Path:
    return Path(os.environ.get("SPLITRL_HOME") or Path.home() / ".cache" / "splitrl")


def find_sglang_python(explicit: str | None = None) -> str | None:
    """--sglang-python, else $SPLITRL_SGLANG_PYTHON, else the default venv if it exists."""
    for candidate in (explicit, os.environ.get(ENV_VAR)):
        if candidate:
            return candidate
    default = default_prefix() / "sglang-venv" / "bin" / "python"
    return str(default) if default.exists() else None


def find_vllm_python(explicit: str | None = None) -> str | None:
    """--vllm-python, else $SPLITRL_VLLM_PYTHON, else the default vLLM venv if it exists."""
    for candidate in (explicit, os.environ.get("SPLITRL_VLLM_PYTHON")):
        if candidate:
            return candidate
    default = default_prefix() / "vllm-venv" / "bin" / "python"
    return str(default) if default.exists() else None


def require_sglang_python(explicit: str | None = None) -> str:
    python = find_sglang_python(explicit)
    if not python:
        raise EnvError(f"no SGLang interpreter: pass --sglang-python, set {ENV_VAR}, or run `splitrl env create`")
    if not os.access(python, os.X_OK):
        raise EnvError(f"SGLang interpreter {python!r} does not exist or is not executable")
    return python


def create_commands(prefix: Path, project_dir: Path, python: str = sys.executable) -> list[list[str]]:
    """The commands `env create` runs: SGLang's venv (pip resolves the versions sglang pins) and this
    project with its train+unsloth extras into the current interpreter's environment."""
    venv = prefix / "sglang-venv"
    return [[python, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"],
            [str(venv / "bin" / "python"), "-m", "pip", "install", SGLANG_PIN],
            [python, "-m", "pip", "install", "-e", f"{project_dir}[train,unsloth]"]]


def create_envs(prefix: Path, project_dir: Path, dry_run: bool = False, timeout_s: float = 3600) -> int:
    for cmd in create_commands(prefix, project_dir):
        print("+", " ".join(cmd), flush=True)
        if not dry_run:
            rc = subprocess.call(cmd, timeout=timeout_s)
            if rc:
                raise EnvError(f"command failed with exit code {rc}: {' '.join(cmd)}")
    if not dry_run:
        print(f"SGLang interpreter: {prefix / 'sglang-venv' / 'bin' / 'python'} (export {ENV_VAR}=... to use it)")
    return 0


def inspect_env(python: str, kind: str, timeout_s: float = 180.0) -> dict:
    """Run `python` and report versions and import errors for the given kind of environment."""
    if kind not in CHECKS:
        raise ValueError(f"unknown environment kind {kind!r}: one of {', '.join(CHECKS)}")
    dists, mods = CHECKS[kind]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    env.pop("PYTHONPATH", None) if kind.startswith("sglang") else None
    try:
        proc = subprocess.run([python, "-c", _VERSIONS_SNIPPET, dists, mods], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except FileNotFoundError as e:
        raise EnvError(f"{kind} interpreter {python!r} not found") from e
    except subprocess.TimeoutExpired as e:
        raise EnvError(f"{kind} interpreter {python!r} did not answer within {timeout_s:.0f}s") from e
    if proc.returncode != 0:
        raise EnvError(f"{kind} interpreter {python!r} failed: {proc.stderr.strip()[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_env(python: str, kind: str) -> str:
    """One readable line; raises EnvError naming what cannot import."""
    info = inspect_env(python, kind)
    versions = " ".join(f"{k}={v or '-'}" for k, v in info["versions"].items())
    if info["errors"]:
        errs = "; ".join(f"{m}: {e}" for m, e in info["errors"].items())
        raise EnvError(f"{kind} env ({python}) cannot import what it needs: {errs} [{versions}]")
    return f"{kind}: OK python={info['python']} {versions}"
