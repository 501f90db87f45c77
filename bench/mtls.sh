#!/usr/bin/env bash
# mTLS benchmark: what mutual TLS between two proxies costs, against plaintext and against
# haproxy doing the same mutual TLS, to the same nginx upstream, interleaved, in one run.
#
#   direct                    wrk → nginx
#   trellis plaintext, 1 hop  wrk → trellis (standalone, the peer has no proxy) → nginx
#   haproxy plaintext, 2 hops wrk → haproxy A → haproxy B → nginx
#   trellis mTLS, 2 hops      wrk → trellis caller ══mTLS, HTTP/1.1 streams══▶ trellis callee → nginx
#   haproxy mTLS, 2 hops      wrk → haproxy A ══mTLS══▶ haproxy B → nginx
#
# and the full-handshake rate each TLS server accepts (openssl s_time -new, TLS 1.3, client
# certificate), trellis's inbound listener against haproxy B, with the same kind of
# certificate (ECDSA P-256, issued by the mesh's CA).
#
# Usage: bench/mtls.sh [ROUNDS] [SECONDS]; TRACE=1 [SHOW=N], PROFILE=1, SYSCALLS=1, SEGMENTS=1 or MOVES=1 bench/mtls.sh (below). Loopback only. CPU 0: load generator, control
# plane. CPU 1: nginx and the proxies under test (one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx-light openssl curl >/dev/null; }; }
need wrk; need haproxy; need nginx; need openssl; need curl
# TRELLIS_BIN measures another build (an earlier commit, say) with this same script.
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=$PWD/target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-mtls.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$@" && return 0; sleep 0.05; done; echo "not up: $*" >&2; exit 1; }

cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen 127.0.0.1:18080; location / { return 200 "ok"; } } }
NGX
taskset -c 1 nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)

# The control plane (CPU 0: it is idle once the proxies have their certificates).
taskset -c 0 "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18170 --xds 127.0.0.1:18171 2>"$W/cp.err" & PIDS+=($!)
wait_http http://127.0.0.1:18170/healthz
export TRELLIS_SERVER=http://127.0.0.1:18170 TRELLIS_TOKEN
for _ in $(seq 100); do [ -s "$W/cp/admin.token" ] && break; sleep 0.05; done
TRELLIS_TOKEN=$(cat "$W/cp/admin.token")
"$BIN" apply -f bench/mesh-mtls.yaml >/dev/null
token() { "$BIN" token create -n bench --identity "$1" --ttl 10m 2>/dev/null; }
# The callee's identity is `up`, the caller's `client` (the tokens name them).
# MOVES=1: the mesh proxies run with bench/memcpy-sizes.c preloaded (see below).
MOVES_ENV=()
if [ -n "${MOVES:-}" ]; then
  mkdir -p "$W/moves"
  cc -O2 -shared -fPIC -o "$W/memcpy-sizes.so" bench/memcpy-sizes.c
  MOVES_ENV=(env LD_PRELOAD="$W/memcpy-sizes.so" MEMCPY_SIZES_OUT="$W/moves")
fi
taskset -c 1 "${MOVES_ENV[@]}" "$BIN" proxy --xds http://127.0.0.1:18171 --workload bench/up-1 --state-dir "$W/callee" \
  --join-token "$(token up)" --no-access-log --admin 127.0.0.1:18200 --outbound 127.0.0.1:18201 \
  --inbound 127.0.0.1:18206 2>"$W/callee.err" & CALLEE=$!; PIDS+=($CALLEE)
taskset -c 1 "${MOVES_ENV[@]}" "$BIN" proxy --xds http://127.0.0.1:18171 --workload bench/client --state-dir "$W/caller" \
  --join-token "$(token client)" --no-access-log --admin 127.0.0.1:18300 --outbound 127.0.0.1:18301 \
  --inbound 127.0.0.1:18306 2>"$W/caller.err" & CALLER=$!; PIDS+=($CALLER)
# The one-hop plaintext proxy: the benchmarks' standalone mesh (its upstream has no proxy).
taskset -c 1 "$BIN" proxy --config bench/mesh.yaml --workload bench/client --no-access-log \
  --admin 127.0.0.1:18100 --outbound 127.0.0.1:18093 --inbound 127.0.0.1:18106 2>"$W/plain.err" & PLAIN=$!; PIDS+=($PLAIN)

