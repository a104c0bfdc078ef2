#!/usr/bin/env bash
# The GPU figures of bench/README.md in one command, on a machine with a CUDA GPU.
#
#   bash bench/gpu.sh              # the paper network at 112x136x136: every switch, two fits
#   OUT=/some/dir bash bench/gpu.sh
#
# It needs a CUDA build of torch (and numpy, scipy) in the python3 on PATH, nothing else:
# the engine (models/) is put on the path from this checkout, so no pip install and no
# network. What it measures, each as one JSON line of bench/cost.py in $OUT/gpu.jsonl
# (and a copy of the log in $OUT/gpu.log):
#   1. seconds per forward+backward pass, FLOPs, peak memory (torch.cuda.max_memory_allocated)
#      for fp32 (IEEE), TF32, bf16 autocast; channels-last; cuDNN autotuning; torch.compile;
#   2. the whole fit of the paper network at the schedule the fidelity benchmark validates
#      (12 epochs x 10, "papernet"), with the fastest switches of step 1 and in fp32;
#   3. the paper preset's whole fit (200 epochs x 20) when FULL=1, under a time limit
#      (FULL_LIMIT_S, default 420 s); otherwise its time is pass_s x its counted passes.
# The end-to-end time of a study through `dipnode serve` needs the DICOM stack (pydicom,
# pynetdicom, highdicom, SimpleITK, pydantic-settings, nilearn) installed there: E2E=1 runs
# `dipnode demo --preset paper --device cuda` and records its wall time, when they are.
#
# Environment: SHAPE (default "112 136 136"), DEVICE (default cuda), PRESET (default paper),
# PASSES (timed passes per case, default 5), SKIP_COMPILE=1 to leave out torch.compile
# (compiling takes a minute or more), FULL=1, E2E=1. On a CPU the same script is a smoke test:
#   SHAPE="16 16 16" DEVICE=cpu PASSES=1 SKIP_COMPILE=1 bash bench/gpu.sh
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${OUT:-$ROOT/bench/results/gpu}
SHAPE=${SHAPE:-112 136 136}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-paper}
PASSES=${PASSES:-5}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
JSONL=$OUT/gpu.jsonl
: > "$JSONL"

# The dipnode namespace from this checkout without installing it (pyproject maps the
# top-level folders to dipnode.*); only the engine is imported by cost.py.
PKG=$(mktemp -d)
mkdir -p "$PKG/dipnode"
for sub in models node dicom_io sim; do ln -s "$ROOT/$sub" "$PKG/dipnode/$sub"; done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }
case_() {  # name, then bench/cost.py arguments
  local name=$1; shift
  say "== $name: bench/cost.py $*"
  local t0=$SECONDS
  if out=$("$PY" "$HERE/cost.py" --preset "$PRESET" --shape $SHAPE --device "$DEVICE" "$@" 2>>"$LOG"); then
    echo "$out" | head -1 | "$PY" -c "import json,sys; r=json.loads(sys.stdin.read()); r['case']='$name'; print(json.dumps(r))" >> "$JSONL"
    say "$(echo "$out" | tail -1)  [$((SECONDS - t0)) s]"
  else
    say "$name FAILED (see $LOG)"
  fi
}

say "dipnode bench/gpu.sh $(date -u +%FT%TZ) on $(hostname)"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv | tee -a "$LOG"

# 1. One pass, switch by switch (each case a fresh process: peak memory is its own).
case_ fp32            --passes "$PASSES" --warmup 2 --precision fp32 --no-cudnn-benchmark
case_ fp32-bench      --passes "$PASSES" --warmup 2 --precision fp32 --cudnn-benchmark
case_ tf32-bench      --passes "$PASSES" --warmup 2 --precision tf32 --cudnn-benchmark
case_ bf16-bench      --passes "$PASSES" --warmup 2 --precision bf16 --cudnn-benchmark
case_ bf16-bench-cl   --passes "$PASSES" --warmup 2 --precision bf16 --cudnn-benchmark --channels-last
case_ tf32-bench-cl   --passes "$PASSES" --warmup 2 --precision tf32 --cudnn-benchmark --channels-last
if [ "${SKIP_COMPILE:-0}" != 1 ]; then
  case_ bf16-bench-compile --passes "$PASSES" --warmup 3 --precision bf16 --cudnn-benchmark --compile
  case_ tf32-bench-compile --passes "$PASSES" --warmup 3 --precision tf32 --cudnn-benchmark --compile
fi

# The fastest TF32/bf16 case of step 1 (by pass_s) sets the switches of the fits.
BEST=$("$PY" - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r["case"] != "fp32"] or rows
if not rows:
    print("--precision fp32"); raise SystemExit
b = min(rows, key=lambda r: r["pass_s"])
args = [f"--precision {b['precision']}", "--cudnn-benchmark" if b["cudnn_benchmark"] else "",
        "--channels-last" if b["channels_last"] else "", "--compile" if b["compile"] else ""]
print(" ".join(a for a in args if a))
EOF
)
say "fastest switches: $BEST"

# 2. Whole fits at the validated schedule (papernet: 12 epochs x 10 inner iterations).
case_ fit-papernet-fastest --passes 1 --warmup 1 --fit --fit-epochs 12 --max-iter 10 $BEST
case_ fit-papernet-fp32    --passes 1 --warmup 1 --fit --fit-epochs 12 --max-iter 10 --precision fp32

# 3. The paper preset's whole fit (200 x 20), only when asked: minutes even on a GPU.
if [ "${FULL:-0}" = 1 ]; then
  say "== fit-paper-preset (limit ${FULL_LIMIT_S:-420} s)"
  timeout "${FULL_LIMIT_S:-420}" "$PY" "$HERE/cost.py" --preset "$PRESET" --shape $SHAPE --device "$DEVICE" \
      --passes 1 --fit $BEST 2>>"$LOG" | head -1 >> "$JSONL" || say "fit-paper-preset did not finish in the limit"
fi

# 4. End to end through the node, when the DICOM stack is installed.
if [ "${E2E:-0}" = 1 ]; then
  say "== dipnode demo --preset paper --device $DEVICE"
  t0=$SECONDS
  if "$PY" -m dipnode.node.cli demo --out "$OUT/demo" --preset paper --device "$DEVICE" >>"$LOG" 2>&1; then
    say "end to end (phantom 2 mm, push, node, fit, send back, report): $((SECONDS - t0)) s"
  else
    say "demo FAILED (see $LOG)"
  fi
fi
say "results: $JSONL"
rm -rf "$PKG"
