#!/usr/bin/env bash
# Capture benchmark: what transparent capture costs, against explicit mode through the same
# two proxies and against the direct path, between two network namespaces on a private
# bridge (root; nothing leaves the machine). Interleaved, in one run:
#
#   direct      wrk (root ns) → nginx :8081 in the server namespace (no proxy)
#   explicit    wrk → 127.0.0.1:15001, Host: catalog.bench → client proxy ══mTLS══▶ server proxy → nginx :8080
#   captured    wrk → http://catalog.bench.mesh/ (the agent's DNS → virtual IP, iptables REDIRECT,
#               SO_ORIGINAL_DST) → the same two proxies → nginx :8080
#
# each with kept-alive connections (wrk -c32) and with a new connection per request
# (`Connection: close`), where capture's per-connection work (NAT, SO_ORIGINAL_DST) shows.
#
# Usage: bench/capture.sh [ROUNDS] [SECONDS]. CPU 0: wrk and the control plane; CPU 1: nginx
# and both agents (each one proxy thread).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
[ "$(id -u)" = 0 ] || { echo "bench/capture.sh: needs root (network namespaces, iptables)" >&2; exit 1; }
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light iptables iproute2 curl >/dev/null; }; }
need wrk; need nginx; need iptables; need curl
# TRELLIS_BIN measures another build (an earlier commit, say) with this same script.
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=$PWD/target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-capture.XXXX)
NET=10.79.77
BR=trcapbr0
C=trcap-client
S=trcap-server
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in $C $S; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
    rm -rf /etc/netns/$ns
  done
  ip link del trcapv2 2>/dev/null || true
  ip link del trcapv3 2>/dev/null || true
  ip link del $BR 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
cleanup_start() { trap - EXIT; cleanup; trap cleanup EXIT; W=$(mktemp -d /tmp/trellis-capture.XXXX); }
cleanup_start

ip link add $BR type bridge && ip addr add $NET.1/24 dev $BR && ip link set $BR up
for n in 2 3; do
  ns=$([ $n = 2 ] && echo $C || echo $S)
  ip netns add $ns
  ip link add trcapv$n type veth peer name eth0 netns $ns
  ip link set trcapv$n master $BR up
  ip -n $ns addr add $NET.$n/24 dev eth0
  ip -n $ns link set lo up && ip -n $ns link set eth0 up
  ip -n $ns route add 10.96.0.0/16 dev eth0
  mkdir -p /etc/netns/$ns && echo "nameserver $NET.1" > /etc/netns/$ns/resolv.conf
done

cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen 8080; listen 8081; location / { return 200 "ok"; } } }
NGX
ip netns exec $S taskset -c 1 nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)

taskset -c 0 "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18470 --xds $NET.1:18471 2>"$W/cp.err" & PIDS+=($!)
for _ in $(seq 200); do grep -q '"ca_hash"' "$W/cp.err" 2>/dev/null && break; sleep 0.05; done
HASH=$(grep -o '"ca_hash":"[^"]*"' "$W/cp.err" | head -1 | cut -d'"' -f4)
export TRELLIS_SERVER=http://127.0.0.1:18470
TRELLIS_TOKEN=$(cat "$W/cp/admin.token"); export TRELLIS_TOKEN
cat <<'YAML' | "$BIN" apply -f - >/dev/null
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: catalog, namespace: bench }
spec:
  selector: { app: catalog }
  ports: [{ name: http, port: 80, targetPort: 8080, protocol: HTTP }]
YAML
token() { "$BIN" token create -n bench --identity "$1" --ttl 10m 2>/dev/null | head -1; }
join() { # NS NAME IDENTITY ADDRESS ARGS…
  local ns=$1 name=$2 id=$3 addr=$4; shift 4
  # exec: the background job's pid is the agent's own, for its CPU ticks.
  exec ip netns exec "$ns" taskset -c 1 "$BIN" join --control-plane "https://$NET.1:18471" --ca-hash "$HASH" \
    --token "$(token "$id")" --state-dir "$W/$name" --name "$name" --label "app=$id" --address "$addr" \
    --capture --no-access-log "$@" 2>"$W/$name.err"
}
join $S catalog-1 catalog $NET.3 --port http=8080 --check tcp & SERVER=$!; PIDS+=($SERVER)
join $C client-1 client $NET.2 --check none & CLIENT=$!; PIDS+=($CLIENT)
for _ in $(seq 300); do
  [ "$(ip netns exec $C curl -s --max-time 2 http://catalog.bench.mesh/ 2>/dev/null)" = ok ] && break
  sleep 0.1
done
[ "$(ip netns exec $C curl -s --max-time 2 http://catalog.bench.mesh/)" = ok ] || { echo "the captured path does not answer" >&2; tail "$W"/*.err >&2; exit 1; }
# The captured path really goes proxy to proxy by mutual TLS: the server counted the caller.
ip netns exec $S curl -sf http://127.0.0.1:15000/metrics | grep -q 'source_identity="spiffe://trellis.local/ns/bench/sa/client"' \
  || { echo "no mutual TLS between the proxies" >&2; exit 1; }

ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $t; }
HZ=$(getconf CLK_TCK)
run() { # NAME → one wrk line
  local name=$1 close=() url where=()
  case $name in *-close) close=(-H 'Connection: close') ;; esac
  case $name in
    direct*) url="http://$NET.3:8081/" ;;
    explicit*) url="http://127.0.0.1:15001/"; where=(ip netns exec $C); close+=(-H 'Host: catalog.bench') ;;
    captured*) url="http://catalog.bench.mesh/"; where=(ip netns exec $C) ;;
  esac
  "${where[@]}" taskset -c 0 wrk -t1 -c32 -d"${SECS}s" "${close[@]}" "$url"
}
ORDER="direct explicit captured direct-close explicit-close captured-close"
OUT="$W/raw.txt"; : >"$OUT"
for r in $(seq "$ROUNDS"); do
  for t in $ORDER; do
    c0=$(ticks $SERVER $CLIENT)
    out=$(run $t)
    c1=$(ticks $SERVER $CLIENT)
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    n=$(echo "$out" | awk '/requests in/{print $1}')
    errs=$(echo "$out" | awk '/Non-2xx|Socket errors/{e=1} END{print e+0}')
    cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.1f", c / hz * 1e6 / n}')
    echo "$r $t $rps $cpu $errs" | tee -a "$OUT"
  done
done

python3 - "$OUT" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[1], []).append(r)
med = st.median
print("| path | rps (wrk -c32) | x direct | agents' CPU per request | runs with errors |")
print("| --- | --- | --- | --- | --- |")
for kind in ["", "-close"]:
    d = med([float(r[2]) for r in by["direct" + kind]])
    for t in ["direct", "explicit", "captured"]:
        rs = by[t + kind]
        rps = med([float(r[2]) for r in rs])
        cpu = "—" if t == "direct" else f"{med([float(r[3]) for r in rs]):.1f} µs"
        errs = sum(int(r[4]) for r in rs)
        print(f"| {t}{kind} | {rps:,.0f} | {rps/d:.2f} | {cpu} | {errs} |")
PY
