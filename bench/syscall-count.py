#!/usr/bin/env python3
"""System calls per request on the proxies' core, by process and call, from `perf script`
output of raw_syscalls:sys_enter (`SYSCALLS=1 bash bench/mtls.sh` records and reads it).

Usage: syscall-count.py SCRIPT_TXT RPS SECONDS NAME=PID [NAME=PID ...]

Prints, for each named process and for nginx, the calls a request makes (count / requests,
where requests = RPS x SECONDS, the load generator's rate over the recorded window).
"""
import collections
import re
import sys

# x86-64 numbers of the calls a proxy makes on its request path.
NAMES = {0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 44: "sendto",
         45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 202: "futex", 232: "epoll_wait",
         233: "epoll_ctl", 281: "epoll_pwait", 288: "accept4", 3: "close", 41: "socket",
         42: "connect", 54: "setsockopt", 55: "getsockopt", 228: "clock_gettime",
         13: "rt_sigaction", 14: "rt_sigprocmask", 441: "epoll_pwait2", 16: "ioctl", 72: "fcntl"}
LINE = re.compile(r"^\s*(\S+)\s+(\d+)\s+.*raw_syscalls:sys_enter:\s+NR (\d+)")


def main():
    path, rps, secs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    who = dict(reversed(a.split("=", 1)) for a in sys.argv[4:])
    requests = rps * secs
    counts = collections.defaultdict(collections.Counter)
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, nr = m.group(1), m.group(2), int(m.group(3))
        name = who.get(pid, "nginx" if comm.startswith("nginx") else None)
        if name is None:
            continue
        counts[name][NAMES.get(nr, f"nr{nr}")] += 1
    for name in list(who.values()) + ["nginx"]:
        c = counts.get(name, collections.Counter())
        total = sum(c.values()) / requests
        calls = ", ".join(f"{k} {v / requests:.2f}" for k, v in c.most_common() if v / requests >= 0.01)
        print(f"{name}: {total:.2f} calls a request ({calls})")


if __name__ == "__main__":
    main()
