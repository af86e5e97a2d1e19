#!/usr/bin/env bash
# Builds everything a GPU machine needs to check and time the CUDA path, on a build machine
# without a GPU, into one folder (default .gpu/, ignored by git):
#
#   bin/moe.xz                 the server/CLI built with --features cuda
#   tests/cuda.xz              every GPU test of the kernels (moe-kernels' tests/cuda/: ops, gqa,
#                              moe, dsa) in one binary
#   tests/cuda_parallel.xz     the NCCL path: fixtures as a group on cuda:0 (and 2 GPUs if present)
#   benches/cuda.xz            the kernel benchmarks (mla_decode, gqa_decode, dsa_decode,
#                              moe_layer) in one binary
#   run.sh [1|2|all]           unpacks them; phase 1 runs the tests and benchmarks, phase 2
#                              scores the demo model's held-out problems in bf16 on the GPU
#                              (from the repository root, where models/demo is) and runs the
#                              end-to-end benchmarks; logs under $OUT (or ./gpu-out)
#
# Executables are stripped and xz-compressed so the folder fits the device tool's 64 MiB carry.
#
# Usage: [PROFILE=dev] scripts/gpu-bundle.sh [DEST] (default profile: release). Needs a CUDA 13.0 toolkit: a system one, or
# `eval "$(scripts/cuda-toolkit.sh)"` first. CARGO_TARGET_DIR is honoured (keep it between runs:
# the first build compiles candle's CUDA kernels, ~20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu}
PROFILE=${PROFILE:-release}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
log() { echo "gpu-bundle: $*" >&2; }

mkdir -p "$DEST/bin" "$DEST/tests" "$DEST/benches"
# `kind name path` of every executable cargo reports in its JSON messages.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])'
}
log "building GPU tests and benchmarks ($PROFILE profile)"
cargo build --profile "$PROFILE" -p moe-kernels --features cuda --tests --benches --message-format json |
  executables | while read -r kind name exe; do
    case "$kind:$name" in
      test:cuda) cp "$exe" "$DEST/tests/$name" ;;
      bench:cuda) cp "$exe" "$DEST/benches/$name" ;;
    esac
  done
log "building the NCCL test ($PROFILE profile)"
cargo build --profile "$PROFILE" -p moe-tests --features cuda --test cuda_parallel --message-format json |
  executables | while read -r kind name exe; do
    if [ "$kind:$name" = "test:cuda_parallel" ]; then cp "$exe" "$DEST/tests/$name"; fi
  done
log "building moe ($PROFILE profile)"
cargo build --profile "$PROFILE" -p moe-server --features cuda --bin moe --message-format json |
  executables | while read -r kind name exe; do
    if [ "$kind:$name" = "bin:moe" ]; then cp "$exe" "$DEST/bin/moe"; fi
  done
BUNDLED="bin/moe tests/cuda tests/cuda_parallel benches/cuda"
for f in $BUNDLED; do
  [ -x "$DEST/$f" ] || { log "missing $DEST/$f after the build"; exit 1; }
done
# The device tool carries at most 64 MiB: strip, then xz (candle's embedded PTX compresses well).
for f in $BUNDLED; do
  strip "$DEST/$f"
  xz -T0 -6 -f "$DEST/$f"
done
du -sh "$DEST" >&2

cat > "$DEST/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled GPU tests and benchmarks; logs go to $OUT (or ./gpu-out). Finds the CUDA
# 13 user-space libraries (cuBLAS, cuRAND, NVRTC, NCCL) from a CUDA toolkit or PyTorch's
# wheels. Run it from the repository root: tests/cuda_parallel reads tests/fixtures.
set -uo pipefail
# Usage: run.sh [1|2|all]. Phase 1: the GPU tests and kernel benchmarks; phase 2: the demo
# model's accuracy and the end-to-end runs; all (default): both. Each phase fits one remote
# command (every step has a timeout). Parts of the bundle may be carried alone: what is
# absent is skipped.
shopt -s nullglob
PHASE=${1:-all}
case "$PHASE" in 1|2|all) ;; *) echo "usage: run.sh [1|2|all]" >&2; exit 2 ;; esac
in_phase() { [ "$PHASE" = all ] || [ "$PHASE" = "$1" ]; }
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
# Unpack the xz-compressed executables (python's lzma: no xz binary needed).
WORK=${MOE_GPU_WORK:-$(mktemp -d)}
for f in $(cd "$HERE" && find bin tests benches -name '*.xz' 2>/dev/null); do
  mkdir -p "$WORK/$(dirname "$f")"
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$HERE/$f" "$WORK/${f%.xz}"
  chmod +x "$WORK/${f%.xz}"
done
echo "moe: $WORK/bin/moe" | tee -a "$OUT/summary.txt"
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
# Stop early, with a clear message, when the machine cannot run the bundle: no driver or GPU,
# or a library the executables link that is not found (ldd's view, written to $OUT).
if ! nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/device.csv" 2>&1; then
  echo "no usable NVIDIA driver or GPU (nvidia-smi failed):" | tee -a "$OUT/summary.txt"
  tee -a "$OUT/summary.txt" < "$OUT/device.csv"
  exit 2
