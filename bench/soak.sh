#!/usr/bin/env bash
# Soak: steady load through two proxies with mutual TLS for MINUTES (default 30), an
# operation every EVERY seconds (default 180) in turn: a callee's proxy drained and
# restarted, a push storm of 50 applies, the route's weights moved, the control plane
# SIGKILLed and restarted, the other callee's proxy upgraded in place (a new process takes
# its listeners over `--handoff`) (`b` reaches both callees; the route splitting it between them
# lives only through its own operation: a split's backend of one endpoint cannot survive
# that endpoint's restart). Each period's requests, failures (non-2xx and socket errors, by
# wrk), and every process's RSS and open file descriptors are printed as a table row, so
# that memory or descriptor growth and failed requests show period by period.
#
#   wrk (4 connections, paced: ~500 requests/s) → trellis caller ══mTLS══▶ callee proxies
#   peer-vm and peer-ct (labelled vm and container) → nginx
#
# Usage: bench/soak.sh [MINUTES] [EVERY]. Loopback only; not part of CI (results in
# docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
EVERY=${2:-180}
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light curl >/dev/null; }; }
need wrk; need nginx; need curl
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=$PWD/target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-soak.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}" ${VM:-} ${CP:-}; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 400); do curl -sf -o /dev/null "$@" && return 0; sleep 0.05; done; echo "not up: $*" >&2; exit 1; }

cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen 127.0.0.1:18480; location / { return 200 "vm"; } }
  server { listen 127.0.0.1:18481; location / { return 200 "ct"; } } }
NGX
nginx -c "$W/nginx.conf" -p "$W" & PIDS+=($!)

start_cp() {
  "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18470 --xds 127.0.0.1:18471 2>>"$W/cp.err" & CP=$!
  wait_http http://127.0.0.1:18470/healthz
}
start_cp
export TRELLIS_SERVER=http://127.0.0.1:18470 TRELLIS_TOKEN
for _ in $(seq 100); do [ -s "$W/cp/admin.token" ] && break; sleep 0.05; done
TRELLIS_TOKEN=$(cat "$W/cp/admin.token")
mesh() { # b reaches both callees as one cluster; b-vm and b-ct one each
  cat <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: b, namespace: soak }
spec: { selector: { app: b }, ports: [{ name: web, port: 80, targetPort: 1, protocol: HTTP }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: b-vm, namespace: soak }
spec: { selector: { app: b, version: vm }, ports: [{ name: web, port: 80, targetPort: 1, protocol: HTTP }] }
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: b-ct, namespace: soak }
spec: { selector: { app: b, version: ct }, ports: [{ name: web, port: 80, targetPort: 1, protocol: HTTP }] }

---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: peer-vm, namespace: soak, labels: { app: b, version: vm } }
spec: { address: 127.0.0.1, identity: beta, inboundPort: 18506, environment: vm, ports: { web: 18480 } }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: peer-ct, namespace: soak, labels: { app: b, version: ct } }
spec: { address: 127.0.0.1, identity: beta, inboundPort: 18606, environment: container, ports: { web: 18481 } }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: client, namespace: soak }
spec:
  address: 127.0.0.1
  identity: client
  environment: bare-metal
  upstreams: [{ service: b.soak, port: 80, bind: 127.0.0.1:18483 }]
YAML
}
split() { # the weights of b-vm and b-ct for b
  "$BIN" apply -f - >/dev/null <<YAML
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: b, namespace: soak }
spec:
  parentRefs: [{ kind: Service, name: b, port: 80 }]
  rules: [{ backendRefs: [{ name: b-vm, port: 80, weight: $1 }, { name: b-ct, port: 80, weight: $2 }] }]
