#!/usr/bin/env python3
"""TCP segments per request from two snapshots of /proc/net/snmp and /proc/net/netstat.

Usage: segment-count.py BEFORE AFTER RPS SECONDS (bench/mtls.sh SEGMENTS=1). The counters are
the machine's: on this rig every segment is on loopback, so each one sent is also received.
"""
import sys


def counters(path):
    """{"Tcp:OutSegs": n, "TcpExt:DelayedACKs": n, ...}: the files are pairs of lines, names
    then values, under the same prefix."""
    out = {}
    lines = [l.split() for l in open(path) if l.strip()]
    for names, values in zip(lines[::2], lines[1::2]):
        if names[0] != values[0]:
            sys.exit(f"{path}: {names[0]} is followed by {values[0]}")
        for name, value in zip(names[1:], values[1:]):
            out[names[0] + name] = int(value)
    return out


def main():
    before, after = counters(sys.argv[1]), counters(sys.argv[2])
    requests = float(sys.argv[3]) * float(sys.argv[4])
    if requests <= 0:
        sys.exit("no requests")
    for label, key in [
        ("segments sent", "Tcp:OutSegs"),
        ("of which carried data", "TcpExt:TCPOrigDataSent"),
        ("pure ACKs received", "TcpExt:TCPPureAcks"),
        ("delayed ACKs sent", "TcpExt:DelayedACKs"),
        ("retransmitted", "Tcp:RetransSegs"),
    ]:
        print(f"{label:24} {(after.get(key, 0) - before.get(key, 0)) / requests:6.2f} a request")


if __name__ == "__main__":
    main()
