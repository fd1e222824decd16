#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 20), starting
# from its committed seeds (seeds/TARGET); a crash or a failed property
# exits non-zero and leaves the input in artifacts/TARGET/. Used by .ci/run;
# see README.md. Needs cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
# cargo-fuzz passes nightly-only flags; this lets the stable compiler take them.
export RUSTC_BOOTSTRAP=1
# No sanitizer: the code under test is safe Rust (the one C library, zstd,
# is not instrumented by rustc's sanitizers anyway), and runs are faster.
cargo fuzz build --sanitizer none
for target in $(cargo fuzz list); do
  corpus=$(mktemp -d)
  seeds=()
  if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
  cargo fuzz run --sanitizer none "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1
  rm -rf "$corpus"
done
