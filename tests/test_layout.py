"""The package's shape: the README's layout block names every subpackage, and no two modules import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvpress"
# No two-file circle is left (a dense layer turning ragged finds RaggedStorage through the storage registry).
KNOWN_CIRCLES: set[tuple[str, str]] = set()


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: kvpress modules it imports}``, lazy (in-function) and type-checking imports included."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        out[name] = found
    return out


def test_no_two_modules_import_each_other():
    graph = imports()
    circles = {tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
               if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))}
    assert circles == KNOWN_CIRCLES, sorted(circles - KNOWN_CIRCLES)


def test_readme_layout_lists_every_subpackage():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"^\s+([a-z_]+)/", block, re.M))
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages <= listed, sorted(subpackages - listed)


def test_every_kvpress_import_in_the_package_benchmarks_and_notebooks_resolves():
    """Names imported from kvpress (module level or inside functions, as the benchmarks' lazy imports are) exist:
    a refactor that moves a helper cannot leave a script that fails only when run (soak.py did)."""
    import ast
    import importlib

    root = Path(__file__).resolve().parents[1]
    files = [*root.joinpath("kvpress").rglob("*.py"), *root.joinpath("benchmarks").glob("*.py"),
             *root.joinpath("notebooks").glob("*.py")]
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kvpress")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as err:
                missing.append(f"{path.relative_to(root)}: {node.module} ({err})")
                continue
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{path.relative_to(root)}: {node.module}.{alias.name}")
    assert not missing, missing
