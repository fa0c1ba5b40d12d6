# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # The module graph
#
# **You will build** the import graph of the `minisd` package, read from its source code
# (not from a hand-drawn diagram): which module imports which, with the imports hidden inside
# functions marked, drawn floor by floor from the building blocks up to the trainers and the
# command line, and a check that no chain of imports comes back to where it started.
#
# A package whose modules import only *downward* can be read, tested and replaced one floor
# at a time: the attention module never needs the pipeline, so chapter 3 can test it alone.
# A cycle (module A imports B, which imports A, perhaps through a function-level import that
# only runs later) ties the floors together: loading one loads them all, and a change on the
# top floor can break the bottom one.

# %%
import ast
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

import minisd

SOURCE = Path(minisd.__file__).resolve().parent  # the package this kernel imports
print(f"reading the package {SOURCE.name}/: {len(list(SOURCE.rglob('*.py')))} files")


# %% [markdown]
# ## Reading the imports with `ast`
#
# Python's own parser, `ast`, turns each file into a tree. Every `import x` and
# `from .x import y` is a node of that tree, wherever it stands: at the top of the file, or
# inside a function, where it runs only when the function is called. A relative import
# (`from ..clip import CLIP` in `minisd/train/clip.py`) is resolved against the file's own
# package; `from . import data` names a module, while `from . import DATA_DIR` names a value
# of the package itself, so it is an import of `minisd`'s `__init__.py`.

# %%
def module_name(path):
    """minisd/unet.py -> 'minisd.unet'; minisd/train/__init__.py -> 'minisd.train'."""
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def package_of(name):
    """The package that a module's relative imports start from."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def in_function(tree):
    """Map each import node to True if it sits inside a function (a deferred import)."""
    where = {}

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                where[child] = inside
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return where


def imports_of(name):
    """{imported minisd module: True if every such import is inside a function}."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    found = {}
    for node, deferred in in_function(tree).items():
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = package_of(name).split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                sub = f"{source}.{alias.name}"
                targets.append(sub if sub in MODULES else source)
        for target in targets:
            while target and target not in MODULES:  # import minisd.x.y -> the deepest module we have
                target = target.rpartition(".")[0]
            if target and target != name:
                found[target] = found.get(target, True) and deferred
    return found


GRAPH = {name: imports_of(name) for name in MODULES}
n_edges = sum(len(v) for v in GRAPH.values())
n_deferred = sum(d for v in GRAPH.values() for d in v.values())
print(f"{len(GRAPH)} modules, {n_edges} import edges, {n_deferred} of them only inside functions")

# %% [markdown]
# ## The edges
#
# Each line is one module and what it imports; `(in a function)` marks an import that
# runs only when the function that holds it is called. An import both at the top and in a
# function counts as a top-level one.

# %%
short = lambda name: name.replace("minisd.", "", 1) if name != "minisd" else "minisd (__init__)"  # noqa: E731
for name in sorted(GRAPH):
    deps = GRAPH[name]
    listed = ", ".join(short(d) + (" (in a function)" if deps[d] else "") for d in sorted(deps))
    print(f"{short(name):22} -> {listed or '(nothing in minisd)'}")


# %% [markdown]
# ## Cycles
#
# A cycle is a chain of imports that returns to its start. Tarjan's algorithm splits the
# graph into strongly connected components: groups of modules each reachable from every
# other. The graph is acyclic exactly when every component is a single module that does
# not import itself. For each larger component the cell prints one cycle through it, found
# by a breadth-first search for the shortest way back.

