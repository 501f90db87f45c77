#!/usr/bin/env python3
"""Fail when the files of a crate import each other in a circle.

A file's imports are the modules it names through `crate::a::b`, `super::x` or `self::x`
(in `use` items and in paths in code). Child modules declared inline (`mod x;`) are a
file's own parts: a parent may use its children, and a child its parent's items only
through a path that names the parent. A cycle is a strongly connected set of two or more
files. Usage: import-cycles.py crates/proxy/src [crates/control/src ...]
"""
import os
import re
import sys


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] in ("lib", "main", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    # test modules are not part of the crate's structure
    text = re.sub(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{.*", "", text, flags=re.S)
    return text


def expand_use(tree):
    """`a::{b, c::{d}}` -> [a::b, a::c::d]"""
    tree = tree.replace(" ", "").replace("\n", "")
    out = []

    def rec(prefix, t):
        if "{" not in t:
            for alt in split_top(t):
                if alt:
                    out.append(prefix + alt)
            return
        for alt in split_top(t):
            if "{" in alt:
                i = alt.index("{")
                head, body = alt[:i], alt[i + 1 : alt.rindex("}")]
                rec(prefix + head, body)
            elif alt:
                out.append(prefix + alt)

    rec("", tree)
    return out


def split_top(t):
    parts, depth, cur = [], 0, ""
    for ch in t:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def resolve(mod, path, modules):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        base, segs = (), segs[1:]
    elif segs[0] == "super":
        base = mod
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    elif segs[0] == "self":
        base, segs = mod, segs[1:]
    else:
        return None
    # the longest prefix that is a file
    best = base if base in modules else None
    cur = base
    for s in segs:
        cur = cur + (s,)
        if cur in modules:
            best = cur
    return best


def cycles(root):
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".rs") and f != "tests.rs" and "tests" not in os.path.relpath(d, root).split(os.sep):
                p = os.path.join(d, f)
                files[module_of(root, p)] = p
    edges = {m: set() for m in files}
    for m, p in files.items():
        text = strip(open(p).read())
        paths = []
        for u in re.finditer(r"\buse\s+([^;]+);", text):
            paths += expand_use(u.group(1))
        paths += re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", text)
        for path in paths:
            t = resolve(m, path.split(" as ")[0], files)
            if t is not None and t != m and not (len(t) < len(m) and m[: len(t)] == t and path.startswith("super")):
                edges[m].add(t)
    # a parent module's file only declares its children; an edge to the parent through
    # `super::` names the parent's own items, which counts.
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in files:
        if v not in index:
            strong(v)
    return out, edges, files


def main():
    bad = False
    for root in sys.argv[1:]:
        found, edges, files = cycles(root)
        for comp in found:
            bad = True
            names = ["/".join(c) or "lib" for c in comp]
            print(f"{root}: files import each other in a circle: {', '.join(names)}")
            for c in comp:
                for t in sorted(edges[c]):
                    if t in comp:
                        print(f"    {'/'.join(c) or 'lib'} -> {'/'.join(t) or 'lib'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
