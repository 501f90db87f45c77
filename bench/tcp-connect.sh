#!/usr/bin/env bash
# What a new opaque TCP connection costs through two trellis proxies with mutual TLS (the
# caller's TCP bind ══mTLS══▶ the callee's proxy → an echo server), against the echo server
# reached directly: N connections one after another, each connect, one byte each way, close.
# Prints the median and p99 of a connection's time, from connect to the echoed byte.
#
# BULK=MIB also sends that many MiB each way through one connection: MiB/s, and the two
# proxies' CPU per MiB (what a stream costs per byte). HOLD=N also holds N connections open
# at once: the two proxies' RSS per open connection.
#
# Usage: [TRELLIS_BIN=path] [BULK=MIB] bench/tcp-connect.sh [N]. Loopback only; CPU 0 runs the client,
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
    while data := await r.read(65536):
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

CALLEE=${PIDS[2]} CALLER=${PIDS[3]}
taskset -c 0 python3 - "$N" "${BULK:-0}" "${HOLD:-0}" "$CALLER" "$CALLEE" <<'PY'
import os, socket, sys, threading, time
n, bulk, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pids = sys.argv[4:6]
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
def cpu():
    # user + system ticks of the two proxies
    t = 0
    for p in pids:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    return t / os.sysconf("SC_CLK_TCK")
for name, port in (("direct", 18082), ("two mTLS proxies", 18184)):
    for _ in range(100):
        once(port)  # warm-up: sessions, pools
    c0 = cpu()
    ts = sorted(once(port) for _ in range(n))
    med, p99 = ts[n // 2] * 1e6, ts[int(n * 0.99)] * 1e6
    used = "" if port == 18082 else f", the proxies' CPU {(cpu() - c0) * 1e6 / n:.0f} µs each"
    print(f"{name:>18}: {n} connections, median {med:.0f} µs, p99 {p99:.0f} µs{used}")
def rss():
    # the two proxies' resident memory, KiB
    t = 0
    for p in pids:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                t += int(line.split()[1])
    return t
if hold:
    # HOLD=N: N connections held open at once (one byte echoed on each): the proxies' memory
    # per open connection.
    r0, held = rss(), []
    for _ in range(hold):
        s = socket.create_connection(("127.0.0.1", 18184))
        s.sendall(b"h")
        if s.recv(1) != b"h":
            raise SystemExit("no echo")
        held.append(s)
    print(f"{'held':>18}: {hold} connections open, the proxies' RSS +{(rss() - r0) / 1024:.1f} MiB "
          f"({(rss() - r0) / hold:.1f} KiB each)")
    for s in held:
        s.close()
if bulk:
    # BULK=MIB: that many MiB each way through one connection, written and read at once.
    s = socket.create_connection(("127.0.0.1", 18184))
    chunk, total = b"y" * 65536, bulk << 20
    def send():
        for _ in range(total // len(chunk)):
            s.sendall(chunk)
    c0, t0 = cpu(), time.perf_counter()
    w = threading.Thread(target=send)
    w.start()
    got = 0
    while got < total:
        b = s.recv(1 << 20)
        if not b:
            raise SystemExit("closed early")
        got += len(b)
    w.join()
    took, used = time.perf_counter() - t0, cpu() - c0
    print(f"{'bulk':>18}: {bulk} MiB each way in {took:.2f} s, {2 * bulk / took:.0f} MiB/s, "
          f"the proxies' CPU {used * 1000 / (2 * bulk):.2f} ms per MiB")
PY
