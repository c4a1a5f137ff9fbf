"""The package's layering, checked from the code's own imports (lazy and TYPE_CHECKING ones too).

Layers, bottom to top (docs/architecture.md, "Modules"): a module imports only from its
own layer or below; the collector and the TUI import only the layers named for them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# folder on disk -> the package name it installs as
SOURCES = {"expman": "expman", "collector": "expman.collector", "tui": "expman.tui"}

LAYERS = [
    {"expman._errors", "expman._version", "expman._env", "expman._options"},
    {"expman._wire"},
    {"expman._storage"},
    {"expman._reader"},
    {"expman._rank"},
    {"expman._compat"},
    {"expman._cli"},
    {"expman", "expman.__main__", "expman.notebook", "expman.integrations"},
]
COLLECTOR_MAY_IMPORT = {"expman._errors", "expman._version", "expman._env", "expman._options", "expman._wire", "expman._storage"}
TUI_MAY_IMPORT = {"expman", "expman._errors", "expman._version", "expman._env", "expman._options", "expman._storage", "expman._reader"}


def module_name(path: Path) -> str:
    folder = path.relative_to(REPO).parts[0]
    parts = [SOURCES[folder], *path.relative_to(REPO / folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    found = {}
    for folder in SOURCES:
        for path in (REPO / folder).rglob("*.py"):
            found[module_name(path)] = path
    return found


MODULES = all_modules()


def imports_of(name: str, path: Path) -> set[str]:
    """Every expman module `name` imports, wherever the import statement sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t == "expman" or t.startswith("expman."))
    out.discard(name)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "expman"):
            return index
        if module == "expman" and "expman" in members:
            return index
    return None


def owner(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def test_every_expman_module_has_a_layer():
    side = ("expman.collector", "expman.tui")
    unplaced = [m for m in MODULES if not m.startswith(side) and layer_of(m) is None]
    assert unplaced == []


def test_imports_only_go_down():
    upward = []
    for name, targets in GRAPH.items():
        if name.startswith(("expman.collector", "expman.tui")):
            continue
        for target in targets:
            if target.startswith(("expman.collector", "expman.tui")):
                upward.append(f"{name} -> {target} (the rank side never imports the collector or the TUI)")
            elif layer_of(target) > layer_of(name):
                upward.append(f"{name} -> {target}")
    assert upward == []


@pytest.mark.parametrize("side, allowed", [("expman.collector", COLLECTOR_MAY_IMPORT), ("expman.tui", TUI_MAY_IMPORT)])
def test_collector_and_tui_import_only_their_layers(side, allowed):
    wrong = []
    for name, targets in GRAPH.items():
        if not name.startswith(side):
            continue
        for target in targets:
            if target.startswith(side):
                continue
            if target.startswith(("expman.collector", "expman.tui")) or not owner(target, allowed):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    """No module reaches itself through its imports (a package's __init__ counts as a module)."""
    cycles = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                cycles.add(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    # the public door re-exports from below; submodules that import `expman` for its public
    # names (integrations, the TUI) are above it, not in a cycle with it
    cycles = {c for c in cycles if not c.startswith("expman -> ") and " -> expman -> " not in c}
    assert sorted(cycles) == []


def test_architecture_doc_lists_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in MODULES.values()
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.relative_to(REPO)}`" not in text]
    assert missing == []