# haproxy's certificates, from the same CA: key and CSR by openssl, signed with a join token.
issue() { # NAME → $W/NAME.pem (cert+key), $W/NAME.crt, $W/NAME.key; $W/bundle.pem
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$W/$1.key" \
    -out "$W/$1.csr" -subj /O=bench 2>/dev/null
  python3 - "$W" "$1" "$(token "$1")" <<'PY'
import json, sys, urllib.request
w, name, tok = sys.argv[1:]
body = json.dumps({"csr": open(f"{w}/{name}.csr").read()}).encode()
req = urllib.request.Request("http://127.0.0.1:18170/api/v1/certificates", body,
    {"authorization": f"Bearer {tok}", "content-type": "application/json"})
v = json.load(urllib.request.urlopen(req))
open(f"{w}/{name}.crt", "w").write(v["certificate"])
open(f"{w}/bundle.pem", "w").write(v["trustBundle"])
open(f"{w}/{name}.pem", "w").write(v["certificate"] + open(f"{w}/{name}.key").read())
PY
}
issue hap-a; issue hap-b
cat >"$W/hap-a.cfg" <<HAP
global
  nbthread 1
  ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend tls
  bind 127.0.0.1:18181
  default_backend tls
frontend plain
  bind 127.0.0.1:18191
  default_backend plain
backend tls
  server b 127.0.0.1:18281 ssl crt $W/hap-a.pem ca-file $W/bundle.pem verify required ssl-min-ver TLSv1.3 alpn h2
backend plain
  server b 127.0.0.1:18291
HAP
cat >"$W/hap-b.cfg" <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend tls
  bind 127.0.0.1:18281 ssl crt $W/hap-b.pem ca-file $W/bundle.pem verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1
  default_backend up
frontend plain
  bind 127.0.0.1:18291
  default_backend up
backend up
  server s1 127.0.0.1:18080
HAP
taskset -c 1 haproxy -f "$W/hap-a.cfg" 2>"$W/hap-a.err" & HAPA=$!; PIDS+=($HAPA)
taskset -c 1 haproxy -f "$W/hap-b.cfg" 2>"$W/hap-b.err" & HAPB=$!; PIDS+=($HAPB)

for port in 18080 18083 18183 18181 18191; do wait_http -H 'Host: up.bench' "http://127.0.0.1:$port/"; done
# The mTLS path really is mTLS: the callee counted the caller's identity (it counts a
# request when its body has ended, which can be just after the client has the answer).
mtls=0
for _ in $(seq 40); do
  curl -sf http://127.0.0.1:18200/metrics | grep -q 'source_identity="spiffe://trellis.local/ns/bench/sa/client"' \
    && { mtls=1; break; }
  sleep 0.05
done
[ "$mtls" = 1 ] || { echo "the caller's requests did not arrive over mutual TLS" >&2; exit 1; }

rss() { awk '/^(VmRSS|VmHWM)/{printf "%s %.1f MiB ", $1, $2/1024}' /proc/$1/status; }
IDLE_CALLER=$(rss $CALLER) IDLE_CALLEE=$(rss $CALLEE)
# User and system ticks of the given processes, summed: "USER SYS".
ticks() { local u=0 s=0 p a b; for p in "$@"; do read -r a b < <(awk '{print $14, $15}' /proc/$p/stat); u=$((u + a)); s=$((s + b)); done; echo "$u $s"; }
HZ=$(getconf CLK_TCK)
declare -A PORT=([direct]=18080 [trellis-plain-1hop]=18083 [haproxy-plain-2hops]=18191 [trellis-mtls-2hops]=18183 [haproxy-mtls-2hops]=18181)
declare -A PROCS=([direct]="" [trellis-plain-1hop]="$PLAIN" [haproxy-plain-2hops]="$HAPA $HAPB" [trellis-mtls-2hops]="$CALLER $CALLEE" [haproxy-mtls-2hops]="$HAPA $HAPB")
ORDER="direct trellis-plain-1hop haproxy-plain-2hops trellis-mtls-2hops haproxy-mtls-2hops"
OUT="$W/raw.txt"; : >"$OUT"
# Record the proxies' core (CPU 1) with `perf record ARGS…` for 3 s of the saturating load on
# path $1, then `perf script -F $2` of it into $W/$1.txt; sets RPS (wrk's rate over the run).
saturated_record() {
  local t=$1 fields=$2 load
  shift 2
  taskset -c 0 wrk -t1 -c32 -d5s -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/" >"$W/$t.wrk" &
  load=$!
  sleep 1 # let the load settle
  perf record -q -o "$W/$t.data" "$@" -C 1 -- sleep 3 2>/dev/null
  wait "$load"
  perf script -i "$W/$t.data" -F "$fields" 2>/dev/null >"$W/$t.txt"
  RPS=$(awk '/Requests\/sec/{print $2}' "$W/$t.wrk")
  echo "== $t: $RPS rps (wrk -c32)"
}
# TRACE=1: instead of the rounds, trace the proxies' core under the paced load (~2,000 rps)
# for 1 s per mesh path (system calls and context switches, `perf record`) and print where
# its bursts spend their time (bench/burst-phases.py; needs perf and root).
# PROFILE=1: instead of the rounds, sample the proxies' core (perf, cpu-clock) for 3 s of the
# saturating load on each mesh path and print where a request's CPU goes: the proxies' own
# code and libraries, the kernel on the proxies' behalf, nginx; then the proxies' top
# functions (bench/cpu-split.py; needs perf and root).
if [ -n "${PROFILE:-}" ]; then
  command -v perf >/dev/null || { echo "PROFILE=1 needs perf" >&2; exit 1; }
  for t in trellis-mtls-2hops haproxy-mtls-2hops; do
    saturated_record "$t" comm,pid,period,ip,sym,dso -e cpu-clock -F 10000
    python3 bench/cpu-split.py "$W/$t.txt" "$RPS" 3 ${PROFILE_TOP:-12} | sed 's/^/  /'
  done
  exit 0
