#!/usr/bin/env bash
# The seed's 4-GPU layouts on a 4-GPU kind (issue #8), in three back-to-back calls on one warm machine:
#
#   bash scripts/device_layouts4.sh conf     # pytest suite -m gpu in TP=2 + 2 training, then in 1 + 3 training
#   bash scripts/device_layouts4.sh bench-a  # GRPO runs: 1+1 (1.7B on GPUs 0,1 | 4B on GPUs 2,3), then 1+3 DDP
#   bash scripts/device_layouts4.sh bench-b  # GRPO runs: TP=2 + 2 DDP, 1.7B then 4B
#   bash scripts/device_layouts4.sh last     # one call: the TP=2 + 2 suite (no NCCL test), then 1.7B runs 1+3, 2+2
#
# The benchmark runs are `splitrl run` (hot reload, decode CUDA graphs): per step rollout_s, train_s, sync_ms,
# step_s and rollout_output_tok_s, plus peak_vram_mib of every GPU of the layout; all rows in one CSV.
# `conf` leaves out test_one_gpu.py (restart, release/resume): it uses one GPU whatever the layout, and ran in
# the 2-GPU runs. Needs .gpu-kit/ carried with the first call; END bounds each call (s).
set -u
MODE=${1:?conf|bench-a|bench-b|last}
source "$(dirname "$0")/device_common.sh" || exit 1
END=${L4_END:-570}
CSV=$OUT/layouts-bench.csv
RUN_ARGS=(--steps "${L4_STEPS:-5}" --prompts 12 --group-size 8 --max-new-tokens "${L4_GEN_LEN:-128}" --cuda-graphs)
left() { echo $((END - SECONDS - 10)); }
prebuild() {  # model shapes built on the CPU in the background while a suite runs (a warm machine keeps /tmp)
  ( for m in "$@"; do
      timeout 400 $PY -c "from reference_impl.models import resolve_model; print(resolve_model('$m'))"; done
  ) > "$OUT/logs/prebuild.log" 2>&1 &
}
conf_job() {  # name, timeout s, layout args: the suite without test_one_gpu.py (one GPU whatever the layout)
  local name=$1 t=$2; shift 2
  pytest_job "$name" "$t" 0,1,2,3 suite -m gpu --ignore suite/conformance/test_one_gpu.py "$@"
  grep -E "^(FAILED|XFAIL|ERROR)" "$OUT/logs/$name.log" | cut -c1-300 | tail -8
}
layout_run() {  # name, cap s, `splitrl run` args: bounded by the cap and by what is left of the call
  local name=$1 cap=$2 t; shift 2
  t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  [ "$t" -gt 60 ] || { echo "run $name: skipped, ${t}s left"; return; }
  RUN_TIMEOUT=$t RUN_CSV=$CSV splitrl_run "$name" "${RUN_ARGS[@]}" "$@"
}

case $MODE in
  conf)
    prebuild qwen3-1.7b qwen3-4b
    conf_job conf-tp2x2 "${L4_CONF_S:-280}" --inference-gpus 0,1 --tp 2 --training-gpus 2,3
    conf_job conf-1x3 "$(left)" --inference-gpus 0 --training-gpus 1,2,3
    wait
    cat "$OUT/logs/prebuild.log"
    collect_jobs conf-tp2x2 conf-1x3 ;;
  bench-a)
    layout_run 1x1-qwen3-1.7b 240 --model qwen3-1.7b --inference-gpus 0 --training-gpus 1 &
    layout_run 1x1-qwen3-4b 240 --model qwen3-4b --inference-gpus 2 --training-gpus 3 &
    wait
    layout_run 1x3-qwen3-1.7b 170 --model qwen3-1.7b --inference-gpus 0 --training-gpus 1,2,3
    layout_run 1x3-qwen3-4b 230 --model qwen3-4b --inference-gpus 0 --training-gpus 1,2,3 ;;
  bench-b)
    layout_run 2x2-qwen3-1.7b 220 --model qwen3-1.7b --inference-gpus 0,1 --tp 2 --training-gpus 2,3
    layout_run 2x2-qwen3-4b 280 --model qwen3-4b --inference-gpus 0,1 --tp 2 --training-gpus 2,3 ;;
  last)  # what is left when device time runs short
    prebuild qwen3-1.7b
    conf_job conf-tp2x2 "${L4_CONF_S:-330}" --ignore suite/conformance/test_ddp_nccl.py \
      --inference-gpus 0,1 --tp 2 --training-gpus 2,3
    collect_jobs conf-tp2x2
    wait
    layout_run 1x3-qwen3-1.7b 160 --model qwen3-1.7b --inference-gpus 0 --training-gpus 1,2,3
    layout_run 2x2-qwen3-1.7b 220 --model qwen3-1.7b --inference-gpus 0,1 --tp 2 --training-gpus 2,3 ;;
esac
[ -f "$CSV" ] && echo "rows: $(($(wc -l < "$CSV") - 1))"
finish_outputs
