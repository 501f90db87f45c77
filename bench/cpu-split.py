#!/usr/bin/env python3
"""Where a request's CPU goes on the proxies' core, from `perf script -F comm,pid,period,ip,sym,dso`
of a cpu-clock recording of that core (bench/mtls.sh PROFILE=1).

Usage: cpu-split.py SCRIPT.txt RPS SECONDS [TOP]

Prints, in microseconds per request (samples' periods over RPS x SECONDS requests): the
proxies' user time (their own code, libc, TLS libraries, vDSO), the kernel's time on their
behalf, nginx's user and kernel time, and the rest; then the proxies' TOP user and kernel
functions. Any process that is not nginx, swapper or perf counts as a proxy."""
import collections
import sys

path, rps, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 12
requests = rps * secs
split = collections.Counter()
syms = {"user": collections.Counter(), "kernel": collections.Counter()}
for line in open(path):
    # e.g. "trellis 1234 100000 ffffffff81234567 tcp_ack ([kernel.kallsyms])"
    parts = line.split()
    if len(parts) < 4 or not parts[2].isdigit():
        continue
    comm, period = parts[0], int(parts[2])
    dso = parts[-1].strip("()") if parts[-1].startswith("(") else "?"
    sym = " ".join(parts[4:-1]) or parts[3]
    side = "kernel" if "kernel" in dso else "user"
    if comm.startswith("nginx"):
        who = "nginx"
    elif comm in ("swapper", "perf") or comm.startswith(("kworker", "ksoftirqd", "migration")):
        who = "other"
    else:
        who = "proxies"
        name = sym if side == "kernel" else f"{sym} [{dso.rsplit('/', 1)[-1]}]"
        syms[side][name] += period
    split[(who, side)] += period
us = lambda ns: ns / 1e3 / requests
total = sum(split.values())
print(f"CPU per request on the proxies' core: {us(total):.1f} us")
for who in ("proxies", "nginx", "other"):
    u, k = split[(who, "user")], split[(who, "kernel")]
    print(f"  {who:8} user {us(u):5.1f} us   kernel {us(k):5.1f} us")
for side in ("user", "kernel"):
    print(f"the proxies' top {side} functions, us per request:")
    for name, ns in syms[side].most_common(top):
        print(f"  {us(ns):6.2f}  {name}")
