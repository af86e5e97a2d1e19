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
#   run.sh [1|2|all]           scripts/gpu-run.sh: unpacks them; phase 1 runs the tests and
#                              benchmarks, phase 2 the demo model's accuracy and the end-to-end
#                              runs against transformers on the same checkpoint (from the
#                              repository root); logs and summary.{json,md} under $OUT
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

cp scripts/gpu-run.sh "$DEST/run.sh"
chmod +x "$DEST/run.sh"
log "done: $DEST (run $DEST/run.sh on the GPU machine)"
