#!/usr/bin/env python3
"""memcpy's calls per request by size, for `MOVES=1 bash bench/mtls.sh`.

Usage: move-sizes.py DIR REQUESTS NAME=PID... : for each named process, the sizes copied at
least once every ten requests (REQUESTS: the requests it served), most frequent first."""
import sys

def main():
    d, requests = sys.argv[1], float(sys.argv[2])
    for named in sys.argv[3:]:
        name, pid = named.split("=")
        try:
            lines = open(f"{d}/{pid}").read().split("\n")
        except OSError as e:
            print(f"{name}: no counts ({e})")
            continue
        sizes = []
        for line in lines:
            f = line.split()
            if len(f) == 2:
                sizes.append((int(f[1]) / requests, int(f[0])))
        sizes.sort(reverse=True)
        big = [(n, s) for n, s in sizes if s >= 64 and n >= 0.1]
        print(f"{name}: {sum(n for n, _ in sizes):.1f} calls a request, "
              f"{sum(n for n, s in sizes if s >= 64):.1f} of 64 bytes or more "
              f"({sum(n * s for n, s in sizes if s >= 64) / 1024:.1f} KiB)")
        print("  " + "  ".join(f"{s} B ×{n:.1f}" for n, s in big[:16]))

main()
