#!/usr/bin/env bash
# Writes crates/cli/link-order.txt: the functions of the `trellis` binary a proxy runs, hottest
# first, for the linker to lay out next to each other (crates/cli/build.rs passes the file to
# lld in release builds).
#
# Why: a proxy runs a few MB of the binary's ~18 MB of code (the control plane, the CLI and
# the agent share the binary), scattered over all of it. The kernel maps a file's pages
# around each one touched (fault-around, 64 KiB), so a scattered few MB became ~11 MB of
# resident text; laid out together, they take their own size.
#
# How: the proxies of bench/instructions.sh run under callgrind (names kept mangled, as in
# the binary's symbol table): the mesh path (caller and callee with identities, HTTP/2 over
# mutual TLS), one plaintext hop with the access log on reporting to a control plane every
# second, the inbound side; then an agent (`trellis join`) as the mesh path's callee, and a
# caller whose /metrics is scraped. The functions of the binary the proxies ran come first,
# by the instructions each ran itself (most first), then those only the agent ran, so that a
# proxy's code stays as compact as if the agent's were not there. A function missing from
# the file (renamed since, or new) is laid out where the linker would have put it; names
# change by steps (a symbol's hash changes with its crate's metadata: a dependency added, a
# new compiler), and `check` says when to renew the file.
#
# Usage: bench/link-order.sh [REQUESTS]   (needs what bench/instructions.sh needs)
#        bench/link-order.sh check        how many of the file's functions a release build
#                                          has (the rest were renamed: time to renew it), and
#                                          whether the build laid them out in the file's order
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = check ]; then
  cargo build --release -q
  # One pass over the binary's symbols: how many of the file's names it has, and whether they
  # are laid out in the file's order, each found function after the one found before it. With
  # the order taken, ~98 % are (not all: an assembly file's functions share one section, which
  # the linker moves whole, and a few names are defined twice); without it (another linker,
  # see crates/cli/link_order.rs) about half.
  nm --defined-only target/release/trellis | awk '
    NR == FNR { if (!($3 in at)) at[$3] = $1; next }
    $1 in at { found++; a = at[$1]; if (found > 1) { pairs++; if (a >= last) up++ }; last = a }
    END { verdict = (pairs > 0 && up >= 0.9 * pairs) ? "laid out in its order" : "NOT laid out in its order"
          printf "%d of %d functions of crates/cli/link-order.txt are in target/release/trellis\n", found, FNR
          printf "%d of %d functions found follow the one before them in the file: %s\n", up, pairs, verdict }
  ' - crates/cli/link-order.txt
  exit 0
fi
N=${1:-2000}
K=$(mktemp -d /tmp/trellis-order.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  nginx -s quit -c "$K/nginx.conf" -p "$K" 2>/dev/null || true
  rm -rf "$K"
}
trap cleanup EXIT
cargo build --release -q
BIN=$(realpath target/release/trellis)
export TRELLIS_BIN=$BIN CALLGRIND=--demangle=no KEEP=$K
MTLS=1 bash bench/instructions.sh "$N" >/dev/null
ACCESS_LOG=1 REPORT=1s bash bench/instructions.sh "$N" >/dev/null && mv "$K/proxy.out" "$K/plain.out"
INBOUND=1 bash bench/instructions.sh "$N" >/dev/null && mv "$K/proxy.out" "$K/inbound.out"

# The agent (`trellis join`) of the mesh path's callee, with a health check, its telemetry
# report and a caller's requests through it; then both are scraped (the caller counts as one
# more proxy run).
up() { for _ in $(seq 600); do curl -sf -o /dev/null "$@" && return 0; sleep 0.1; done; echo "not up: $*" >&2; exit 1; }
cat >"$K/nginx.conf" <<NGX
worker_processes 1; daemon on; pid $K/nginx.pid; error_log $K/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18080; location / { return 200 "ok"; } } }
NGX
nginx -c "$K/nginx.conf" -p "$K"
"$BIN" control --data-dir "$K/cp" --api 127.0.0.1:18170 --xds 127.0.0.1:18171 2>"$K/cp.err" & PIDS+=($!)
up http://127.0.0.1:18170/healthz
for _ in $(seq 100); do [ -s "$K/cp/admin.token" ] && break; sleep 0.1; done
export TRELLIS_SERVER=http://127.0.0.1:18170 TRELLIS_TOKEN
TRELLIS_TOKEN=$(cat "$K/cp/admin.token")
# The mesh without its Workload `up-1`: the agent registers it.
python3 -c 'import sys; print("---\n".join(d for d in open(sys.argv[1]).read().split("---\n") if "name: up-1" not in d))' \
  bench/mesh-mtls.yaml | "$BIN" apply -f - >/dev/null
