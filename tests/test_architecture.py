"""The package's structure: imports go one way, checked on the source with `ast`
(scripts/module_graph.py computes the graph; the book's appendix draws it)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("module_graph", Path(__file__).parent.parent / "scripts" / "module_graph.py")
module_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module_graph)


def test_every_module_has_a_layer():
    graph = module_graph.import_graph()
    placed = set().union(*(members for _, members in module_graph.LAYERS))
    assert set(graph) == placed, f"put new modules in a layer: {set(graph) ^ placed}"


def test_imports_go_downward_only():
    """A module imports its own layer or the ones below, at module level or inside a function:
    no model module imports the loaders, the pipeline or a trainer."""
    graph = module_graph.import_graph()
    upward = [(a, b) for a in graph for b in graph[a] if module_graph.layer_of(b) > module_graph.layer_of(a)]
    assert not upward, f"imports that go up a layer: {upward}"
    for model in ("minisd.unet", "minisd.vae", "minisd.clip"):
        assert not graph[model] & {"minisd.weights", "minisd.checkpoint", "minisd.pipeline", "minisd"}


def test_the_import_graph_is_acyclic():
    graph = module_graph.import_graph()
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_the_graph_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "minisd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    from . import c\n")
    (pkg / "b.py").write_text("from minisd.a import f\n")
    (pkg / "c.py").write_text("")
    graph = module_graph.import_graph(pkg)
    assert graph["minisd.a"] == {"minisd.b", "minisd.c"} and graph["minisd.b"] == {"minisd.a"}
