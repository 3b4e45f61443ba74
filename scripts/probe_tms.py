"""Does torch_memory_saver free memory at all on this stack, outside SGLang? Run with the SGLang venv's python:

    /tmp/splitrl/sglang-venv/bin/python scripts/probe_tms.py

For each hook mode (preload: LD_PRELOAD'd cudaMalloc hook, what SGLang uses; torch: pluggable allocator) a child
process allocates 2 GiB inside a region and 2 GiB outside, pauses the region, resumes it, and prints the GPU
memory NVML reports at each point plus whether the tensor kept its contents (cpu backup). Needs no server.
"""
import os
import subprocess
import sys
import time

GIB = 1 << 30


def nvml_used_mib() -> float:
    try:
        import pynvml
    except ImportError:  # the SGLang venv may lack nvidia-ml-py: nvidia-smi reads the same NVML counter
        out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.strip().splitlines()[0])
    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    finally:
        pynvml.nvmlShutdown()


def child(mode: str) -> None:
    import torch
    import torch_memory_saver as tms
    saver = tms.torch_memory_saver
    if mode == "torch":
        saver.hook_mode = "torch"
    print(f"[{mode}] torch {torch.__version__} cuda {torch.version.cuda} tms file {tms.__file__}")
    print(f"[{mode}] LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r} "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}")
    torch.cuda.init()
    base = nvml_used_mib()
    with saver.region(tag="probe", enable_cpu_backup=True):
        paused_tensor = torch.full((2 * GIB,), 7, dtype=torch.uint8, device="cuda")
    normal = torch.full((2 * GIB,), 9, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    before = nvml_used_mib()
    t0 = time.perf_counter()
    saver.pause("probe")
    torch.cuda.synchronize()
    pause_ms = (time.perf_counter() - t0) * 1e3
    time.sleep(1)
    paused = nvml_used_mib()
    saver.resume("probe")
    torch.cuda.synchronize()
    resumed = nvml_used_mib()
    kept = bool((paused_tensor[:1024] == 7).all().item()) and bool((normal[:1024] == 9).all().item())
    print(f"[{mode}] nvml MiB: start {base:.0f} allocated {before:.0f} paused {paused:.0f} resumed {resumed:.0f} "
          f"| freed by pause {before - paused:.0f} MiB (expect ~2048) in {pause_ms:.1f} ms | contents kept {kept}")


def main() -> None:
    if len(sys.argv) > 1:
        return child(sys.argv[1])
    import torch_memory_saver
    for mode in ("preload", "torch"):
        env = dict(os.environ)
        if mode == "preload":  # what SGLang does for its scheduler: configure_subprocess sets LD_PRELOAD
            with torch_memory_saver.configure_subprocess():
                env = dict(os.environ)
        proc = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True,
                              timeout=120)
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "Warning" not in l]
        print("\n".join(lines[-12:]), f"\n[{mode}] exit {proc.returncode}", flush=True)


if __name__ == "__main__":
    main()
