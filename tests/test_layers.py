"""Each folder is a layer and every import points down (README's layout table, DESIGN.md).

Every import statement counts, inside functions and ``TYPE_CHECKING`` blocks too, so a lazy
import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "memckpt"

# lowest first; a module may import its own layer and any layer below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("_warnings", "ids", "settings", "errors", "collectives")),
    ("storage", ("storage",)),
    ("transport", ("transport",)),
    ("replication", ("replication",)),
    ("metrics", ("metrics",)),
    ("engine", ("engine",)),
    ("apis", ("__init__", "manager", "adapters")),
    ("schedule", ("schedule",)),
    ("tools", ("recipes", "tools", "__main__")),
]


def layer_of(module: str) -> int:
    """Layer index of a ``memckpt.x.y`` module name (``memckpt`` alone is the package API)."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: no layer in LAYERS; add its folder to the table")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts) if parts != ["memckpt", "__init__"] else "memckpt"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every memckpt import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("memckpt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "memckpt":  # from memckpt import ids -> memckpt.ids
                out += [(node.lineno, f"memckpt.{a.name}") for a in node.names]
            elif node.module.startswith("memckpt."):
                out.append((node.lineno, node.module))
    return out


def upward_edges() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for line, target in imported_modules(path):
            theirs = layer_of(target) if target.split(".")[1:2] != [""] else mine
            if theirs > mine:
                bad.append(
                    f"{path.relative_to(SRC.parent)}:{line}: {me} ({LAYERS[mine][0]}) imports "
                    f"{target} ({LAYERS[theirs][0]})"
                )
    return bad


def test_every_import_points_down_the_layers() -> None:
    assert upward_edges() == []


def test_every_package_folder_has_a_layer() -> None:
    for entry in SRC.iterdir():
        if entry.name.startswith("__pycache__"):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            layer_of(f"memckpt.{entry.stem}" if entry.stem != "__init__" else "memckpt")


def test_no_adapter_imports_another_adapters_private_names() -> None:
    bad = []
    for path in sorted((SRC / "adapters").rglob("*.py")):
        me = module_name(path)
        my_adapter = me.split(".")[2] if me.count(".") >= 2 else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module):
                continue
            parts = node.module.split(".")
            if parts[:2] != ["memckpt", "adapters"] or len(parts) < 3 or parts[2] == my_adapter:
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private:
                bad.append(f"{me} imports {private} from {node.module}")
    assert bad == []


@pytest.mark.parametrize(
    "name", ["SaveTransaction", "Ballot", "Vote", "NodeRuntime", "ObjectLocator"]
)
def test_engine_seams_come_from_the_engine_package_not_memckpt(name: str) -> None:
    import memckpt
    import memckpt.engine

    assert name not in memckpt.__all__
    assert hasattr(memckpt.engine, name)
