"""The package's layers, as docs/architecture.md draws them: each sub-package imports only from its
own layer's package and the layers below it, and no module imports itself back through others.

    6 testing      what drives the daemon from outside (tests, benchmarks, plugin authors)
    5 tools        ulog-dump, ulog-recover
    4 daemon       the effects performed, the request loop and its threads, the program
    3 storage      the backend interface, the journal, the store formats, the backends
    3 transport    frames in, replies out
    3 cluster      corosync as values
    2 log          the log's state without I/O: region bitmaps, lifecycle, the engine, the restart rule
    1 protocol     the kernel's frames and requests, defined once
"""

from __future__ import annotations

import ast
from pathlib import Path

import ulog_disk

PACKAGE = Path(ulog_disk.__file__).parent
LAYERS = {"protocol": 1, "log": 2, "storage": 3, "transport": 3, "cluster": 3, "daemon": 4, "tools": 5,
          "testing": 6}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The ulog_disk modules an import statement names (a package's submodules included)."""
    known = modules()
    out = []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("ulog_disk")]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("ulog_disk"):
        return []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def imports(top_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        nodes = list(ast.iter_child_nodes(tree)) if top_level_only else list(ast.walk(tree))
        if top_level_only:
            # `if TYPE_CHECKING:` blocks are part of the module's dependencies too.
            for node in list(nodes):
                if isinstance(node, ast.If):
                    nodes.extend(node.body)
        found: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(resolve(name, path.name == "__init__.py", node))
        graph[name] = found - {name}
    return graph


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1], LAYERS[parts[1]]


def test_every_module_lives_in_a_layer() -> None:
    top = ("ulog_disk", "ulog_disk.__main__")
    loose = sorted(m for m in modules() if layer_of(m) is None and m not in top)
    assert not loose, f"modules outside the layers: {loose}"


def test_each_layer_imports_only_its_own_package_and_the_layers_below() -> None:
    wrong = []
    for importer, targets in imports(top_level_only=False).items():
        mine = layer_of(importer)
        if mine is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs[0] != mine[0] and theirs[1] >= mine[1]:
                wrong.append(f"{importer} ({mine[0]}) imports {target} ({theirs[0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = imports(top_level_only=True)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_largest_region_count_is_defined_once_below_the_wire_and_the_store() -> None:
    from ulog_disk.protocol import ctrargs, geometry, wire
    from ulog_disk.storage import store_format

    assert geometry.MAX_REGION_COUNT > 0
    for module in (ctrargs, wire, store_format):
        source = Path(module.__file__).read_text()
        assert "MAX_REGION_COUNT =" not in source, module.__name__
