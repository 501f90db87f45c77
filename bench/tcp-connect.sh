#!/usr/bin/env bash
# What a new opaque TCP connection costs through two trellis proxies with mutual TLS (the
# caller's TCP bind ══mTLS══▶ the callee's proxy → an echo server), against the echo server
# reached directly: N connections one after another, each connect, one byte each way, close.
# Prints the median and p99 of a connection's time, from connect to the echoed byte.
#
# Usage: [TRELLIS_BIN=path] bench/tcp-connect.sh [N]. Loopback only; CPU 0 runs the client,
# CPU 1 the proxies and the echo server. Run it for two builds, alternated, to compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=$PWD/target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-tcp.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 200); do curl -sf -o /dev/null "$@" && return 0; sleep 0.05; done; echo "not up: $*" >&2; exit 1; }

# The echo server.
taskset -c 1 python3 -c '
import asyncio
async def echo(r, w):
    while data := await r.read(4096):
        w.write(data); await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(echo, "127.0.0.1", 18082)
    await s.serve_forever()
asyncio.run(main())' & PIDS+=($!)

taskset -c 0 "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18170 --xds 127.0.0.1:18171 2>"$W/cp.err" & PIDS+=($!)
wait_http http://127.0.0.1:18170/healthz
for _ in $(seq 100); do [ -s "$W/cp/admin.token" ] && break; sleep 0.05; done
export TRELLIS_SERVER=http://127.0.0.1:18170 TRELLIS_TOKEN
TRELLIS_TOKEN=$(cat "$W/cp/admin.token")
"$BIN" apply -f - >/dev/null <<'YAML'
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: { name: echo, namespace: bench }
spec:
  selector: { app: echo }
  ports: [{ name: tcp, port: 7, targetPort: 18082, protocol: TCP }]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: echo-1, namespace: bench, labels: { app: echo } }
spec: { address: 127.0.0.1, identity: echo, inboundPort: 18206 }
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: { name: client, namespace: bench }
spec:
  address: 127.0.0.1
  identity: client
  upstreams: [{ service: echo.bench, port: 7, bind: 127.0.0.1:18184 }]
YAML
token() { "$BIN" token create -n bench --identity "$1" --ttl 10m 2>/dev/null; }
taskset -c 1 "$BIN" proxy --xds http://127.0.0.1:18171 --workload bench/echo-1 --state-dir "$W/callee" \
  --join-token "$(token echo)" --no-access-log --admin 127.0.0.1:18200 --outbound 127.0.0.1:18201 \
  --inbound 127.0.0.1:18206 2>"$W/callee.err" & PIDS+=($!)
taskset -c 1 "$BIN" proxy --xds http://127.0.0.1:18171 --workload bench/client --state-dir "$W/caller" \
  --join-token "$(token client)" --no-access-log --admin 127.0.0.1:18300 --outbound 127.0.0.1:18301 \
  --inbound 127.0.0.1:18306 2>"$W/caller.err" & PIDS+=($!)
wait_http http://127.0.0.1:18200/ready
wait_http http://127.0.0.1:18300/ready

taskset -c 0 python3 - "$N" <<'PY'
import socket, sys, time
n = int(sys.argv[1])
def once(port):
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise SystemExit("no echo")
    took = time.perf_counter() - t
    s.close()
    return took
for name, port in (("direct", 18082), ("two mTLS proxies", 18184)):
    for _ in range(100):
        once(port)  # warm-up: sessions, pools
    ts = sorted(once(port) for _ in range(n))
    med, p99 = ts[n // 2] * 1e6, ts[int(n * 0.99)] * 1e6
    print(f"{name:>18}: {n} connections, median {med:.0f} µs, p99 {p99:.0f} µs")
PY
