#!/usr/bin/env bash
# Instructions per change of the control plane's compile at fleet size (1,000 Services,
# 11,000 Workloads: `catalog::cost`), counted by callgrind, which does not move with the
# machine's load. A round is the compile after one change, the state's copy, the old state
# dropped and one caller's scope. FULL=1: the whole compile (what any change but a Workload's
# costs); CHURN=1: a Workload without upstreams comes or goes per round (else a health record
# changes). Built without LTO, to build in two minutes.
#   bash bench/compile-cost.sh; CHURN=1 bash bench/compile-cost.sh; FULL=1 bash bench/compile-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
# Its own directory: the shipped build (fat LTO) in target/release stays as it is.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/compile-cost}
bin=$(cargo test --release -p trellis-control --lib compile_cost --no-run 2>&1 |
  sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))$/\1/p' | tail -1)
[ -x "$bin" ] || { echo "no test binary built" >&2; exit 1; }
bin=$(realpath "$bin")
count() {
  (cd crates/control && ROUNDS=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$bin" compile_cost --ignored --nocapture 2>&1) | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
# The set-up (building the mesh, the first compile) cancels out.
one=$(count 1); eleven=$(count 11)
echo "$(( (eleven - one) / 10 )) instructions per round (FULL=${FULL:-} CHURN=${CHURN:-})"
