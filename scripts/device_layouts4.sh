#!/usr/bin/env bash
# The seed's 4-GPU layouts on a 4-GPU kind (issue #8). Each argument is one task, run in order:
#
#   bash scripts/device_layouts4.sh conf-2x2 run-1x3-qwen3-1.7b        # a fresh machine (carry .gpu-kit)
#   bash scripts/device_layouts4.sh run-1x3-qwen3-4b run-2x2-qwen3-1.7b  # the same warm machine
#   bash scripts/device_layouts4.sh run-2x2-qwen3-4b
#
# Tasks:
#   conf-2x2, conf-1x3   pytest suite -m gpu with 2 inference GPUs (TP=2) + 2 training, or 1 + 3 training.
#                        Leaves out test_one_gpu.py (restart, release/resume): it uses one GPU whatever the
#                        layout, and runs in the 1- and 2-GPU sessions.
#   run-<layout>-<model> `splitrl run` (hot reload, decode CUDA graphs) in layout 1x1 (GPUs 0 | 1), 1x3 (0 | 1,2,3,
#                        DDP) or 2x2 (0,1 TP=2 | 2,3 DDP): per step rollout_s, train_s, sync_ms, step_s and
#                        rollout_output_tok_s, plus peak_vram_mib of every GPU of the layout; rows in one CSV.
#   pair-1x1             1x1 runs of qwen3-1.7b (GPUs 0,1) and qwen3-4b (GPUs 2,3) side by side.
# L4_END bounds the whole call (s); each task also has its own cap. The model shapes the runs need are built in
# the background while the first task runs (a warm machine keeps them in /tmp): on a GPU when a run comes first,
# on the CPU under a suite.
set -u
[ $# -gt 0 ] || { sed -n 2,19p "$0"; exit 2; }
source "$(dirname "$0")/device_common.sh" || exit 1
END=${L4_END:-570}
CSV=$OUT/layouts-bench.csv
RUN_ARGS=(--steps "${L4_STEPS:-5}" --prompts 12 --group-size 8 --max-new-tokens "${L4_GEN_LEN:-128}" --cuda-graphs)
left() { echo $((END - SECONDS - 10)); }
layout_args() {  # 1x1 | 1x3 | 2x2 -> the GPU flags of that layout
  case $1 in
    1x1) echo --inference-gpus 0 --training-gpus 1 ;;
    1x3) echo --inference-gpus 0 --training-gpus 1,2,3 ;;
    2x2) echo --inference-gpus 0,1 --tp 2 --training-gpus 2,3 ;;
    *) echo "unknown layout $1" >&2; return 1 ;;
  esac
}
run_cap() {  # s: measured on 4x H100/H200 (server ~60 s, TP=2 ~150 s first start; trainer load; step 0 ~20 s compile;
            # the 1+3 qwen3-1.7b run needed ~200 s to its last step)
  local cap=200
  case $1 in *4b) cap=$((cap + 50)) ;; esac
  case $1 in 2x2-*) cap=$((cap + 90)) ;; 1x3-*) cap=$((cap + 40)) ;; esac  # TP=2 start; 3 ranks load and compile
  echo $cap
}
conf_job() {  # name, cap s, layout args
  local name=$1 t=$2; shift 2
  [ "$(left)" -lt "$t" ] && t=$(left)
  pytest_job "$name" "$t" 0,1,2,3 suite -m gpu --ignore suite/conformance/test_one_gpu.py "$@"
  grep -E "^(FAILED|XFAIL|ERROR)" "$OUT/logs/$name.log" | cut -c1-300 | tail -8
  collect_jobs "$name"
}
layout_run() {  # name, cap s, `splitrl run` args: bounded by the cap and by what is left of the call
  local name=$1 cap=$2 t; shift 2
  t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  [ "$t" -gt 60 ] || { echo "run $name: skipped, ${t}s left"; return; }
  RUN_TIMEOUT=$t RUN_CSV=$CSV splitrl_run "$name" "${RUN_ARGS[@]}" "$@"
}

models=$(for t in "$@"; do case $t in run-*) echo "${t#run-*-}" ;; pair-1x1) echo qwen3-1.7b qwen3-4b ;; esac; done)
# On a GPU when a run comes first (as the benchmarks build theirs: the CPU took ~100 s for 1.7B). Under a suite, on
# the CPU: SGLang sizes its KV pool from the memory free at launch.
case ${1:-} in run-*|pair-*) build_on=cuda ;; *) build_on=cpu ;; esac
( for m in $(echo $models | tr ' ' '\n' | sort -u); do
    timeout 400 $PY -c "from reference_impl.models import resolve_model as r; print(r('$m', device='$build_on'))"
  done
) > "$OUT/logs/prebuild.log" 2>&1 &
for task in "$@"; do
  case $task in
    conf-2x2) conf_job conf-tp2x2 "${L4_CONF_S:-400}" $(layout_args 2x2) ;;
    conf-1x3) conf_job conf-1x3 "${L4_CONF_S:-300}" $(layout_args 1x3) ;;
    run-*)
      wait  # the model shapes
      spec=${task#run-}; layout=${spec%%-*}; model=${spec#*-}
      args=$(layout_args "$layout") || continue
      layout_run "$spec" "$(run_cap "$spec")" --model "$model" $args ;;
    pair-1x1)
      wait
      layout_run 1x1-qwen3-1.7b 240 --model qwen3-1.7b --inference-gpus 0 --training-gpus 1 &
      layout_run 1x1-qwen3-4b 240 --model qwen3-4b --inference-gpus 2 --training-gpus 3 &
      wait ;;
    *) echo "unknown task $task" ;;
  esac
done
wait
grep -v "^$" "$OUT/logs/prebuild.log" | tail -2
[ -f "$CSV" ] && echo "rows: $(($(wc -l < "$CSV") - 1))"
finish_outputs