fi
# SYSCALLS=1: instead of the rounds, count the system calls on the proxies' core for 3 s of the
# saturating load on each mesh path and print them per request, by process and call
# (bench/syscall-count.py; needs perf and root).
if [ -n "${SYSCALLS:-}" ]; then
  command -v perf >/dev/null || { echo "SYSCALLS=1 needs perf" >&2; exit 1; }
  declare -A NAMED=([trellis-mtls-2hops]="caller=$CALLER callee=$CALLEE" [haproxy-mtls-2hops]="haproxy-a=$HAPA haproxy-b=$HAPB")
  for t in trellis-mtls-2hops haproxy-mtls-2hops; do
    saturated_record "$t" comm,pid,event,trace -e raw_syscalls:sys_enter
    python3 bench/syscall-count.py "$W/$t.txt" "$RPS" 3 ${NAMED[$t]} | sed 's/^/  /'
  done
  exit 0
fi
# MOVES=1: instead of the rounds, 5 s of the saturating load on the trellis mTLS path, then
# memcpy's calls per request in each proxy by size (bench/move-sizes.py): which values the
# request path moves, and how often. The proxies are stopped to write their counts.
if [ -n "${MOVES:-}" ]; then
  t=trellis-mtls-2hops
  out=$(taskset -c 0 wrk -t1 -c32 -d5s -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/")
  n=$(awk '/requests in/{print $1}' <<<"$out")
  echo "== $t: $n requests (wrk -c32, 5 s; the few of the set-up are not counted)"
  kill "$CALLER" "$CALLEE"
  wait "$CALLER" "$CALLEE" 2>/dev/null || true
  python3 bench/move-sizes.py "$W/moves" "$n" caller="$CALLER" callee="$CALLEE" | sed 's/^/  /'
  exit 0
fi
# SEGMENTS=1: instead of the rounds, count the machine's TCP segments (all on loopback here:
# /proc/net/snmp and /proc/net/netstat, before and after 3 s of the saturating load) on each
# path and print them per request: data segments and pure ACKs, which the kernel's time per
# request follows (bench/segment-count.py).
if [ -n "${SEGMENTS:-}" ]; then
  for t in direct trellis-mtls-2hops haproxy-mtls-2hops; do
    taskset -c 0 wrk -t1 -c32 -d5s -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/" >"$W/$t.wrk" &
    LOAD=$!
    sleep 1 # let the load settle
    cat /proc/net/snmp /proc/net/netstat >"$W/$t.before"
    sleep 3
    cat /proc/net/snmp /proc/net/netstat >"$W/$t.after"
    wait "$LOAD"
    RPS=$(awk '/Requests\/sec/{print $2}' "$W/$t.wrk")
    echo "== $t: $RPS rps (wrk -c32)"
    python3 bench/segment-count.py "$W/$t.before" "$W/$t.after" "$RPS" 3 | sed 's/^/  /'
  done
  exit 0
fi
if [ -n "${TRACE:-}" ]; then
  command -v perf >/dev/null || { echo "TRACE=1 needs perf" >&2; exit 1; }
  for t in trellis-mtls-2hops haproxy-mtls-2hops; do
    read -r first second <<<"${PROCS[$t]}"
    taskset -c 0 wrk -t1 -c16 -d4s --latency -s bench/pace.lua -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/" >"$W/$t.wrk" &
    LOAD=$!
    sleep 1.5 # let the load settle
    perf record -q -o "$W/$t.data" -e raw_syscalls:sys_enter -e raw_syscalls:sys_exit \
      -e sched:sched_switch -C 1 -- sleep 1 2>/dev/null
    wait "$LOAD"
    perf script -i "$W/$t.data" -F comm,pid,cpu,time,event,trace >"$W/$t.txt" 2>/dev/null
    echo "== $t (traced; wrk: $(awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} END{print "p50", p50, "p99", p99}' "$W/$t.wrk"))"
    python3 bench/burst-phases.py "$W/$t.txt" "$first" "$second" ${SHOW:-} | sed 's/^/  /'
  done
  exit 0
fi
for r in $(seq "$ROUNDS"); do
  for t in $ORDER; do
    procs=${PROCS[$t]}
    c0=$( [ -z "$procs" ] && echo 0 0 || ticks $procs)
    out=$(taskset -c 0 wrk -t1 -c32 -d"${SECS}s" -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/")
    c1=$( [ -z "$procs" ] && echo 0 0 || ticks $procs)
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    n=$(echo "$out" | awk '/requests in/{print $1}')
    errs=$(echo "$out" | awk '/Non-2xx|Socket errors/{e=1} END{print e+0}')
    read -r u0 s0 <<<"$c0"; read -r u1 s1 <<<"$c1"
    cpu=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.1f %.1f %.1f", (u + s) / hz * 1e6 / n, u / hz * 1e6 / n, s / hz * 1e6 / n}')
    lat=$(taskset -c 0 wrk -t1 -c16 -d"${SECS}s" --latency -s bench/pace.lua -H 'Host: up.bench' "http://127.0.0.1:${PORT[$t]}/" \
      | awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} END{print p50, p99}')
    echo "$r $t $rps $lat $cpu $errs" | tee -a "$OUT" # CPU: total, user, system
  done
  for t in trellis haproxy; do
    port=$([ $t = trellis ] && echo 18206 || echo 18281)
    hs=$(taskset -c 0 openssl s_time -connect "127.0.0.1:$port" -new -time "$SECS" -cert "$W/hap-a.crt" \
      -key "$W/hap-a.key" -CAfile "$W/bundle.pem" 2>/dev/null | awk '/connections in .* real seconds/{print $1/$4; exit}' | tr -d '\n')
    echo "$r handshakes-$t ${hs:-0}" | tee -a "$OUT"
  done
done

echo "trellis caller proxy: idle (before the rounds) $IDLE_CALLER; after: $(rss $CALLER)"
echo "trellis callee proxy: idle (before the rounds) $IDLE_CALLEE; after: $(rss $CALLEE)"
python3 - "$OUT" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
by = {}
for r in rows:
    by.setdefault(r[1], []).append(r)
med = st.median
d = med([float(r[2]) for r in by["direct"]])
print("| path | h1 rps (wrk -c32) | x direct | proxies' CPU per request (user + system) | p50 / p99 @ ~2000 rps | runs with errors |")
print("| --- | --- | --- | --- | --- | --- |")
for t in ["direct", "trellis-plain-1hop", "haproxy-plain-2hops", "trellis-mtls-2hops", "haproxy-mtls-2hops"]:
    rs = by[t]
    rps = med([float(r[2]) for r in rs])
    cpu = "—" if t == "direct" else \
        f"{med([float(r[5]) for r in rs]):.1f} µs ({med([float(r[6]) for r in rs]):.1f} + {med([float(r[7]) for r in rs]):.1f})"
    p50 = med([ms(r[3]) for r in rs]); p99 = med([ms(r[4]) for r in rs])
    errs = sum(int(r[8]) for r in rs)
    print(f"| {t} | {rps:,.0f} | {rps/d:.2f} | {cpu} | {p50:.2f} / {p99:.2f} ms | {errs} |")
print()
print("| TLS server | full mTLS handshakes per second (openssl s_time -new, one client) |")
print("| --- | --- |")
for t in ["trellis", "haproxy"]:
    print(f"| {t} | {med([float(r[2]) for r in by['handshakes-' + t]]):,.0f} |")
PY
