"""Why does /release_memory_occupation free nothing by NVML? One server with the memory saver, read everything.

    SPLITRL_SGLANG_PYTHON=... python scripts/diagnose_release.py [--model tiny]

Prints: the scheduler's LD_PRELOAD, torch_memory_saver's version and files in the SGLang venv, and NVML memory
(whole GPU and the server's own processes) before and after releasing kv_cache, then weights, then resume.
"""
import argparse
import os
import subprocess
import time

from reference_impl.envs import require_sglang_python
from reference_impl.metrics import gpu_memory_used_mib, process_memory_mib
from reference_impl.models import resolve_model
from reference_impl.procs import pids_in_group
from reference_impl.server import LoraPoolConfig, SGLangServer, ServerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--gpu", default="0")
    args = ap.parse_args()
    python = require_sglang_python()
    print(subprocess.run([python, "-c", "import torch_memory_saver as t, os, importlib.metadata as m; "
                          "print(m.version('torch_memory_saver'), os.listdir(os.path.dirname(t.__file__)))"],
                         capture_output=True, text=True).stdout.strip() or "torch_memory_saver not importable")
    cfg = ServerConfig(python=python, model_path=str(resolve_model(args.model).path), gpu_ids=args.gpu,
                       lora=LoraPoolConfig(max_rank=16), cuda_graphs=False, memory_saver=True,
                       mem_fraction_static=0.2, extra_args=["--enable-weights-cpu-backup"],
                       log_dir=os.environ.get("OUT", "/tmp") + "/diag-logs")
    gpu = int(args.gpu)
    with SGLangServer(cfg) as srv:
        pids = pids_in_group(srv.pid)
        for pid in pids:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            pre = [e.decode() for e in env if e.startswith(b"LD_PRELOAD")]
            print(pid, open(f"/proc/{pid}/comm").read().strip(), pre or "no LD_PRELOAD")

        def show(tag):
            time.sleep(2)
            print(f"{tag:>22}: gpu {gpu_memory_used_mib([gpu])[gpu]:.0f} MiB, server processes "
                  f"{process_memory_mib(gpu, pids_in_group(srv.pid)):.0f} MiB", flush=True)

        show("started")
        srv.client.release_memory_occupation(tags=["kv_cache"])
        show("released kv_cache")
        srv.client.release_memory_occupation(tags=["weights"])
        show("released weights")
        srv.client.resume_memory_occupation()
        show("resumed")


if __name__ == "__main__":
    main()