token() { "$BIN" token create -n bench --identity "$1" --ttl 10m 2>/dev/null; }
# `trellis ARGS...` under callgrind, into $K/NAME.out (exec: run in the background, its $! is
# valgrind's own, which a TERM then stops and which writes its file as it exits).
cg() { local out=$K/$1.out; shift; exec valgrind --tool=callgrind $CALLGRIND --callgrind-out-file="$out" "$BIN" "$@"; }
cg agent join \
  --control-plane http://127.0.0.1:18171 --state-dir "$K/agent" --token "$(token up)" --name up-1 \
  --label app=up --address 127.0.0.1 --environment vm --zone z1 --port http=18080 \
  --check http:/healthz --check-interval 1s --admin 127.0.0.1:18200 --outbound 127.0.0.1:18201 \
  --inbound 127.0.0.1:18206 >/dev/null 2>"$K/agent.err" & AGENT=$!; PIDS+=($AGENT)
cg scraped proxy \
  --xds http://127.0.0.1:18171 --workload bench/client --state-dir "$K/caller" \
  --join-token "$(token client)" --no-access-log --admin 127.0.0.1:18300 --outbound 127.0.0.1:18301 \
  --inbound 127.0.0.1:18306 >/dev/null 2>"$K/caller.err" & CALLER=$!; PIDS+=($CALLER)
up http://127.0.0.1:18200/ready
up http://127.0.0.1:18183/
h2load --h1 -n "$N" -c 8 http://127.0.0.1:18183/ >/dev/null
sleep 12 # a telemetry report (every 10 s) and more health checks
# What a scraper and an operator ask both of them for.
for a in 18200 18300; do for p in metrics config_dump ready live; do curl -s -o /dev/null "127.0.0.1:$a/$p"; done; done
kill -TERM "$AGENT" "$CALLER"; wait "$AGENT" "$CALLER" || true
# Every run's file, or the order would leave out what a missing run ran.
for f in caller callee plain inbound agent scraped; do
  [ -s "$K/$f.out" ] || { echo "no callgrind file of the $f run" >&2; exit 1; }
done
python3 - "$K" "$BIN" >crates/cli/link-order.txt <<'PY'
import os, sys

def self_costs(path, binary):
    """Instructions each function of `binary` ran itself, from a callgrind file."""
    names = {"ob": {}, "fn": {}}
    costs = {}
    ob = fn = None
    skip = False

    def name(kind, rest):
        # "(id) name" defines an id, "(id)" uses it, a bare name has none.
        rest = rest.strip()
        if rest.startswith("("):
            i = rest.index(")")
            key, val = rest[1:i], rest[i + 1 :].strip()
            if val:
                names[kind][key] = val
            return names[kind].get(key, "")
        return rest

    for line in open(path, errors="replace"):
        if line.startswith("ob="):
            ob = name("ob", line[3:])
        elif line.startswith("fn="):
            fn = (ob, name("fn", line[3:]))
        elif line.startswith(("cob=", "cfn=", "cfi=", "cfl=")):
            kind = "ob" if line.startswith("cob=") else "fn" if line.startswith("cfn=") else None
            if kind:
                name(kind, line[4:])
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if fn and len(parts) > 1 and fn[0] == binary:
                costs[fn[1]] = costs.get(fn[1], 0) + int(parts[1])
    return costs

k, binary = sys.argv[1], sys.argv[2]
def ranked(files):
    """The functions the runs in `files` ran, by the most instructions one run gave each."""
    best = {}
    for f in files:
        for fn, c in self_costs(os.path.join(k, f), binary).items():
            fn = fn.split("'")[0]  # callgrind marks a recursive call's level: f'2
            best[fn] = max(best.get(fn, 0), c)
    # Symbols only: callgrind names what it cannot place by address ("0x...").
    return [f for f in sorted(best, key=lambda f: (-best[f], f)) if not f.startswith("0x") and " " not in f]

# The proxies' functions first, then those only the agent ran: a proxy's code stays as
# compact as if the agent's were not there.
outs = sorted(f for f in os.listdir(k) if f.endswith(".out"))
proxy = ranked([f for f in outs if f != "agent.out"])
seen = set(proxy)
for fn in proxy + [f for f in ranked(["agent.out"]) if f not in seen]:
    print(fn)
PY
echo "crates/cli/link-order.txt: $(wc -l <crates/cli/link-order.txt) functions"
