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
# second, and the inbound side. Every function of the binary they ran is listed, by the
# instructions it ran itself (most first). A function missing from the file (renamed since,
# or new) is laid out where the linker would have put it: the file goes stale slowly, and
# this script renews it.
#
# Usage: bench/link-order.sh [REQUESTS]   (needs what bench/instructions.sh needs)
#        bench/link-order.sh check        how many of the file's functions a release build
#                                          has (the rest were renamed: time to renew it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = check ]; then
  cargo build --release -q
  n=$(nm --defined-only target/release/trellis | awk '{print $3}' | sort -u |
    comm -12 - <(sort -u crates/cli/link-order.txt) | wc -l)
  echo "$n of $(wc -l <crates/cli/link-order.txt) functions of crates/cli/link-order.txt are in target/release/trellis"
  exit 0
fi
N=${1:-2000}
K=$(mktemp -d /tmp/trellis-order.XXXX)
trap 'rm -rf "$K"' EXIT
cargo build --release -q
export TRELLIS_BIN=target/release/trellis CALLGRIND=--demangle=no KEEP=$K
MTLS=1 bash bench/instructions.sh "$N" >/dev/null
ACCESS_LOG=1 REPORT=1s bash bench/instructions.sh "$N" >/dev/null && mv "$K/proxy.out" "$K/plain.out"
INBOUND=1 bash bench/instructions.sh "$N" >/dev/null && mv "$K/proxy.out" "$K/inbound.out"
python3 - "$K" "$(realpath target/release/trellis)" >crates/cli/link-order.txt <<'PY'
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
best = {}
for f in sorted(os.listdir(k)):
    if f.endswith(".out"):
        for fn, c in self_costs(os.path.join(k, f), binary).items():
            fn = fn.split("'")[0]  # callgrind marks a recursive call's level: f'2
            best[fn] = max(best.get(fn, 0), c)
# Symbols only: callgrind names what it cannot place by address ("0x...").
for fn in sorted(best, key=lambda f: (-best[f], f)):
    if not fn.startswith("0x") and " " not in fn:
        print(fn)
PY
echo "crates/cli/link-order.txt: $(wc -l <crates/cli/link-order.txt) functions"
