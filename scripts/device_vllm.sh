#!/usr/bin/env bash
# The vLLM comparison on an offline GPU machine in two `run` calls on the SAME warm machine (vLLM + its deps are
# ~85 MiB xz: more than one call can carry; results/VLLM-OFFLINE.md, "Kit scripts"):
#
#   call 1, carry [".vllm-kit/part1"]:  bash scripts/device_vllm.sh stash   # part1 -> /tmp/vllm-kit (survives while warm)
#   (only a kit built with VLLM_KIT_KEEP_MOE=1: one more call, carry [".vllm-kit/part3"]: ... stash 3)
#   call 2, carry [".vllm-kit/part2"]:  bash scripts/device_vllm.sh run conf    # suite -m gpu --backend vllm
#   call 3 (same warm machine, nothing carried: the vLLM venv is reused):
#                                       bash scripts/device_vllm.sh run bench   # --benchmark-only --backend vllm
#   (or `run PYTEST ARGS...` for anything else)
#   VLLM_RUN_END (570) bounds a call (s); VLLM_ONE_GPU_S (290) bounds each of bench's two one-GPU jobs
# `bench` sizes the set to one call: rollout qwen3-1.7b base at concurrency 64 and 256 (GPU 0) next to hot reload
# r16 x 5 (GPU 1), then the split step on qwen3-0.6b x 4 steps (both GPUs); the TRL peer left out (it has no
# backend). Each compiled vLLM start (CUDA graphs on, as deployed) costs minutes, so the two one-GPU benchmarks run
# at once on their own GPUs (they share the host's CPUs). vLLM only: with --backend both pytest ran every SGLang
# variant first and the call's bound came before any vLLM one (2026-11-26); SGLang's rows for the same set on the
# same kind are in results/nvidia-h100-x2-*-20261126.csv.
#
# `run` installs PREFIX/vllm-venv (scripts/vllm_kit/install.sh; reused when already there) and runs pytest with
# SPLITRL_VLLM_PYTHON set. The SGLang kit must already be installed in /tmp/splitrl by an earlier call of this warm
# window (device_session.sh, carrying .gpu-kit): a third transfer, since .gpu-kit (56 MiB) and part2 don't fit together.
# Build the parts first: bash scripts/vllm_kit/build.sh .vllm-kit. Everything lands in $OUT.
set -u
MODE=${1:?stash [1|3] | run conf|bench|PYTEST ARGS}; shift
KIT=/tmp/vllm-kit
case $MODE in
  stash)
    P=${1:-1}
    mkdir -p "$KIT" && cp ".vllm-kit/part$P/vllm-kit-part$P.tar.xz" "$KIT/" || { echo "stash: no .vllm-kit/part$P carried?"; exit 1; }
    ls -la "$KIT"; df -h /tmp | tail -1
    echo "stashed: now call 'bash scripts/device_vllm.sh run' with carry .vllm-kit/part2 before this machine goes back" ;;
  run)
    if [ ! -x /tmp/splitrl/vllm-venv/bin/python ]; then  # a warm machine keeps the venv of an earlier `run`
      [ -f "$KIT/vllm-kit-part1.tar.xz" ] || { echo "no $KIT/vllm-kit-part1.tar.xz: a fresh machine; run 'stash' (carry .vllm-kit/part1) first"; exit 1; }
      cp .vllm-kit/part2/vllm-kit-part2.tar.xz "$KIT/" || { echo "run: no .vllm-kit/part2 carried?"; exit 1; }
    fi
    [ -x /tmp/splitrl/sglang-venv/bin/python ] || [ -f .gpu-kit/gpu-kit.tar.xz ] || {
      echo "no SGLang kit in /tmp/splitrl and no .gpu-kit here: install it in an earlier call of this warm window"; exit 1; }
    source "$(dirname "$0")/device_common.sh" || exit 1   # SGLang kit (reused), env, pytest_job, finish_outputs
    timeout 300 bash scripts/vllm_kit/install.sh "$KIT" "$PREFIX" > "$OUT/vllm-install.log" 2>&1 \
      || { echo "vllm install failed:"; tail -30 "$OUT/vllm-install.log"; exit 1; }
    tail -1 "$OUT/vllm-install.log"
    # the flashinfer wheel has no prebuilt kernels: its top-k/top-p sampler (vLLM's default on CUDA) would JIT-compile
    # with nvcc at the first request; the PyTorch sampler needs nothing (server children inherit VLLM_* variables)
    export SPLITRL_VLLM_PYTHON=$PREFIX/vllm-venv/bin/python NVSHMEM_DISABLE_NVLS=1 VLLM_USE_FLASHINFER_SAMPLER=0
    # import check first (bounded): a missing dependency shows here in seconds, not after a server start timeout
    timeout 120 "$SPLITRL_VLLM_PYTHON" -c 'import vllm, vllm.entrypoints.openai.api_server as a; print("vllm", vllm.__version__, "api_server imports")' \
      > "$OUT/logs/vllm-import.log" 2>&1; echo "vllm import exit $?: $(tail -1 "$OUT/logs/vllm-import.log")"
    END=${VLLM_RUN_END:-570}
    left() { echo $((END - SECONDS)); }
    [ "$(left)" -gt 60 ] || { echo "only $(left)s left for pytest: not started"; finish_outputs; exit 1; }
    case ${1:-conf} in
      # vLLM's side only: SGLang's conformance (runs a-l) and benchmarks (2026-11-26, this kind) ran in calls of their
      # own, and both in one call don't fit its 10 minutes (SGLang's suite ~340 s + vLLM's 220 s + the kit)
      conf)  # the DDP tests start no server
        pytest_job vllm-conf "$(left)" "$(seq -s, 0 $((N - 1)))" suite -m gpu --backend vllm -k "not ddp_nccl"
        grep -E "^(FAILED|ERROR|XFAIL)|passed|failed" "$OUT/logs/vllm-conf.log" | cut -c1-300 | tail -25
        collect_jobs vllm-conf ;;
      bench)
        export SPLITRL_BENCH_SHAPES=qwen3-1.7b SPLITRL_BENCH_LORA_SHAPES= SPLITRL_BENCH_CONCURRENCY=64,256 \
          SPLITRL_BENCH_SYNC_RANKS=16 SPLITRL_BENCH_SYNC_ROUNDS=5 SPLITRL_BENCH_STEP_MODEL=qwen3-0.6b SPLITRL_BENCH_STEPS=4
        one_gpu_s=${VLLM_ONE_GPU_S:-290}
        pytest_job vllm-rollout "$one_gpu_s" 0 suite/benchmarks/test_bench_rollout.py --benchmark-only --backend vllm &
        pytest_job vllm-sync "$one_gpu_s" 1 suite/benchmarks/test_bench_sync.py::test_hot_reload --benchmark-only \
          --backend vllm &
        wait
        [ "$(left)" -gt 60 ] && pytest_job vllm-step "$(left)" 0,1 suite/benchmarks/test_bench_step.py::test_step_split \
          --benchmark-only --backend vllm
        for j in vllm-rollout vllm-sync vllm-step; do
          [ -f "$OUT/logs/$j.log" ] && grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/logs/$j.log" | cut -c1-300 | tail -6
        done
        collect_jobs vllm-rollout vllm-sync vllm-step ;;
      *) pytest_job vllm-run "$(left)" "$(seq -s, 0 $((N - 1)))" "$@"; collect_jobs vllm-run ;;
    esac
    finish_outputs ;;
  *) echo "unknown mode $MODE (stash [1|3] | run [pytest args])"; exit 2 ;;
esac
