"""The import rules of server/asr_server, read from the source with `ast` (nothing is imported or run).

Every import counts, also one inside a function: a lazy import still ties the two modules together.
- no module outside `edge/` imports `edge` (only the edge knows gRPC's servicer side and the public protobuf), but
  the command-line entry point above it (`cli`), which starts the server;
- no circle among the package's modules;
- `audio/` imports nothing of the server but itself and `errors` (the leaf module of domain error types);
- `engine/` imports neither `edge/` nor `streaming/`;
- the HTTP edge (`edge/http/`) imports neither gRPC nor protobuf, nor the gRPC edge's modules.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "server"
PACKAGE = "asr_server"
ENTRY_POINT = "asr_server.cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((PACKAGE_ROOT / PACKAGE).rglob("*.py"))}


def _imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that `name` imports (a `from A import b` names A.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or not target.startswith(PACKAGE + "."):
                continue
            # `import asr_server.a.b` where only asr_server.a is a module file: the longest known prefix.
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                yield target


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: set(_imported(name, path, known)) for name, path in modules.items()}


def _in(module: str, package: str) -> bool:
    full = f"{PACKAGE}.{package}"
    return module == full or module.startswith(full + ".")


def test_the_graph_is_read() -> None:
    graph = _graph()
    # Guards the reader itself: known edges must be found, or every rule below would pass vacuously.
    assert "asr_server.engine.factory" in graph["asr_server.edge.server"]
    assert "asr_server.audio.formats" in graph["asr_server.audio.decoded"]
    assert "asr_server.models.loading" in graph["asr_server.engine.cores"]  # an import inside a function


def test_no_module_outside_the_edge_imports_it() -> None:
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if not _in(module, "edge") and module != ENTRY_POINT
        for target in targets
        if _in(target, "edge")
    )
    assert offenders == []


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("audio", ("audio", "errors")),
    ],
)
def test_a_leaf_package_imports_only_itself(package: str, allowed: tuple[str, ...]) -> None:
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if _in(module, package)
        for target in targets
        if not any(_in(target, a) for a in allowed)
    )
    assert offenders == []


def test_the_engine_imports_neither_the_edge_nor_streaming() -> None:
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if _in(module, "engine")
        for target in targets
        if _in(target, "edge") or _in(target, "streaming")
    )
    assert offenders == []


def _third_party_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module


def test_the_http_edge_knows_no_grpc() -> None:
    http_modules = {name: path for name, path in _modules().items() if _in(name, "edge.http")}
    assert "asr_server.edge.http.app" in http_modules  # guards the selection itself
    offenders = sorted(
        f"{module} -> {target}"
        for module, path in http_modules.items()
        for target in _third_party_imports(path)
        if target.split(".")[0] in ("grpc", "grpc_status", "qwenasr") or target.startswith("google.")
    )
    offenders += sorted(
        f"{module} -> {target}"
        for module in http_modules
        for target in _graph()[module]
        if _in(target, "edge") and not _in(target, "edge.http")
    )
    assert offenders == []


def test_no_import_circle() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert circles == []