YAML
}
noise() {
  "$BIN" apply -f - >/dev/null <<YAML
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: noise-$1, namespace: soak }
spec: { selector: { app: noise }, ports: [{ port: 80 }] }
YAML
}
mesh | "$BIN" apply -f - >/dev/null
token() { "$BIN" token create -n soak --identity "$1" --ttl 10m --uses "${2:-1}" 2>/dev/null; }
BETA=$(token beta 2)
proxy() { # NAME WORKLOAD PORT-BASE [TOKEN]
  "$BIN" proxy --xds http://127.0.0.1:18471 --workload "soak/$2" --state-dir "$W/$1" \
    ${4:+--join-token "$4"} --no-access-log --handoff "$W/$1.sock" --admin "127.0.0.1:$3" \
    --outbound "127.0.0.1:$(( $3 + 1 ))" --inbound "127.0.0.1:$(( $3 + 6 ))" 2>>"$W/$1.err" &
}
proxy vm peer-vm 18500 "$BETA"; VM=$!
proxy ct peer-ct 18600 "$BETA"; CT=$!; PIDS+=($CT)
proxy client client 18300 "$(token client)"; CALLER=$!; PIDS+=($CALLER)
wait_http http://127.0.0.1:18483/

# The caller's failed requests by class so far (from its /metrics), for the periods that fail.
classes() {
  curl -s http://127.0.0.1:18300/metrics | awk '/^trellis_http_requests_total/ && !/failure_class="ok"/ {
    split($0, a, "failure_class=\""); split(a[2], b, "\""); n[b[1]] += $NF }
    END { s = ""; for (k in n) s = s k " " n[k] " "; print (s == "" ? "-" : s) }'
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
cat >"$W/pace.lua" <<'LUA'
function delay() return 8 end
LUA
op() { # sets WHAT; runs in this shell, as it restarts processes
  case $(( $1 % 5 )) in
    0) WHAT="callee proxy drained + restarted"
       kill -TERM "$VM"; wait "$VM" 2>/dev/null || true
       proxy vm peer-vm 18500; VM=$!
       wait_http http://127.0.0.1:18500/ready ;;
    1) WHAT="push storm: 50 applies"
       for i in $(seq 50); do noise $(( i % 10 )); done ;;
    2) WHAT="route weights moved: 100/0, 0/100, 50/50, route deleted"
       split 100 0; sleep 2; split 0 100; sleep 2; split 50 50; sleep 2
       "$BIN" delete httproute b -n soak >/dev/null ;;
    3) WHAT="control plane SIGKILL + restart"
       kill -KILL "$CP"; wait "$CP" 2>/dev/null || true; sleep 2; start_cp ;;
    4) WHAT="callee proxy upgraded in place (handoff)"
       old=$CT; proxy ct peer-ct 18600; CT=$!; PIDS+=($CT)
       wait "$old" 2>/dev/null || true ;; # it exits once the new one has its config
  esac
}

printf '| minute | operation in the period | requests | failed | caller RSS KiB / fds | peer-vm | peer-ct | control plane | caller failures so far |\n'
printf '| ---: | --- | ---: | ---: | --- | --- | --- | --- | --- |\n'
periods=$(( MINUTES * 60 / EVERY )); [ "$periods" -ge 1 ] || periods=1
began=$SECONDS
for n in $(seq 0 $(( periods - 1 ))); do
  wrk -t1 -c4 -d"${EVERY}s" -s "$W/pace.lua" http://127.0.0.1:18483/ >"$W/wrk.$n" 2>&1 &
  WRK=$!
  WHAT="steady"
  if [ "$n" -gt 0 ]; then sleep $(( EVERY / 3 )); op $(( n - 1 )); fi
  wait "$WRK"
  reqs=$(awk '/requests in/ {print $1}' "$W/wrk.$n")
  # "  Non-2xx or 3xx responses: N", "  Socket errors: connect A, read B, write C, timeout D"
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$W/wrk.$n"); non2xx=${non2xx:-0}
  sock=$(awk -F'[ ,]+' '/Socket errors/ {print $5+$7+$9+$11}' "$W/wrk.$n"); sock=${sock:-0}
  printf '| %d | %s | %s | %d | %s / %s | %s / %s | %s / %s | %s / %s | %s |\n' \
    $(( (SECONDS - began) / 60 )) "$WHAT" "$reqs" $(( non2xx + sock )) \
    "$(rss $CALLER)" "$(fds $CALLER)" "$(rss $VM)" "$(fds $VM)" "$(rss $CT)" "$(fds $CT)" "$(rss $CP)" "$(fds $CP)" "$(classes)"
  grep -E "Socket errors|Non-2xx" "$W/wrk.$n" | sed 's/^ */  wrk: /' >&2 || true
done
