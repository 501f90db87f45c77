#!/usr/bin/env bash
# User-space instructions per proxied HTTP/1.1 request, counted by callgrind: repeatable to
# about 0.5% whatever else the machine does, unlike wall-clock throughput.
# Usage: bench/instructions.sh [REQUESTS]   (needs valgrind, nginx, h2load; loopback only)
# ACCESS_LOG=1 counts with the access log on (lines to /dev/null; the writer thread's
# instructions included).
# REPORT=DURATION takes the config from a real control plane (started here, not measured)
# and reports to it every DURATION (`0s`: config from it, no telemetry): REPORT=0s and
# REPORT=1s side by side give the cost of fleet telemetry per request.
# EXTRA="ARGS" adds proxy flags (say, EXTRA="--otlp-endpoint http://127.0.0.1:1
# --trace-sampling 100" for the cost of building every request's spans).
# INBOUND=1 measures the inbound side instead: the proxy of bench/up-1 in front of nginx,
# requests sent to its inbound listener (plaintext: a file config has no identity); the
# adaptive concurrency limit is on this path.
# MTLS=1 measures the mesh path of bench/mtls.sh instead: two proxies with identities from a
# real control plane (not measured), HTTP/1.1 on streams of one mutual-TLS connection between
# them (HTTP/2 for gRPC services); both run under callgrind and the figure is the two together
# (caller and callee printed apart too). It moves by about 2% between runs (how many frames
# one read or write carries depends on timing): take the median of three, or set CONNS=1
# (one client connection, so one request a frame and a TLS write: steady to ~0.1%, and
# higher than the batched figure by the per-write cost) to judge a small step. KEEP=DIR keeps the callgrind file(s) of the measured run
# (caller.out and callee.out; proxy.out without MTLS).
# H2C=1 sends the requests as HTTP/2 without TLS (h2c, prior knowledge) instead of
# HTTP/1.1: hyper's server on the client side (not with MTLS). H2LOAD="FLAGS" adds h2load
# flags: "-m 10" for ten requests at a time per h2c connection, "-H x-trellis-peer:V" for a
# peer proxy's header (with INBOUND=1: the callee's noting of it).
# CALLGRIND="FLAGS" adds callgrind flags (bench/link-order.sh passes --demangle=no).
# BREAKDOWN=1 also prints where each proxy's instructions per request go, by the source
# file each instruction came from (inlined code counts where it was written): HPACK, the
# rest of h2, hyper, http (header maps, URIs), bytes, tokio, TLS (rustls, ring), libc's
# copies, its allocator, the proxy's own crates, and the rest; start-up subtracted as for
# the totals. It does not move with the machine either, and says which part a step moved.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4000}
LOG=--no-access-log
[ "${ACCESS_LOG:-0}" = 1 ] && LOG=
for t in valgrind nginx h2load; do
  command -v "$t" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind nginx-light nghttp2-client >/dev/null; }
done
# TRELLIS_BIN measures another build (an earlier commit, say) with this same script.
if [ -n "${TRELLIS_BIN:-}" ]; then BIN=$(realpath "$TRELLIS_BIN"); else cargo build --release -q; BIN=$PWD/target/release/trellis; fi
W=$(mktemp -d /tmp/trellis-ir.XXXX)
VP=
cleanup() { nginx -s quit -c "$W/nginx.conf" -p "$W" 2>/dev/null || true; [ -z "$VP" ] || kill "$VP" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
cat >"$W/nginx.conf" <<NGX
worker_processes 1; daemon on; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 10000000;
  server { listen 127.0.0.1:18080; location / { return 200 "ok"; } } }