# %%
def strongly_connected(graph):
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle_through(graph, start, members):
    """The shortest chain start -> ... -> start that stays inside one component."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return None


COMPONENTS = [c for c in strongly_connected(GRAPH) if len(c) > 1]
CYCLE_EDGES = {(a, b) for comp in COMPONENTS for a in comp for b in GRAPH[a] if b in comp}
CYCLES = [shortest_cycle_through(GRAPH, comp[0], set(comp)) for comp in COMPONENTS]
if not CYCLES:
    print("acyclic: no chain of imports leads back to where it started")
for comp, cycle in zip(COMPONENTS, CYCLES):
    print(f"a cycle among {len(comp)} modules: {', '.join(map(short, comp))}")
    print("    for example:", short(cycle[0]) + "".join(
        (" -(in a function)-> " if GRAPH[a][b] else " -> ") + short(b) for a, b in zip(cycle, cycle[1:])))
print(f"{len(CYCLE_EDGES)} of the {n_edges} edges lie on a cycle")

# %% [markdown]
# ## The floors
#
# The package is meant to be a building of five floors, each importing only from the
# floors below it: the **building blocks** (paths, the course data, layers, the noise
# schedule and the samplers, the tokenizer, the losses), the **models** made of them (U-Net,
# VAE, CLIP, and the metrics' judge networks), **weights and files** (every checkpoint
# format, the course checkpoints, LoRA files), the **pipeline**, and on top the **trainers,
# the evaluation and benchmark commands and the command line**. Which module lives on which
# floor is written once, in `scripts/module_graph.py` (`LAYERS`), the tool that
# `tests/test_architecture.py` runs to fail the tests when an import goes up a floor or a
# cycle appears. This page reads the same table, and checks that the tool's own reading of
# the imports agrees with the one built above.

# %%
sys.path.insert(0, str(SOURCE.parent / "scripts"))
from module_graph import LAYERS, import_graph  # noqa: E402

FLOORS = [title for title, _ in LAYERS]
assert {a: set(b) for a, b in GRAPH.items()} == import_graph(SOURCE), "two readings of the imports disagree"
print("scripts/module_graph.py reads the same", n_edges, "edges")
FLOOR = {name: next(i for i, (_, members) in enumerate(LAYERS) if name in members) for name in GRAPH}
UPWARD = sorted((a, b) for a in GRAPH for b in GRAPH[a] if FLOOR[b] > FLOOR[a])
for i, title in enumerate(FLOORS):
    print(f"floor {i} {title:16}: {', '.join(short(m) for m in sorted(GRAPH) if FLOOR[m] == i)}")
print(f"\n{len(UPWARD)} imports go up a floor:")
for a, b in UPWARD:
    print(f"    {short(a)} -> {short(b)}" + (" (in a function)" if GRAPH[a][b] else ""))

# %%
def layout(floor_of):
    """x positions per floor, ordered to keep edges short (two barycentre sweeps)."""
    rows = defaultdict(list)
    for m in sorted(floor_of):
        rows[floor_of[m]].append(m)
    pos = {m: (i - (len(r) - 1) / 2, f) for f, r in rows.items() for i, m in enumerate(r)}
    neighbours = defaultdict(set)
    for a in GRAPH:
        for b in GRAPH[a]:
            neighbours[a].add(b)
            neighbours[b].add(a)
    for _ in range(2):
        for f, r in sorted(rows.items()):
            r.sort(key=lambda m: (sum(pos[n][0] for n in neighbours[m]) / max(len(neighbours[m]), 1), m))
            for i, m in enumerate(r):
                pos[m] = ((i - (len(r) - 1) / 2) * 1.25, f * 1.6)
    return pos


POS = layout(FLOOR)
fig, ax = plt.subplots(figsize=(13, 8.5))
for a in sorted(GRAPH):
    for b in sorted(GRAPH[a]):
        colour = "tab:red" if (a, b) in CYCLE_EDGES else ("tab:orange" if FLOOR[b] > FLOOR[a] else "0.55")
        ax.add_patch(FancyArrowPatch(POS[a], POS[b], arrowstyle="-|>", mutation_scale=9, lw=0.9,
                                     color=colour, alpha=0.75, linestyle="--" if GRAPH[a][b] else "-",
                                     connectionstyle="arc3,rad=0.12", shrinkA=14, shrinkB=14, zorder=1))
for m, (x, y) in POS.items():
    ax.text(x, y, short(m).replace(" (__init__)", "\n(__init__)"), ha="center", va="center", fontsize=8,
            zorder=3, bbox=dict(boxstyle="round,pad=0.35", fc="white", ec="0.3", lw=0.8))
for i, title in enumerate(FLOORS):
    ax.text(min(x for x, _ in POS.values()) - 0.9, i * 1.6, title, ha="right", va="center",
            fontsize=10, weight="bold", color="0.25")
ax.legend(handles=[Line2D([], [], color="0.55", label="import (top of file)"),
                   Line2D([], [], color="0.55", ls="--", label="import inside a function"),
                   Line2D([], [], color="tab:orange", label="goes up a floor"),
                   Line2D([], [], color="tab:red", label="on a cycle")],
          loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=4, frameon=False, fontsize=9)
xs = [x for x, _ in POS.values()]
ax.set_xlim(min(xs) - 2.8, max(xs) + 0.9)
ax.set_ylim(-0.7, (len(FLOORS) - 1) * 1.6 + 0.7)
ax.set_title("minisd's import graph, read from its source (arrow: importer -> imported)")
ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The check
#
# The cell below states the rule as an `assert`: no cycles. It prints what it finds either
# way, so a failure names the modules to untangle.

# %%
print("cycles found:", len(CYCLES))
for cycle in CYCLES:
    print("   ", short(cycle[0]) + "".join(
        (" -(in a function)-> " if GRAPH[a][b] else " -> ") + short(b) for a, b in zip(cycle, cycle[1:])))
# the page, nbval and the book build fail if a cycle comes back
assert not CYCLES, f"minisd's imports have {len(CYCLES)} cycle(s): {CYCLES}"

# %% [markdown]
# ## What you built
#
# A reader of `minisd`'s import graph built from nothing but the source and `ast`: every
# module's imports, the deferred (function-level) ones marked, the strongly connected
# components that make cycles, the modules placed on five floors (building blocks, models,
# weights and files, pipeline, trainers and command line) and the imports that climb a
# floor. The page re-reads the package each time it runs, so it stays true as the package
# changes; its final `assert` keeps the graph acyclic. The same few functions work on any
# Python package: point `SOURCE` at it.
