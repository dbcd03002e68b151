#!/usr/bin/env bash
# Prints which modules of the crate name which others, and whether they form a cycle, so a
# reviewer reads the layering here instead of in 100 files. Exits 1 on a cycle.
#
# Usage: scripts/module-graph.sh [src-dir]   (default: the src/ next to this script)
#
# A node is a file's module path (`tls::handshaker`, `worker`, `shared`): a directory such as
# `tls/` is a namespace, and its files need not sit at one level (the TLS handshake thread is
# glue above `shared`, the TLS machine below it). An edge is a non-comment line naming
# `crate::<path>` (main.rs: `virtproxyd::<path>`), inline paths included, resolved to the
# longest path that is a file. `super::` paths stay inside a module and are not followed.
# Printed: the edges between top-level modules, one line per file that has any; then the
# cycles between files, and (for the record) the top-level modules that name each other.
set -euo pipefail

src=${1:-"$(dirname "$0")/../src"}
exec python3 - "$src" <<'EOF'
import os, re, sys

src = sys.argv[1]
files = {}
for root, _, names in os.walk(src):
    for n in names:
        if not n.endswith(".rs"):
            continue
        rel = os.path.relpath(os.path.join(root, n), src)[:-3].split(os.sep)
        if rel[-1] == "mod":
            rel = rel[:-1]
        if rel == ["lib"]:
            continue
        files["::".join(rel)] = os.path.join(root, n)

def resolve(path):
    parts = path.split("::")
    for i in range(len(parts), 0, -1):
        if "::".join(parts[:i]) in files:
            return "::".join(parts[:i])
    return None

edges = set()
for node, path in files.items():
    prefix = "virtproxyd" if node == "main" else "crate"
    pat = re.compile(r"\b" + prefix + r"::([a-z_][a-z0-9_]*(?:::[a-z_][a-z0-9_]*)*)")
    with open(path) as f:
        for line in f:
            if line.lstrip().startswith("//"):
                continue
            for m in pat.finditer(line):
                to = resolve(m.group(1))
                if to and to != node and not to.startswith(node + "::"):
                    edges.add((node, to))

top = lambda n: n.split("::")[0]
out = {}
for a, b in edges:
    if top(a) != top(b):
        out.setdefault(a, set()).add(top(b))
for a in sorted(out):
    print(f"{a} -> {' '.join(sorted(out[a]))}")

def sccs(nodes, graph):
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1
        stack.append(v); on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found

graph = {}
for a, b in edges:
    graph.setdefault(a, set()).add(b)
cycles = sccs(files, graph)
for c in cycles:
    print("cycle between files: " + " ".join(c))
top_graph = {}
for a, b in edges:
    if top(a) != top(b):
        top_graph.setdefault(top(a), set()).add(top(b))
for c in sccs({top(n) for n in files}, top_graph):
    print("top-level modules naming each other: " + " ".join(c))
if cycles:
    sys.exit(1)
print("no cycle between files")
EOF
