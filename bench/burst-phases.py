#!/usr/bin/env python3
"""Where the bursts of bench/mtls.sh's paced load spend their time, from a trace of the
proxies' core (`perf script` output of raw_syscalls:sys_enter/sys_exit and
sched:sched_switch; `TRACE=1 bash bench/mtls.sh` records and reads it).

Usage: burst-phases.py SCRIPT_TXT FIRST_PID SECOND_PID [SHOW]

A burst is a run of the two proxies' system calls with no gap of 400 µs or more. For each
burst with at least 6 requests it measures:
  - from the first proxy's first read of a client's request to its last write of a response
    to a client, per request;
  - the second proxy's response phase: from its first read of an upstream answer to its
    first write back to the first proxy, per answer read in between;
  - the first proxy's response phase: from its read of those answers to the write of the
    last of them to its client, per answer.
and prints the medians. SHOW=N also prints the Nth such burst call by call.
"""
import re
import statistics as st
import sys

SENDTO, RECVFROM = 44, 45
NAMES = {0: "read", 1: "write", 20: "writev", SENDTO: "sendto", RECVFROM: "recvfrom",
         232: "epoll_wait", 281: "epoll_pwait"}
LINE = re.compile(r"^\s*(\S+)\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+(\S+):\s+(.*)$")


def events(path, who):
    """(µs, kind, process, syscall nr, fd or return value); kind: in, out, switch."""
    out = []
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        _, pid, t, event, rest = m.groups()
        t = float(t) * 1e6
        if event == "sched:sched_switch":
            nxt = re.search(r"next_comm=(\S+) next_pid=(\d+)", rest)
            out.append((t, "switch", who.get(nxt.group(2), nxt.group(1)) if nxt else "?", None, None))
        elif pid in who:
            nr = int(rest.split()[1])
            if event.endswith("sys_enter"):
                out.append((t, "in", who[pid], nr, int(rest.split("(")[1].split(",")[0], 16)))
            else:
                out.append((t, "out", who[pid], nr, int(rest.split("=")[-1])))
    return out


def bursts(evs):
    found, cur, last = [], [], None
    for e in evs:
        if e[1] != "switch":
            if last is not None and e[0] - last >= 400 and cur:
                found.append(cur)
                cur = []
            last = e[0]
        cur.append(e)
    if cur:
        found.append(cur)
    return found


def calls(burst):
    """Completed system calls: (process, nr, fd, µs entered, µs returned, return value)."""
    done, open_ = [], {}
    for t, kind, p, nr, v in burst:
        if kind == "in":
            open_[p] = (nr, v, t)
        elif kind == "out" and p in open_:
            nr0, fd, t0 = open_.pop(p)
            done.append((p, nr0, fd, t0, t, v))
    return done


def measure(burst, req_size, answer_size):
    cs = calls(burst)
    # Client requests: the first proxy's reads of the size most of its reads have (every
    # request of the load is the same), on the sockets it then answers with sendto.
    reqs = [c for c in cs if c[0] == "first" and c[1] == RECVFROM and c[5] == req_size]
    clients = {c[2] for c in reqs}
    resps = [c for c in cs if c[0] == "first" and c[1] == SENDTO and c[2] in clients]
    if len(reqs) < 6 or not resps:
        return None
    total = (resps[-1][4] - reqs[0][3]) / len(reqs)
    # The second proxy's upstream answers: its reads of the size most of its reads have
    # (nginx's answer, the same to every request), on its HTTP/1.1 connections to nginx.
    answers = [c for c in cs if c[0] == "second" and c[1] == RECVFROM and c[5] == answer_size]
    up = {c[2] for c in answers}
    second = first = None
    if len(answers) >= 6:
        t1 = answers[0][4]
        back = [c for c in cs if c[0] == "second" and c[1] in (1, 20, SENDTO)
                and c[2] not in up and c[3] > t1]
        if back:
            tw = back[0][3]
            m = len([c for c in answers if c[4] <= tw])
            second = (tw - t1) / m
            rd = [c for c in cs if c[0] == "first" and c[1] in (0, RECVFROM)
                  and c[2] not in clients and c[3] > tw]
            out = [c for c in resps if c[3] > tw]
            if rd and len(out) >= m:
                first = (out[m - 1][4] - rd[0][3]) / m
    return len(reqs), total, second, first


def main():
    path, first_pid, second_pid = sys.argv[1:4]
    show = int(sys.argv[4]) if len(sys.argv) > 4 else None
    who = {first_pid: "first", second_pid: "second"}
    rows = []
    evs = events(path, who)
    found = bursts(evs)

    def commonest_read(proc):
        sizes = [c[5] for b in found for c in calls(b) if c[0] == proc and c[1] == RECVFROM and c[5] > 0]
        return max(set(sizes), key=sizes.count) if sizes else None

    req_size, answer_size = commonest_read("first"), commonest_read("second")
    for b in found:
        r = measure(b, req_size, answer_size)
        if r is None:
            continue
        rows.append(r)
        if show is not None and len(rows) == show:
            t0 = b[0][0]
            for t, kind, p, nr, v in b:
                if kind == "switch":
                    print(f"{t - t0:8.1f}   -> {p}")
                elif kind == "in":
                    print(f"{t - t0:8.1f} {p:6s} {NAMES.get(nr, nr)}({v})")
                else:
                    print(f"{t - t0:8.1f} {p:6s}   = {v}")
    if not rows:
        print("no burst of 6 requests or more found")
        return
    med = lambda xs: st.median(xs) if xs else float("nan")
    print(f"{len(rows)} bursts of 6 requests or more; median {med([r[0] for r in rows]):.1f} requests each")
    print(f"first request in -> last response out, per request: median {med([r[1] for r in rows]):.1f} µs")
    sec = [r[2] for r in rows if r[2] is not None]
    fst = [r[3] for r in rows if r[3] is not None]
    print(f"second proxy, first upstream answer read -> its write back, per answer: median {med(sec):.1f} µs ({len(sec)} bursts)")
    print(f"first proxy, read of those answers -> the last sent to its client, per answer: median {med(fst):.1f} µs ({len(fst)} bursts)")


if __name__ == "__main__":
    main()