NGX
nginx -c "$W/nginx.conf" -p "$W"
# MESH=FILE uses another mesh (bench/mesh-ratelimit.yaml adds a RateLimitPolicy that never
# refuses, for the cost of checking it).
MESH=${MESH:-bench/mesh.yaml}
SRC=(--config "$MESH")
if [ -n "${REPORT:-}" ]; then
  "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18170 --xds 127.0.0.1:18171 >/dev/null 2>"$W/cp.err" &
  CP=$!
  trap 'kill $CP 2>/dev/null || true; cleanup' EXIT
  for _ in $(seq 100); do [ -s "$W/cp/admin.token" ] && curl -sf -o /dev/null 127.0.0.1:18170/healthz && break; sleep 0.1; done
  "$BIN" apply -f "$MESH" --server http://127.0.0.1:18170 --token "$(cat "$W/cp/admin.token")" >/dev/null
  SRC=(--xds http://127.0.0.1:18171 --report-interval "$REPORT")
fi
# Total instructions of a proxy run that serves $1 requests.
WL=bench/client URL=http://127.0.0.1:18083/
[ "${INBOUND:-0}" = 1 ] && WL=bench/up-1 URL=http://127.0.0.1:18106/
# Instructions counted in a callgrind file.
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}'; }
# Instructions of a callgrind file by part (see BREAKDOWN above): "part count" lines. A line
# of the standard library's source counts for the function it was inlined into.
PARTS="hpack h2 hyper http bytes tokio tls memcpy alloc own other"
parts() {
  callgrind_annotate --auto=no --threshold=100 "$1" 2>/dev/null | awk -v parts="$PARTS" '
    /file:function/ { listed = 1; next }
    !listed || !/^ *[0-9,]+ / { next }
    {
      n = $1; gsub(",", "", n)
      f = $0; sub(/^ *[0-9,]+ +\([ 0-9.]+%\) +/, "", f)
      file = f; sub(/:.*/, "", file); fn = substr(f, length(file) + 2)
      s = (file ~ /^\/rust(c)?\//) ? fn : file
      if (s ~ /\/h2-[0-9.]+\/src\/hpack\/|(^|[<( &])h2::hpack::/) p = "hpack"
      else if (s ~ /\/h2-[0-9.]+\/|(^|[<( &])h2::/) p = "h2"
      else if (s ~ /\/hyper(-util)?-[0-9.]+\/|(^|[<( &])hyper(_util)?::/) p = "hyper"
      else if (s ~ /\/http-[0-9.]+\/|(^|[<( &])http::/) p = "http"
      else if (s ~ /\/bytes-[0-9.]+\/|(^|[<( &])bytes::/) p = "bytes"
      else if (s ~ /\/tokio-[0-9.]+\/|(^|[<( &])tokio::/) p = "tokio"
      else if (s ~ /\/(rustls|ring)-[0-9.]+\/|(^|[<( &])(rustls|ring)::/) p = "tls"
      else if (file ~ /\/string\//) p = "memcpy"
      else if (file ~ /\/malloc\/|\/sys\/alloc\// || fn ~ /^__rust_(alloc|dealloc|realloc)/) p = "alloc"
      else if ((file !~ /registry/ && file ~ /crates\/[a-z0-9_-]+\/src\//) || s ~ /(^|[<( &])trellis_/) p = "own"
      else p = "other"
      sum[p] += n
    }
    END { k = split(parts, ps, " "); for (i = 1; i <= k; i++) print ps[i], sum[ps[i]] + 0 }'
}
# "part per-request" pairs for the N-request file $1 less the no-request file $2.
breakdown() {
  join <(parts "$1" | sort) <(parts "$2" | sort) |
    awk -v n="$N" -v parts="$PARTS" '{ d[$1] = ($2 - $3) / n } END {
      k = split(parts, ps, " ")
      for (i = 1; i <= k; i++) printf "%s %.1fk%s", ps[i], d[ps[i]] / 1000, (i < k ? ", " : "\n") }'
}
run() {
  valgrind --tool=callgrind ${CALLGRIND:-} --callgrind-out-file="$W/cg.out" "$BIN" proxy "${SRC[@]}" ${EXTRA:-} \
    --workload "$WL" $LOG --admin 127.0.0.1:18100 --outbound 127.0.0.1:18093 \
    --inbound 127.0.0.1:18106 >/dev/null 2>&1 &
  VP=$!
  for _ in $(seq 300); do curl -sf -o /dev/null 127.0.0.1:18100/ready && break; sleep 0.1; done
  P=--h1
  [ "${H2C:-0}" = 1 ] && P=
  [ "$1" -gt 0 ] && h2load $P ${H2LOAD:-} -n "$1" -c 8 "$URL" >/dev/null
  kill -TERM "$VP"; wait "$VP" || true; VP=
  [ -z "${KEEP:-}" ] || [ "$1" = 0 ] || cp "$W/cg.out" "$KEEP/proxy.out"
  cp "$W/cg.out" "$W/proxy-$1.out"
  total "$W/cg.out"
}
# The mesh path: caller and callee under callgrind, each with a fresh identity. Both runs
# begin with the same warm-up ($WARM requests from 8 connections, 800 unless set), which opens
# the connection between the proxies (and its handshake) and the caller's pooled streams, so
# that the subtraction leaves the measured requests alone.
run_mtls() {
  local run=$W/run$1 pids=() p
  mkdir -p "$run"
  for p in callee caller; do
    local wl=bench/up-1 id=up admin=18200 in=18206 out=18201
    [ $p = caller ] && wl=bench/client id=client admin=18300 in=18306 out=18301
    local tok
    tok=$("$BIN" token create -n bench --identity $id --ttl 10m --server http://127.0.0.1:18170 \
      --token "$(cat "$W/cp/admin.token")" 2>/dev/null)
    valgrind --tool=callgrind ${CALLGRIND:-} --callgrind-out-file="$run/$p.out" "$BIN" proxy \
      --xds http://127.0.0.1:18171 --workload $wl --state-dir "$run/$p" --join-token "$tok" \
      $LOG ${EXTRA:-} --admin 127.0.0.1:$admin --outbound 127.0.0.1:$out --inbound 127.0.0.1:$in \
      >/dev/null 2>"$run/$p.err" &
    pids+=($!)
    for _ in $(seq 600); do curl -sf -o /dev/null 127.0.0.1:$admin/ready && break; sleep 0.1; done
  done
  for _ in $(seq 600); do curl -sf -o /dev/null http://127.0.0.1:18183/ && break; sleep 0.1; done
  local n=$(( $1 + ${WARM:-800} ))
  h2load --h1 -n "$n" -c "${CONNS:-8}" http://127.0.0.1:18183/ >"$run/h2load.txt"
  # Every request answered 200 through both proxies, or the figure means nothing.
  grep -q "status codes: $n 2xx" "$run/h2load.txt" || { cat "$run/h2load.txt" >&2; exit 1; }
  for p in "${pids[@]}"; do kill -TERM "$p"; wait "$p" || true; done
  [ -z "${KEEP:-}" ] || [ "$1" = 0 ] || cp "$run/caller.out" "$run/callee.out" "$KEEP/"
  cp "$run/caller.out" "$W/caller-$1.out"; cp "$run/callee.out" "$W/callee-$1.out"
  echo "$(total "$run/caller.out") $(total "$run/callee.out")"
}
if [ "${MTLS:-0}" = 1 ]; then
  "$BIN" control --data-dir "$W/cp" --api 127.0.0.1:18170 --xds 127.0.0.1:18171 >/dev/null 2>"$W/cp.err" &
  CP=$!
  trap 'kill $CP 2>/dev/null || true; pkill -f "callgrind-out-file=$W" 2>/dev/null || true; cleanup' EXIT
  for _ in $(seq 100); do [ -s "$W/cp/admin.token" ] && curl -sf -o /dev/null 127.0.0.1:18170/healthz && break; sleep 0.1; done
  "$BIN" apply -f bench/mesh-mtls.yaml --server http://127.0.0.1:18170 --token "$(cat "$W/cp/admin.token")" >/dev/null
  read -r fc fe < <(run_mtls "$N")
  read -r bc be < <(run_mtls 0)
  echo "caller $(( (fc - bc) / N )), callee $(( (fe - be) / N )) instructions per request"
  echo "$(( (fc + fe - bc - be) / N )) instructions per request through two proxies with mutual TLS ($N requests; start-up, shutdown and ${WARM:-800} warm-up requests, $((bc + be)), subtracted)"
  if [ "${BREAKDOWN:-0}" = 1 ]; then
    echo "caller: $(breakdown "$W/caller-$N.out" "$W/caller-0.out")"
    echo "callee: $(breakdown "$W/callee-$N.out" "$W/callee-0.out")"
  fi
  exit 0
fi
full=$(run "$N"); base=$(run 0)
echo "$(( (full - base) / N )) instructions per request ($N requests; start-up and shutdown, $base, subtracted)"
[ "${BREAKDOWN:-0}" = 1 ] && echo "by part: $(breakdown "$W/proxy-$N.out" "$W/proxy-0.out")"
exit 0