fi
missing=0
for exe in "$WORK"/bin/* "$WORK"/tests/* "$WORK"/benches/*; do
  ldd "$exe" >> "$OUT/ldd.txt" 2>&1
  if ldd "$exe" | grep -q "not found"; then
    echo "$(basename "$exe") cannot load: $(ldd "$exe" | grep "not found" | awk '{print $1}' | tr '\n' ' ')" |
      tee -a "$OUT/summary.txt"
    missing=1
  fi
done
if [ "$missing" = 1 ]; then
  echo "missing libraries (see ldd.txt; LD_LIBRARY_PATH in environment.txt): stopping" | tee -a "$OUT/summary.txt"
  exit 2
fi
cat "$OUT/device.csv" | tee -a "$OUT/summary.txt"
status=0
in_phase 1 && for t in "$WORK"/tests/*; do
  name=$(basename "$t")
  echo "== test $name" | tee -a "$OUT/summary.txt"
  timeout 150 "$t" --test-threads 1 > "$OUT/test-$name.log" 2>&1 || status=1
  grep -E "^test result|FAILED|panicked" "$OUT/test-$name.log" | tee -a "$OUT/summary.txt" ||
    tail -3 "$OUT/test-$name.log" | tee -a "$OUT/summary.txt"
done
if in_phase 1 && [ -x "$WORK/benches/cuda" ]; then
  for name in mla_decode gqa_decode dsa_decode moe_layer; do
    echo "== bench $name" | tee -a "$OUT/summary.txt"
    timeout 60 "$WORK/benches/cuda" "$name" > "$OUT/bench-$name.log" 2>&1 || status=1
    cat "$OUT/bench-$name.log" | tee -a "$OUT/summary.txt"
  done
fi
# The trained demo model's 500 held-out problems on GPU 0 in bf16, raw and through the chat
# template: a correctness check that does not sit on float ties (run from the repository root,
# where models/demo is; skipped elsewhere). The CPU's f32 answers equal transformers'.
if in_phase 2 && [ -f models/demo/heldout.jsonl ]; then
  for form in raw chat; do
    flag=$([ "$form" = chat ] && echo --chat || true)
    echo "== demo accuracy, bf16 on cuda, $form prompts" | tee -a "$OUT/summary.txt"
    python3 models/demo/score.py prompts $flag > "$OUT/demo-prompts-$form.jsonl"
    timeout 90 "$WORK/bin/moe" generate --model models/demo --device cuda --dtype bf16 \
      --prompts-file "$OUT/demo-prompts-$form.jsonl" --json > "$OUT/demo-$form.jsonl" 2> "$OUT/demo-$form.log" &&
      python3 models/demo/score.py score "$OUT/demo-$form.jsonl" $flag --min-accuracy 0.98 |
        tee -a "$OUT/summary.txt" || { status=1; tail -5 "$OUT/demo-$form.log" | tee -a "$OUT/summary.txt"; }
  done
fi
# End to end (skip with MOE_GPU_E2E=0): synthetic DeepSeek-V2-Lite in bf16 on GPU 0, decode of
# 512-token prompts to 256 tokens at batch 1 and 64, with the grouped MoE kernels and with the
# reference experts (A/B). Attention still runs as candle ops (the decode kernel is not wired in).
if in_phase 2 && [ "${MOE_GPU_E2E:-1}" != 0 ]; then
  # The cache sized from free memory (--gpu-memory-utilization, no --kv-cache-memory): the
  # profiling forward at --max-num-batched-tokens, then the blocks the rest holds.
  echo "== memory sizing, synthetic deepseek-v2-lite bf16, --gpu-memory-utilization 0.9" | tee -a "$OUT/summary.txt"
  timeout 90 "$WORK/bin/moe" -v bench --model synthetic:deepseek-v2-lite --dtype bf16 --device cuda \
    --gpu-memory-utilization 0.9 --max-num-batched-tokens 2048 --max-model-len 1024 --max-num-seqs 64 \
    --input-len 64 --output-len 8 --num-prompts 2 --concurrency 1 \
    --output-json "$OUT/e2e-memory.json" > "$OUT/e2e-memory.log" 2>&1 || status=1
  grep -E "rank [0-9]+ on|KV cache:|Error|error" "$OUT/e2e-memory.log" | tee -a "$OUT/summary.txt"
  for backend in grouped reference; do
    for c in 1 64; do
      n=$(( c == 1 ? 4 : 64 ))
      tag="$backend-c$c"
      echo "== e2e moe bench, synthetic deepseek-v2-lite bf16, --expert-backend $backend, concurrency $c" |
        tee -a "$OUT/summary.txt"
      timeout 90 "$WORK/bin/moe" bench --model synthetic:deepseek-v2-lite --dtype bf16 --device cuda \
        --expert-backend "$backend" --max-model-len 1024 --kv-cache-memory 8GiB --max-num-seqs 64 \
        --input-len 512 --output-len 256 --num-prompts "$n" --concurrency "$c" \
        --output-json "$OUT/e2e-$tag.json" > "$OUT/e2e-$tag.log" 2>&1 || status=1
      tail -25 "$OUT/e2e-$tag.log" | tee -a "$OUT/summary.txt"
    done
  done
fi
exit $status
RUN
chmod +x "$DEST/run.sh"
log "done: $DEST (run $DEST/run.sh on the GPU machine)"
