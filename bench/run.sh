#!/usr/bin/env bash
# Benchmark: the same upstream (nginx `return 200`) measured directly, through trellis proxy,
# through haproxy and through nginx as reverse proxies, interleaved, in one run.
# Usage: bench/run.sh [ROUNDS] [SECONDS]   (results in bench/results/, summary on stdout)
# Loopback only. CPU 0: load generator. CPU 1: upstream and the proxy under test (one
# worker each), so throughput ratios show each proxy's CPU cost per request.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client haproxy nginx-light >/dev/null; }; }
need wrk; need h2load; need haproxy; need nginx
# TRELLIS_BIN measures another build (an earlier commit, say) with this same script.
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

# The upstream (nginx), and nginx as a reverse proxy (h1 on 18082, h2c on 18092) in an
# instance of its own, so that each proxy's CPU time can be read from its own process.
cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  # The default (1000) closes h2 connections that h2load never reopens.
  keepalive_requests 10000000;
  server { listen 127.0.0.1:18080; location / { return 200 "ok"; } }
  server { listen 127.0.0.1:18090 http2; location / { return 200 "ok"; } }
}
NGX
cat >"$W/nginx-proxy.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx-proxy.pid; error_log $W/nginx-proxy.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  upstream up { server 127.0.0.1:18080; keepalive 128; }
  server { listen 127.0.0.1:18082; listen 127.0.0.1:18092 http2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGX
taskset -c 1 nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)
taskset -c 1 nginx -c "$W/nginx-proxy.conf" -p "$W" & NPID=$!; PIDS+=($NPID)
cat >"$W/haproxy.cfg" <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:18081
  bind 127.0.0.1:18091 proto h2
  default_backend b
backend b
  server s1 127.0.0.1:18080
HAP
taskset -c 1 haproxy -f "$W/haproxy.cfg" & HPID=$!; PIDS+=($HPID)
taskset -c 1 "$BIN" proxy --config bench/mesh.yaml --workload bench/client --no-access-log \
  --admin 127.0.0.1:18100 --outbound 127.0.0.1:18093 --inbound 127.0.0.1:18106 2>"$W/trellis.err" & TPID=$!; PIDS+=($TPID)
# The same proxy with its access log on (the default), written to a file as in production.
sed 's/127.0.0.1:18083/127.0.0.1:18084/' bench/mesh.yaml >"$W/mesh-log.yaml"
taskset -c 1 "$BIN" proxy --config "$W/mesh-log.yaml" --workload bench/client \
  --admin 127.0.0.1:18101 --outbound 127.0.0.1:18094 --inbound 127.0.0.1:18107 >"$W/access.log" 2>"$W/trellis-log.err" & LPID=$!; PIDS+=($LPID)
for port in 18080 18081 18082 18083 18084 18093 18094; do
  for _ in $(seq 100); do curl -sf -o /dev/null -H 'Host: up.bench' "http://127.0.0.1:$port/" && break; sleep 0.05; done
done
RSS_IDLE=$(awk '/VmRSS/{print $2}' /proc/$TPID/status)
# CPU ticks (user + system) of a proxy: its process and its children (nginx's worker).
ticks() {
  local total=0 p
  for p in $1 $(pgrep -P "$1"); do total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat))); done
  echo $total
}
declare -A PPID_OF=([trellis]=$TPID [trellis-log]=$LPID [haproxy]=$HPID [nginx]=$NPID)
HZ=$(getconf CLK_TCK)

declare -A H1=([direct]=18080 [haproxy]=18081 [nginx]=18082 [trellis]=18083 [trellis-log]=18084)
declare -A H2=([direct]=18090 [haproxy]=18091 [nginx]=18092 [trellis]=18093 [trellis-log]=18094)
OUT="$W/raw.txt"; : >"$OUT"
for r in $(seq "$ROUNDS"); do
  for t in direct trellis trellis-log haproxy nginx; do
    c0=$( [ "$t" = direct ] && echo 0 || ticks "${PPID_OF[$t]}")
    out=$(taskset -c 0 wrk -t1 -c32 -d"${SECS}s" -H 'Host: up.bench' "http://127.0.0.1:${H1[$t]}/")
    c1=$( [ "$t" = direct ] && echo 0 || ticks "${PPID_OF[$t]}")
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    n=$(echo "$out" | awk '/requests in/{print $1}')
    # Microseconds of the proxy's CPU per request at saturation.
    cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.1f", c / hz * 1e6 / n}')
    lat=$(taskset -c 0 wrk -t1 -c16 -d"${SECS}s" --latency -s bench/pace.lua -H 'Host: up.bench' "http://127.0.0.1:${H1[$t]}/" \
      | awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /^ +99.900%|^ +99.9%/{p999=$2} /Requests\/sec/{rate=$2} END{print p50, p99, rate}')
    h2=$(taskset -c 0 h2load -t1 -c32 -m10 -D"$SECS" -H 'host: up.bench' "http://127.0.0.1:${H2[$t]}/" 2>/dev/null | awk '/finished in/{print $4}' | tr -d ',')
    echo "$r $t $rps $lat $h2 $cpu" | tee -a "$OUT"
  done
done
RSS_PEAK=$(awk '/VmHWM/{print $2}' /proc/$TPID/status)
echo "access log: $(wc -l <"$W/access.log") lines written, $(curl -s 127.0.0.1:18101/metrics | awk '/^trellis_access_log_dropped_total/{print $2}') dropped"

python3 - "$OUT" "$RSS_IDLE" "$RSS_PEAK" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
by = {}
for r in rows:
    by.setdefault(r[1], []).append(r)
med = lambda xs: st.median(xs)
d_rps = med([float(r[2]) for r in by["direct"]]); d_h2 = med([float(r[6]) for r in by["direct"]])
print("| target | h1 rps (wrk -c32) | x direct | proxy CPU per h1 request | p50 / p99 @ ~2000 rps | h2c rps (h2load -c32 -m10) | x direct |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for t in ["direct", "trellis", "trellis-log", "haproxy", "nginx"]:
    rs = by[t]
    rps = med([float(r[2]) for r in rs]); h2 = med([float(r[6]) for r in rs])
    p50 = med([ms(r[3]) for r in rs]); p99 = med([ms(r[4]) for r in rs])
    cpu = "—" if t == "direct" else f"{med([float(r[7]) for r in rs]):.1f} µs"
    print(f"| {t} | {rps:,.0f} | {rps/d_rps:.2f} | {cpu} | {p50:.2f} / {p99:.2f} ms | {h2:,.0f} | {h2/d_h2:.2f} |")
print(f"\ntrellis RSS: idle {int(sys.argv[2])/1024:.1f} MiB, peak under load {int(sys.argv[3])/1024:.1f} MiB")
# The access log's cost: trellis with it on against off, round by round (interleaved).
on = {r[0]: float(r[2]) for r in by["trellis-log"]}; off = {r[0]: float(r[2]) for r in by["trellis"]}
ratios = [on[k] / off[k] for k in on if k in off]
print(f"access log on / off, h1 throughput per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {med(ratios):.3f}")
PY
