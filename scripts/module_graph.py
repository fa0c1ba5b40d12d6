"""The import graph of the minisd package, read from its source with `ast` (nothing is imported).

    python scripts/module_graph.py          # one "module -> imported module" line per edge
    python scripts/module_graph.py --dot    # the same as a Graphviz digraph

Every import counts, at module level or inside a function: an import moved into a function
still makes a dependency. `tests/test_architecture.py` asserts that the graph is acyclic and
that each module imports only its own layer or the layers below (LAYERS).
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "minisd"

# From the bottom: building blocks -> models -> weights and checkpoints -> pipeline -> trainers and CLI.
LAYERS = [
    ("building blocks", {"minisd.paths", "minisd.data", "minisd.embeddings", "minisd.resnet", "minisd.attention",
                         "minisd.diffusion", "minisd.schedulers", "minisd.tokenizer", "minisd.losses"}),
    ("models", {"minisd.unet", "minisd.vae", "minisd.clip", "minisd.metrics"}),
    ("weights", {"minisd.weights", "minisd.checkpoint", "minisd.lora", "minisd.textual_inversion", "minisd.controlnet"}),
    ("pipeline", {"minisd.pipeline"}),
    ("trainers and CLI", {"minisd", "minisd.train", "minisd.train.vae", "minisd.train.clip", "minisd.train.unet",
                          "minisd.train.lora", "minisd.train.lora_folder", "minisd.train.ti", "minisd.train.controlnet", "minisd.train.lcm", "minisd.train.inpaint", "minisd.benchmark", "minisd.evaluate",
                          "minisd.__main__"}),
]


def module_name(path, root=ROOT):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root=ROOT):
    """{module: set of minisd modules it imports}, for every .py file under `root`."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = ".".join(base[:len(base) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                # `from . import x` imports the submodule x when there is one, else a name of the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:     # minisd.train.unet.x -> minisd.train.unet
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module):
    return next(i for i, (_, members) in enumerate(LAYERS) if module in members)


def main(argv):
    graph = import_graph()
    if "--dot" in argv:
        print("digraph minisd {\n  rankdir=BT;")
        for i, (title, members) in enumerate(LAYERS):
            print(f'  subgraph cluster_{i} {{ label="{title}"; ' + " ".join(f'"{m}";' for m in sorted(members)) + " }")
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
    else:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"{a} -> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
