"""The `splitrl` console script, run as a user runs it (a subprocess of the venv's entry point).

Plans come from described inventories (`--inventory 4xH100-80GB`), so they are checked without GPUs; the
"this machine" cases expect a CPU-only machine and skip where NVML sees a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impl.devices import inventory_status
from reference_impl.fingerprint import FINGERPRINT_KEYS
from reference_impl.results import ResultRow, ResultsWriter, read_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENTRY = Path(sys.executable).parent / "splitrl"
CPU_ONLY = pytest.mark.skipif(bool(inventory_status()[0]), reason="expects a machine without GPUs")


def splitrl(*args, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "reference_impl.cli"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def fields(text: str) -> dict[str, str]:
    """`key:   value` lines of `splitrl plan` / `doctor` output (repeated keys such as note: are joined)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][\w ]*?)\s*:\s+(.*)$", line)
        if m:
            key = m.group(1).strip()
            out[key] = (out[key] + " | " + m.group(2)) if key in out else m.group(2)
    return out


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_console_script_is_installed():
    assert ENTRY.exists(), f"{ENTRY} missing: is the project installed in this venv (pip install -e .)?"


# ---------------------------------------------------------------- plan

@pytest.mark.parametrize("inventory,tp,mode,sync,inference_cvd,training_cvd", [
    ("1xH100-80GB", 1, "shared", "restart", "0", "0"),
    ("2xH100-80GB", 1, "split", "hot-reload", "0", "1"),
    ("4xH100-80GB", 1, "split", "hot-reload", "0", "1,2,3"),
    ("4xH100-80GB", 2, "split", "hot-reload", "0,1", "2,3"),
    ("8xH100-80GB", 1, "split", "hot-reload", "0", "1,2,3,4,5,6,7"),
], ids=["1gpu", "2gpu", "4gpu", "4gpu-tp2", "8gpu"])
def test_plan_for_described_inventories(tmp_path, inventory, tp, mode, sync, inference_cvd, training_cvd):
    proc = splitrl("plan", "--inventory", inventory, "--tp", tp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    assert f["mode"] == f"{mode} (described inventory {inventory})"
    assert f["tp_size"] == str(tp)
    assert f["weight sync"] == sync
    assert f["SGLang env"] == f"CUDA_VISIBLE_DEVICES={inference_cvd} CUDA_DEVICE_ORDER=PCI_BUS_ID"
    assert f["trainer env"] == f"CUDA_VISIBLE_DEVICES={training_cvd} CUDA_DEVICE_ORDER=PCI_BUS_ID"
    inference = re.findall(r"#(\d+) \(physical (\d+)\)", f["inference"])
    training = re.findall(r"#(\d+) \(physical (\d+)\)", f["training"])
    assert ",".join(p for _, p in inference) == inference_cvd
    assert ",".join(p for _, p in training) == training_cvd
    assert "H100-80GB 81920 MiB" in f["inference"]
    if mode == "shared":
        assert "shared GPU 0" in f["note"]


def test_plan_with_explicit_groups(tmp_path):
    proc = splitrl("plan", "--inventory", "4xH100-80GB", "--inference-gpus", "3", "--training-gpus", "0,1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    assert f["SGLang env"].startswith("CUDA_VISIBLE_DEVICES=3 ")
    assert f["trainer env"].startswith("CUDA_VISIBLE_DEVICES=0,1 ")
    assert "GPU(s) 2 visible but unused" in f["note"]


@pytest.mark.parametrize("args,says", [
    (["--inventory", "4xH100-80GB", "--inference-gpus", "0,1", "--training-gpus", "1,2", "--tp", "2"],
     "--inference-gpus 0,1 overlaps --training-gpus 1,2 on GPU 1: give each GPU to one side"),
    (["--inventory", "2xH100-80GB", "--tp", "2"], "pass --tp 1 or less, or add GPUs"),
    (["--inventory", "2xH100-80GB", "--inference-gpus", "5"], "names unknown GPU '5'"),
    (["--inventory", "4xH100"], "expected COUNTxNAME-MEMGB items"),
], ids=["overlap", "tp-too-big", "unknown-gpu", "bad-inventory"])
def test_impossible_plans_exit_2_with_one_line_naming_the_fix(tmp_path, args, says):
    proc = splitrl("plan", *args, cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line.startswith("splitrl plan: ") and says in line, line
    assert proc.stdout == ""


@CPU_ONLY
def test_plan_on_this_machine_says_none_and_why(tmp_path):
    proc = splitrl("plan", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    assert re.fullmatch(r"none \(.+\)", f["mode"]), f["mode"]  # the reason, e.g. NVML unavailable: ...
    assert f["note"] == "no GPU visible: CPU-only tests only"
    assert "SGLang env" not in f


# ---------------------------------------------------------------- doctor, env

def test_doctor_prints_the_fingerprint(tmp_path):
    proc = splitrl("doctor", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    missing = [k for k in FINGERPRINT_KEYS if k not in f]
    assert not missing, f"doctor output lacks {missing}:\n{proc.stdout}"
    assert f["python_version"] == ".".join(map(str, sys.version_info[:3]))
    import torch
    assert f["torch_version"] == torch.__version__
    if not inventory_status()[0]:
        assert f["gpu_count"] == "0" and f["gpus"].startswith("none (")


def test_env_check_names_a_missing_sglang_interpreter(tmp_path):
    proc = splitrl("env", "check", "--sglang-python", "/nonexistent", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line == "splitrl env: sglang interpreter '/nonexistent' not found", line
    assert proc.stdout.startswith("train: OK python=")  # the training env is checked first and is fine here


def test_env_create_dry_run_prints_the_commands_and_creates_nothing(tmp_path):
    prefix = tmp_path / "envs"
    proc = splitrl("env", "create", "--dry-run", "--prefix", prefix, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmds = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    venv_python = f"{prefix}/sglang-venv/bin/python"
    assert cmds[0].endswith(f" -m venv {prefix}/sglang-venv")
    assert f"{venv_python} -m pip install sglang==0.5.14" in cmds
    assert any(c.endswith("[train,unsloth]") and " -m pip install -e " in c for c in cmds)
    assert not prefix.exists(), "a dry run created the prefix"


# ---------------------------------------------------------------- compare

def _fingerprint(kind: str) -> dict:
    return {"device_kind": kind, "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": "1"}


def _results(path: Path, kind: str, values) -> Path:
    writer = ResultsWriter(path, fingerprint=_fingerprint(kind))
    writer.append([ResultRow("rollout", "test_decode", "decode_tok_s", v, model="tiny", params={"batch": 8})
                   for v in values])
    writer.append(ResultRow("run", "grpo", "sync_ms", values[0] / 10, model="tiny"))
    return path


def test_compare_prints_ratios_and_writes_a_png(tmp_path):
    a = _results(tmp_path / "h100.csv", "nvidia-h100-x1", [90.0, 100.0, 130.0])
    b = _results(tmp_path / "h200.csv", "nvidia-h200", [150.0, 140.0, 160.0])
    png = tmp_path / "plots" / "cmp.png"
    proc = splitrl("compare", a, b, "--plot", png, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "baseline: nvidia-h100-x1" in proc.stdout
    assert "nvidia-h200/nvidia-h100-x1" in proc.stdout
    decode = next(line for line in proc.stdout.splitlines() if "decode_tok_s" in line)
    assert "1.500x" in decode and "100" in decode and "150" in decode  # medians 100 and 150
    assert "1.667x" in next(line for line in proc.stdout.splitlines() if "sync_ms" in line)
    assert f"wrote {png}" in proc.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_compare_refuses_a_malformed_csv_with_file_and_row(tmp_path):
    good = _results(tmp_path / "good.csv", "nvidia-h100-x1", [1.0, 2.0, 3.0])
    bad = _results(tmp_path / "bad.csv", "nvidia-h200", [1.0, 2.0, 3.0])
    lines = bad.read_text().splitlines()
    lines[2] = lines[2].replace(",2.0,", ",two,", 1)
    assert ",two," in lines[2]
    bad.write_text("\n".join(lines) + "\n")
    proc = splitrl("compare", good, bad, cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line == f"{bad}: row 3: value 'two' is not a number", line
    assert proc.stdout == ""


# ---------------------------------------------------------------- run

@CPU_ONLY
def test_run_with_sglang_on_a_cpu_machine_says_no_gpu_and_suggests_hf(tmp_path):
    proc = splitrl("run", "--engine", "sglang", "--steps", "1", "--results", tmp_path / "r.csv", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line.startswith("splitrl run: no GPU visible") and "--engine hf" in line, line
    assert not (tmp_path / "r.csv").exists()


def test_run_with_the_hf_engine_writes_results_rows(tmp_path):
    results = tmp_path / "out" / "run.csv"
    proc = splitrl("run", "--engine", "hf", "--trainer", "peft", "--steps", "2", "--prompts", "2", "--group-size", "4",
                   "--max-new-tokens", "4", "--results", results, "--log-dir", tmp_path / "logs", cwd=tmp_path,
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"done: 2 steps, reward [\d.]+ -> [\d.]+ \(mean of last 5\); rows in ", proc.stdout), proc.stdout
    assert "2/2" in proc.stdout and re.search(r"policy-[0-9a-f]{6}-v1\b", proc.stdout), proc.stdout
    df = read_results(results)
    assert set(df["backend"]) == {"hf"} and set(df["strategy"]) == {"hot-reload"} and set(df["mode"]) == {"cpu"}
    assert set(df["model"]) == {"tiny"} and len(set(df["run_id"])) == 1
    for metric in ("reward", "rollout_s", "train_s", "sync_ms", "step_s", "output_tokens", "cached_tokens", "loss",
                   "equal_reward_groups_count"):
        rows = df[df["metric"] == metric]
        assert len(rows) == 2, f"{metric}: {len(rows)} rows"
    by = lambda m: df[df["metric"] == m]["value"].tolist()  # noqa: E731
    assert all(0.0 <= v <= 1.0 for v in by("reward"))
    assert all(v > 0 for v in by("rollout_s") + by("train_s") + by("sync_ms"))
    assert by("output_tokens") == [2 * 4 * 4] * 2
    params = df[df["metric"] == "reward"]["params"].tolist()
    assert ['"step":0' in params[0], '"step":1' in params[1]] == [True, True]
    assert '"sync":true' in params[0] and '"trainer":"peft"' in params[0]
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("out", "logs")]
    assert not leftovers, f"run left files in its working directory: {leftovers}"
    shutil.rmtree(tmp_path / "out")


def test_run_pipelined_with_the_hf_engine_records_staleness(tmp_path):
    results = tmp_path / "out" / "run.csv"
    proc = splitrl("run", "--engine", "hf", "--trainer", "peft", "--steps", "3", "--prompts", "2", "--group-size", "4",
                   "--max-new-tokens", "4", "--pipeline", "--max-staleness", "1", "--results", results,
                   "--log-dir", tmp_path / "logs", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3" in proc.stdout and " stale max " in proc.stdout, proc.stdout
    df = read_results(results)
    assert set(df["test"]) == {"grpo_hot-reload_pipelined"}
    by = lambda m: df[df["metric"] == m]["value"].tolist()  # noqa: E731
    assert by("staleness_max_steps")[0] == 0 and all(0 <= v <= 1 for v in by("staleness_max_steps"))
    assert len(by("train_wait_s")) == 3 and all(v >= 0 for v in by("train_wait_s"))
    params = df[df["metric"] == "reward"]["params"].tolist()
    assert '"max_staleness":1' in params[0] and '"tis_cap":2.0' in params[0]


def test_run_pipelined_refuses_a_strategy_that_stops_the_server(tmp_path):
    proc = splitrl("run", "--engine", "hf", "--strategy", "restart", "--steps", "1", "--pipeline",
                   "--results", tmp_path / "r.csv", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "--pipeline needs the server serving while the trainer trains" in line and "'restart'" in line, line
    assert not (tmp_path / "r.csv").exists()
