"""The package's import graph: arrows point one way (demo -> trainer -> library), no cycles."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "qwenvl_jax")


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (lazy imports included)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_graph_sees_known_edges():
    # The checker itself must see lazy and `from pkg import module` edges.
    g = import_graph()
    assert (
        "qwenvl_jax.train.loop" in g["qwenvl_jax.demo.run"]
        or "qwenvl_jax.train" in g["qwenvl_jax.demo.run"]
    )
    assert "qwenvl_jax.demo" in g["qwenvl_jax.train.__main__"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    assert _cycle(import_graph()) is None


def test_arrows_point_one_way():
    g = import_graph()
    for mod, deps in g.items():
        in_demo = mod.startswith("qwenvl_jax.demo")
        if not in_demo and mod != "qwenvl_jax.train.__main__":
            assert not {d for d in deps if d.startswith("qwenvl_jax.demo")}, mod
        # The stage configs (qwenvl_jax/configs) are the trainer's, as the benches are (both take
        # a stage config; data.bench times packed rows at a stage's own settings).
        trainer = (
            "qwenvl_jax.train",
            "qwenvl_jax.bench",
            "qwenvl_jax.configs",
            "qwenvl_jax.data.bench",
        )
        library = not (in_demo or mod.startswith(trainer))
        if library:
            assert not {d for d in deps if d.startswith("qwenvl_jax.train")}, mod
