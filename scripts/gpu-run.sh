#!/usr/bin/env bash
# The GPU bundle's runner (scripts/gpu-bundle.sh copies it to .gpu/run.sh): unpacks the
# bundled executables, checks the machine, runs a phase and logs to $OUT (or ./gpu-out).
# Run it from the repository root (phase 1's NCCL test reads tests/fixtures; phase 2 reads
# models/ and benches/).
#
#   run.sh 1     every GPU test (kernels, the NCCL path; the new kernels' tests again under
#                compute-sanitizer) and the kernel benchmarks
#   run.sh 2     end to end: the demo model's accuracy; the memory sizing; synthetic
#                DeepSeek-V2-Lite (bf16, all 27 layers) written once with transformers, then
#                `moe bench` on it at concurrency 1, 16, 64 and 256 (512 in, 128 out; grouped
#                experts, and reference experts at 1 and 64), tokens per joule from NVML, the
#                decode step by kernel (nsys); summary.json and summary.md
#   run.sh 3     transformers' generate() on the same checkpoint (written here if phase 2 did
#                not), and the summary with phase 2's figures beside it
#   run.sh all   all three
# Phases 2 and 3 keep their results in $MOE_GPU_RESULTS (default /tmp/moe-gpu-results) as
# well, so phase 3, run next on the same machine, puts both engines in one table.
#
# Without a usable driver or with a library missing it stops (exit 2) with the reason and
# the commands the phase would have run, in $OUT/summary.txt.
#
# Knobs (environment):
#   MOE_BIN=PATH         the moe executable (default: the bundle's)
#   MOE_GPU_DEVICE=cpu   run phase 2's commands on the CPU with tiny shapes, no driver check
#                        (the CPU test of every command: server/tests/gpu_bundle.rs)
#   MOE_GPU_CKPT=DIR     where the synthetic checkpoint goes (default /tmp/moe-gpu-v2lite;
#                        kept and reused when complete)
#   MOE_GPU_E2E=0        skip phase 2's end-to-end runs
set -uo pipefail
shopt -s nullglob
PHASE=${1:-all}
case "$PHASE" in 1|2|3|all) ;; *) echo "usage: run.sh [1|2|3|all]" >&2; exit 2 ;; esac
in_phase() { [ "$PHASE" = all ] || [ "$PHASE" = "$1" ]; }
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
DEVICE=${MOE_GPU_DEVICE:-cuda}
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }

# Unpack the xz-compressed executables (python's lzma: no xz binary needed).
WORK=${MOE_GPU_WORK:-$(mktemp -d)}
for f in $(cd "$HERE" && find bin tests benches -name '*.xz' 2>/dev/null); do
  mkdir -p "$WORK/$(dirname "$f")"
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$HERE/$f" "$WORK/${f%.xz}"
  chmod +x "$WORK/${f%.xz}"
done
MOE=${MOE_BIN:-$WORK/bin/moe}
say "moe: $MOE"

# Steps run, or (plan mode: the machine cannot run them) are listed.
MODE=run
status=0
# step NAME TIMEOUT LOG CMD...: runs CMD with a timeout, its output in $OUT/LOG; false when
# it failed or was only listed (what follows it with && is then skipped).
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  if [ "$MODE" = plan ]; then
    say "would run [$name] (timeout ${limit}s): $*"
    return 1
  fi
  say "== $name"
  if ! timeout "$limit" "$@" > "$OUT/$log" 2>&1; then
    status=1
    say "FAILED: $name (see $log)"
    tail -5 "$OUT/$log" | tee -a "$SUMMARY"
    return 1
  fi
}

if [ "$DEVICE" = cpu ]; then
  say "device cpu: phase 2's commands with tiny shapes, no driver check"
else
  libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
dirs = set()
for pat in ["/usr/local/cuda*/lib64/libcublas.so.13*", "/usr/local/cuda*/targets/*/lib/libcublas.so.13*",
            "/usr/lib/x86_64-linux-gnu/libnccl.so.2*"]:
    dirs.update(os.path.dirname(p) for p in glob.glob(pat))
try:
    import nvidia
    for root in nvidia.__path__:
        for p in glob.glob(os.path.join(root, "**", "lib*.so.1[03]*"), recursive=True):
            dirs.add(os.path.dirname(p))
        for p in glob.glob(os.path.join(root, "**", "libnccl.so.2*"), recursive=True):
            dirs.add(os.path.dirname(p))
