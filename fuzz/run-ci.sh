#!/usr/bin/env bash
# Bounded fuzzing for CI: builds every cargo-fuzz target and runs each for FUZZ_SECONDS
# (default 15) on a scratch copy of its committed seed corpus (fuzz/corpus/<target>), failing
# on any crash, panic, overflow, timeout or out-of-memory. Crashing inputs are kept in
# fuzz/artifacts/<target>/. Needs only a stable Rust toolchain: cargo-fuzz's nightly flags are
# enabled with RUSTC_BOOTSTRAP=1. Long runs: see "Fuzzing" in the main README.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
# AddressSanitizer by default; FUZZ_SANITIZER=none if a toolchain cannot link it.
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# cargo fuzz has no --locked: check that the committed Cargo.lock is complete first.
cargo fetch --locked --quiet

# -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash.
flags=(--debug-assertions --sanitizer "$FUZZ_SANITIZER")
start=$(date +%s)
echo "== cargo fuzz build (sanitizer: $FUZZ_SANITIZER)"
cargo fuzz build "${flags[@]}"
echo "== build took $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    echo "== $target: ${FUZZ_SECONDS} s"
    mkdir -p "$scratch/$target"
    # New inputs go to the scratch directory (the first one); the seeds stay as committed.
    cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"$scratch/$target.log" || {
        tail -n 60 "$scratch/$target.log"
        echo "== $target FAILED; the input that crashed is in fuzz/artifacts/$target/" >&2
        exit 1
    }
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log")
    cov=$(grep -o 'cov: [0-9]*' "$scratch/$target.log" | tail -n 1)
    corp=$(grep -o 'corp: [0-9]*' "$scratch/$target.log" | tail -n 1)
    echo "   $runs executions ($((runs / FUZZ_SECONDS))/s), $cov, $corp inputs"
done
echo "== fuzzing done in $(($(date +%s) - start)) s, no crashes"
