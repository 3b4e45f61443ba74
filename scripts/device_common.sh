#!/usr/bin/env bash
# Sourced by scripts/device_session.sh and scripts/device_layouts4.sh: installs the device kit (or reuses it on
# a warm machine), exports the environment, and defines the bounded job helpers. finish_outputs packs the logs
# (at most 8 files come back from $OUT).
OUT=${OUT:-/tmp/splitrl-out}; mkdir -p "$OUT"
PREFIX=/tmp/splitrl
if [ -x "$PREFIX/train-venv/bin/python" ] && [ -x "$PREFIX/sglang-venv/bin/python" ]; then
  echo "kit already installed in $PREFIX (a warm machine): reused" | tee "$OUT/install.log"
else
  bash .gpu-kit/install.sh .gpu-kit "$PREFIX" > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
  tail -1 "$OUT/install.log"
fi
export SPLITRL_SGLANG_PYTHON=$PREFIX/sglang-venv/bin/python SPLITRL_QWEN_TOKENIZER=$PREFIX/qwen3-tokenizer
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD SPLITRL_CACHE=/tmp/splitrl-cache NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=$PREFIX/train-venv/bin/python
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
# record the kind that actually ran (a call for one card may land on the other)
N=$(nvidia-smi -L | wc -l); CARD=h100; nvidia-smi -L | grep -q H200 && CARD=h200
if [ "$CARD" = h200 ] && [ "$N" = 1 ]; then KIND=nvidia-h200; else KIND=nvidia-$CARD-x$N; fi
export SPLITRL_DEVICE_KIND=$KIND; echo "device kind: $KIND"
mkdir -p "$OUT/logs"
$PY -c "from reference_impl.models import resolve_model; print(resolve_model('tiny'))" || exit 1

splitrl_run() {  # name, then `splitrl run` args; RUN_TIMEOUT (480 s) bounds it, RUN_CSV collects its rows
  local name=$1; shift
  timeout -k 60 "${RUN_TIMEOUT:-480}" $PY -m reference_impl.cli run --results "${RUN_CSV:-$OUT/run-$name.csv}" \
    --log-dir "$OUT/logs/run-$name" "$@" > "$OUT/logs/run-$name.log" 2>&1
  echo "run $name: exit $? at ${SECONDS}s | $(tail -1 "$OUT/logs/run-$name.log")"
}

pytest_job() {  # name, timeout s, CUDA_VISIBLE_DEVICES, pytest args: one bounded job, its CSV dir $OUT/name
  # (SIGTERM at the bound lets pytest stop its servers; KILL 60 s later if the teardown hangs)
  local name=$1 t=$2 cvd=$3; shift 3
  CUDA_VISIBLE_DEVICES=$cvd timeout -k 60 "$t" $PY -m pytest "$@" -q -rsx -p no:cacheprovider --failures-now \
    --results-dir "$OUT/$name" > "$OUT/logs/$name.log" 2>&1
  echo "$name exit $? at ${SECONDS}s: $(grep -E "passed|failed" "$OUT/logs/$name.log" | tail -1)"
}
collect_jobs() {  # each job's CSV to $OUT/<job>-<file>.csv, its server logs into the tarball
  for d in "$@"; do
    for f in "$OUT/$d"/*.csv; do [ -f "$f" ] && mv "$f" "$OUT/$d-$(basename "$f")"; done
    [ -d "$OUT/$d/logs" ] && mv "$OUT/$d/logs" "$OUT/logs/$d"
    rm -rf "$OUT/${d:?}"
  done
}

finish_outputs() {
  [ -d "$OUT/logs" ] && tar czf "$OUT/server-logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
  rm -f "$OUT"/.*.lock
  ls -la "$OUT"
}
