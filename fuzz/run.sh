#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 30), JOBS at a time (default 2), on a scratch copy
# of the committed corpus; fail, printing the input, when a target finds a crash or a broken
# property. `bash fuzz/run.sh 600 1 http1_request` runs one target for ten minutes and keeps
# what it learns: with KEEP=1 new inputs are merged (minimised) into fuzz/corpus; named
# inputs (seeds, faults found) are kept.
#
# Builds with cargo-fuzz (installed from crates.io when missing) on the nightly toolchain, or
# on stable with RUSTC_BOOTSTRAP=1 when there is no nightly; without a sanitizer: the crates
# under test forbid unsafe code, and a plain build is twice as fast to run and to build
# (SANITIZER=address to use ASan). docs/reliability.md has the results.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-30}
jobs=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^trellis-fuzz$')
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
sanitizer=${SANITIZER:-none}
if [ ${#targets[@]} -eq 1 ]; then
  "${fuzz[@]}" build --sanitizer "$sanitizer" "${targets[0]}"
else
  "${fuzz[@]}" build --sanitizer "$sanitizer"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run_one() {
  local t=$1 out="$work/$1"
  mkdir -p "$out/corpus" "$out/artifacts"
  cp -r "corpus/$t/." "$out/corpus/"
  if "${fuzz[@]}" run --sanitizer "$sanitizer" "$t" "$out/corpus" -- \
      -max_total_time="$secs" -artifact_prefix="$out/artifacts/" -print_final_stats=1 \
      -rss_limit_mb=1024 -max_len=65536 >"$out/log" 2>&1; then
    printf '%-16s %s\n' "$t" "$(grep -E '^stat::number_of_executed_units' "$out/log" | awk '{print $2 " runs"}') $(grep -oE 'cov: [0-9]+' "$out/log" | tail -1)"
    if [ "${KEEP:-0}" = 1 ]; then
      "${fuzz[@]}" cmin --sanitizer "$sanitizer" "$t" "$out/corpus" >/dev/null 2>&1 || true
      # Named inputs (hand-written seeds, the inputs of faults found) stay, whatever their
      # coverage: libFuzzer names its own by their SHA-1.
      for f in "corpus/$t"/*; do
        [[ $(basename "$f") =~ ^[0-9a-f]{40}$ ]] || cp "$f" "$out/corpus/"
      done
      rm -rf "corpus/$t" && cp -r "$out/corpus" "corpus/$t"
    fi
  else
    echo "$t: FAILED"
    grep -a -A4 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer" "$out/log" | head -30
    mkdir -p "artifacts/$t"
    for a in "$out"/artifacts/*; do
      [ -f "$a" ] || continue
      cp "$a" "artifacts/$t/"
      echo "input (kept in fuzz/artifacts/$t/$(basename "$a")):"; od -c "$a" | head -20
    done
    return 1
  fi
}
pids=(); failed=0
for t in "${targets[@]}"; do
  run_one "$t" & pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
exit $failed
