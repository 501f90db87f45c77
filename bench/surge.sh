#!/usr/bin/env bash
# The surge benchmark (issue 18): a VM pool that serves 8 requests at once in 20 ms (400 a
# second) preferred by its callers' locality, and a container pool of the same size; offered
# load stepped 0.5×, 1×, 2×, 3×, 1×, 0.5× the VM's capacity, open loop, over real proxies with
# mutual TLS on loopback; four protections in one run: none (adaptive concurrency off), a
# static limit (16), adaptive, adaptive with spill-over. Prints a table per protection:
# offered and served per second, the p99 of served requests, failures by class, and the share
# the container served; then the unloaded p99, when traffic came back to the VM, and how many
# requests waited past their 1 s timeout. About 7 minutes (release build first).
# Usage: bench/surge.sh            SURGE_ONLY=spill bench/surge.sh   (one protection)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -q -p trellis --test surge --no-run
exec cargo test --release -q -p trellis --test surge surge_benchmark -- --ignored --nocapture 2>&1 \
  | grep -v '^proxy stderr'
