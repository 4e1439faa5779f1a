"""The package's modules import one another without a cycle, and the parts keep their distances.

Read from the source with ``ast``: every import statement counts, at the top of a module, inside
a function or under ``if TYPE_CHECKING``, since a lazy import hides a cycle rather than removing it.
``from .pkg import name`` is an arrow to the module ``pkg.name`` when there is one, else to ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "safelora_cli"


def _modules() -> dict[str, Path]:
    """Every module by dotted name below the package (``run.pipeline``; a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name.removeprefix("safelora_cli.") for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                    where = ".".join(base)
                else:
                    where = (node.module or "").removeprefix("safelora_cli.")
                for alias in node.names:
                    sub = f"{where}.{alias.name}" if where else alias.name
                    targets.add(sub if sub in modules else where)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_graph_sees_lazy_and_type_checking_imports() -> None:
    graph = _graph()
    assert "outputs.report" in graph["api"]  # imported under TYPE_CHECKING only
    assert "run.pipeline" in graph["api"]  # imported inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_back() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_command_line_goes_through_the_api() -> None:
    allowed = {"api", "errors", "_version"}
    for module, targets in _graph().items():
        if module == "cli" or module.startswith("cli."):
            wrong = sorted(t for t in targets if t not in allowed and not t.startswith("cli"))
            assert not wrong, f"{module} imports {wrong}: the CLI imports only itself, api, errors and _version"


@pytest.mark.parametrize(
    ("part", "never", "why"),
    [
        ("results", ("adapters", "api", "cli", "io", "outputs", "run", "sources", "stores"), "results are plain data"),
        ("outputs", ("run", "api", "cli", "adapters", "sources", "stores"), "outputs render a finished Report"),
        ("stores", ("outputs", "adapters", "run", "api", "cli"), "a store keeps bytes; restore is a use case"),
        ("run", ("api", "cli"), "the core never imports the package face"),
        ("sources", ("run", "api", "cli", "stores", "adapters", "outputs"), "sources know nothing of the run"),
        ("adapters", ("sources", "run", "api", "cli", "stores", "outputs"), "an adapter knows no checkpoints"),
        ("projection", ("io", "sources", "adapters", "stores", "run", "outputs", "api", "cli"), "no I/O in the math"),
        (
            "attest",
            ("run", "api", "cli", "stores", "outputs"),
            "an attestation knows keys, envelopes and adapters; its use cases are run's",
        ),
        ("integrations", ("run", "adapters", "sources", "stores", "outputs", "cli"), "integrations use the API alone"),
        ("evaluation", ("api", "cli", "integrations", "sources"), "an evaluation loads a model with transformers"),
        (
            "io",
            ("adapters", "sources", "stores", "run", "outputs", "results", "api", "cli", "projection"),
            "the file layer moves bytes",
        ),
    ],
)
def test_parts_keep_their_distance(part: str, never: tuple[str, ...], why: str) -> None:
    for module, targets in _graph().items():
        if module == part or module.startswith(part + "."):
            wrong = sorted(t for t in targets if t.split(".")[0] in never)
            assert not wrong, f"{module} imports {wrong}: {why}"


def test_the_file_layer_knows_no_format() -> None:
    codecs = {"io.stfile", "io.strict"}
    for module, targets in _graph().items():
        if module.startswith("io.") and module not in codecs:
            assert not targets & codecs, f"{module} imports {sorted(targets & codecs)}: the file layer moves bytes"