except ImportError:
    pass
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$OUT/environment.txt"
  # Stop early, with a clear message, when the machine cannot run the bundle: no driver or
  # GPU, or a library the executables link that is not found (ldd's view, in $OUT).
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/device.csv" 2>&1; then
    say "no usable NVIDIA driver or GPU (nvidia-smi failed):"
    tee -a "$SUMMARY" < "$OUT/device.csv"
    MODE=plan
  else
    missing=0
    for exe in "$WORK"/bin/* "$WORK"/tests/* "$WORK"/benches/*; do
      ldd "$exe" >> "$OUT/ldd.txt" 2>&1
      if ldd "$exe" | grep -q "not found"; then
        say "$(basename "$exe") cannot load: $(ldd "$exe" | grep "not found" | awk '{print $1}' | tr '\n' ' ')"
        missing=1
      fi
    done
    if [ "$missing" = 1 ]; then
      say "missing libraries (see ldd.txt; LD_LIBRARY_PATH in environment.txt)"
      MODE=plan
    else
      tee -a "$SUMMARY" < "$OUT/device.csv"
    fi
  fi
  [ "$MODE" = plan ] && say "stopping; phase $PHASE would run:"
fi

# Phase 1: every GPU test binary, then the kernel benchmarks (GB/s, TFLOP/s).
if in_phase 1 && [ "$DEVICE" != cpu ]; then
  for t in "$WORK"/tests/*; do
    name=$(basename "$t")
    step "test $name" 150 "test-$name.log" "$t" --test-threads 1 &&
      grep -E "^test result|FAILED|panicked" "$OUT/test-$name.log" | tee -a "$SUMMARY"
  done
  # The kernels written without a GPU, under compute-sanitizer's memcheck (out-of-bounds and
  # misaligned accesses, launch errors): the attention row kernels, RoPE, RMSNorm, argmax.
  if [ -x "$WORK/tests/cuda" ]; then
    if command -v compute-sanitizer > /dev/null || [ "$MODE" = plan ]; then
      step "memcheck: attention, ops" 180 memcheck.log compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$WORK/tests/cuda" --test-threads 1 attention:: ops:: &&
        grep -E "^test result|ERROR SUMMARY" "$OUT/memcheck.log" | tee -a "$SUMMARY"
    else
      say "compute-sanitizer not found: memcheck skipped"
    fi
  fi
  if [ -x "$WORK/benches/cuda" ]; then
    for name in mla_decode gqa_decode dsa_decode moe_layer; do
      step "bench $name" 60 "bench-$name.log" "$WORK/benches/cuda" "$name" &&
        tee -a "$SUMMARY" < "$OUT/bench-$name.log"
    done
  fi
fi

# Phase 2.
if in_phase 2 || in_phase 3; then
  if [ "$DEVICE" = cpu ]; then
    # Tiny shapes: the committed bf16 fixture stands in for the checkpoint (the writer's
    # arguments are still checked), a two-point sweep, short requests.
    LAYERS=27 CKPT=tests/fixtures/deepseek-v2-lite-bf16 DTYPE=bf16
    IN=16 OUT_LEN=4 SWEEP="1 2" REF_SWEEP="1" HF_SWEEP=1,2 MEM_FLAGS=(--kv-cache-memory 64MiB)
  else
    LAYERS=27 CKPT=${MOE_GPU_CKPT:-/tmp/moe-gpu-v2lite} DTYPE=bf16
    IN=512 OUT_LEN=128 SWEEP="1 16 64 256" REF_SWEEP="1 64" HF_SWEEP=1,16,64 MEM_FLAGS=(--gpu-memory-utilization 0.85)
  fi
  RESULTS=${MOE_GPU_RESULTS:-/tmp/moe-gpu-results}
  [ "$MODE" = run ] && mkdir -p "$RESULTS"
  keep() { [ -f "$OUT/$1" ] && cp "$OUT/$1" "$RESULTS/"; return 0; }
  # The checkpoint both engines read, written once (reused when complete).
  checkpoint() {
    if [ "$DEVICE" = cpu ]; then
      step "checkpoint arguments" 60 checkpoint.log python3 benches/make_synthetic.py "${MOE_GPU_CKPT:-/tmp/moe-gpu-v2lite}" \
        --config models/configs/deepseek-v2-lite/config.json --layers "$LAYERS" --dtype bf16 --device cuda --check
    elif [ ! -f "$CKPT/model.safetensors.index.json" ] || [ ! -f "$CKPT/config.json" ]; then
      step "checkpoint: synthetic deepseek-v2-lite, $LAYERS layers, bf16 (transformers)" 300 checkpoint.log \
        python3 benches/make_synthetic.py "$CKPT" --config models/configs/deepseek-v2-lite/config.json \
        --layers "$LAYERS" --dtype bf16 --device cuda
    fi
  }
  # Every figure in one table: tok/s, tok/J, moe vs transformers, against the HBM roofline.
  summary() {
    step "summary" 120 summary.log python3 benches/gpu_summary.py "$OUT" --results "$RESULTS" --model "$CKPT" &&
      tee -a "$SUMMARY" < "$OUT/summary.md"
  }
fi

if in_phase 2; then
  # The trained demo model's held-out problems in bf16 (a check that does not sit on float
  # ties; the CPU's f32 answers equal transformers').
  if [ "$DEVICE" != cpu ] && [ -f models/demo/heldout.jsonl ]; then
    for form in raw chat; do
      flag=$([ "$form" = chat ] && echo --chat || true)
      [ "$MODE" = run ] && python3 models/demo/score.py prompts $flag > "$OUT/demo-prompts-$form.jsonl"
      step "demo accuracy, bf16, $form prompts" 90 "demo-$form.log" bash -c \
        '"$1" generate --model models/demo --device "$2" --dtype bf16 --prompts-file "$3" --json > "$4"' \
        _ "$MOE" "$DEVICE" "$OUT/demo-prompts-$form.jsonl" "$OUT/demo-$form.jsonl" &&
        { python3 models/demo/score.py score "$OUT/demo-$form.jsonl" $flag --min-accuracy 0.98 |
            tee -a "$SUMMARY" || status=1; }
    done
  fi
  if [ "${MOE_GPU_E2E:-1}" != 0 ]; then
    # The cache sized from free memory: the profiling forward at --max-num-batched-tokens,
    # then the blocks the rest holds (the startup log says how many).
    step "memory sizing, synthetic deepseek-v2-lite, --gpu-memory-utilization 0.9" 120 e2e-memory.log \
      "$MOE" -v bench --model synthetic:deepseek-v2-lite --num-layers "$([ "$DEVICE" = cpu ] && echo 2 || echo 27)" \
      --dtype "$([ "$DEVICE" = cpu ] && echo f32 || echo bf16)" --device "$DEVICE" \
      --gpu-memory-utilization 0.9 --max-num-batched-tokens 2048 --max-model-len 1024 --max-num-seqs 64 \
      --input-len 16 --output-len 4 --num-prompts 2 --concurrency 1 --output-json "$OUT/e2e-memory.json" &&
      grep -E "KV cache|blocks" "$OUT/e2e-memory.log" | tee -a "$SUMMARY"
    checkpoint
    # sweep BACKEND CONCURRENCY...: moe bench on the checkpoint, one run per concurrency.
    sweep() {
      local backend=$1 c n
      shift
      for c in "$@"; do
        n=$(( c < 4 ? 4 : c ))
        step "moe bench, $backend experts, concurrency $c" 150 "e2e-$backend-c$c.log" "$MOE" bench --model "$CKPT" \
          --dtype "$DTYPE" --device "$DEVICE" --expert-backend "$backend" --max-model-len 1024 --max-num-seqs 256 \
          "${MEM_FLAGS[@]}" --input-len "$IN" --output-len "$OUT_LEN" --num-prompts "$n" --concurrency "$c" \
          --output-json "$OUT/e2e-$backend-c$c.json"
        keep "e2e-$backend-c$c.json"
      done
    }
    sweep grouped $SWEEP
    sweep reference $REF_SWEEP
    # The decode step's time by kernel: a short batch-64 run under Nsight Systems, when present.
    if [ "$DEVICE" != cpu ]; then
      if command -v nsys > /dev/null || [ "$MODE" = plan ]; then
        step "kernel times, batch 64 decode (nsys)" 150 nsys.log nsys profile --force-overwrite true \
          --stats true --output "$OUT/decode-step" "$MOE" bench --model "$CKPT" --dtype "$DTYPE" --device "$DEVICE" \
          --max-model-len 1024 --max-num-seqs 64 --kv-cache-memory 8GiB --input-len 64 --output-len 32 \
          --num-prompts 64 --concurrency 64 &&
          grep -A25 "cuda_gpu_kern_sum" "$OUT/nsys.log" | tee -a "$SUMMARY"
      else
        say "nsys not found: the per-kernel breakdown is skipped"
      fi
    fi
    summary
  fi
fi

if in_phase 3; then
  checkpoint
  # transformers' generate() on the same weights (greedy, EOS ignored, prompts of the same
  # shapes); without torch (a CPU test machine) only its arguments are checked.
  hf_check=()
  if [ "$DEVICE" = cpu ] && ! python3 -c "import torch, transformers" 2>/dev/null; then
    hf_check=(--check)
  fi
  step "transformers baseline, concurrency $HF_SWEEP" 420 hf.log python3 benches/hf_baseline.py \
    --model "$CKPT" --weights checkpoint --device "$([ "$DEVICE" = cpu ] && echo cpu || echo cuda)" \
    --dtype bf16 --input-len "$IN" --output-len "$OUT_LEN" --num-prompts "$([ "$DEVICE" = cpu ] && echo 2 || echo 64)" \
    --prompts-per-run 2 --concurrency "$HF_SWEEP" --output-json "$OUT/hf.json" "${hf_check[@]}"
  keep hf.json
  summary
fi
[ "$MODE" = plan ] && exit 2
exit $status
