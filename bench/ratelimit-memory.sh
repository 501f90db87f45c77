#!/usr/bin/env bash
# The rate limiter's memory with 100,000 distinct callers: a proxy's inbound side in front
# of nginx, with bench/mesh-ratelimit.yaml (a RateLimitPolicy with a per-caller limit: one
# bucket set per caller) or bench/mesh.yaml (none), and 2 × 100,000 requests, each from its
# own source address (127.1.0.0 up: unmeshed callers are keyed by address). Prints the
# proxy's resident memory (VmRSS) after start, after the first 100,000 callers and after
# 100,000 more, for both meshes: the difference is the limiter's (it keeps at most 10,000
# callers). Loopback only; needs nginx and python3. About two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
cargo build --release -q
BIN=$PWD/target/release/trellis
W=$(mktemp -d /tmp/trellis-rlmem.XXXX)
P=
cleanup() { nginx -s quit -c "$W/nginx.conf" -p "$W" 2>/dev/null || true; [ -z "$P" ] || kill "$P" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon on; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18080; location / { return 200 "ok"; } } }
NGX
nginx -c "$W/nginx.conf" -p "$W"
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
callers() { # $1: first caller index; 100,000 requests, each from its own address
  python3 - "$1" <<'PY'
import socket, sys
first = int(sys.argv[1])
for i in range(first, first + 100_000):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((f"127.{1 + i // 65536}.{i // 256 % 256}.{i % 256}", 0))
    s.connect(("127.0.0.1", 18106))
    s.sendall(b"GET / HTTP/1.1\r\nhost: up.bench\r\nconnection: close\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
PY
}
for mesh in bench/mesh.yaml bench/mesh-ratelimit.yaml; do
  "$BIN" proxy --config "$mesh" --workload bench/up-1 --no-access-log --admin 127.0.0.1:18100 \
    --outbound 127.0.0.1:18093 --inbound 127.0.0.1:18106 >/dev/null 2>"$W/proxy.err" &
  P=$!
  for _ in $(seq 300); do curl -sf -o /dev/null 127.0.0.1:18100/ready && break; sleep 0.1; done
  a=$(rss $P); callers 0; b=$(rss $P); callers 100000; c=$(rss $P)
  echo "$mesh: VmRSS $a kB at start, $b kB after 100,000 callers, $c kB after 200,000"
  kill "$P"; wait "$P" || true; P=
done
