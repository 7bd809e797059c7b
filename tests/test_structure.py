"""Rules of the code's structure, checked on the source (AST): each module's private names stay its own, and test
files share helpers only through conftest.py."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("fastmim_ds", "benchmarks", "studies", "data_prep")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    return files + sorted((REPO / "tests").glob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = parts[1:] if parts[0] == "tests" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """Absolute module name of ``from <module> import ...`` inside module ``here``."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _project(module: str, test_modules: set[str]) -> bool:
    return module.split(".")[0] in PACKAGES or module in test_modules


def private_imports(path: Path, test_modules: set[str], here: str = "") -> list[str]:
    """``file:line: what`` for each use of another project module's private name in ``path`` (module ``here``,
    by default the one its location names)."""
    here = here or _module_name(path)
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    tree = ast.parse(path.read_text(), filename=str(path))
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _resolve(node, here, path.name == "__init__.py")
            if not _project(module, test_modules) or module == here:
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {module} import {alias.name}")
                module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _project(alias.name, test_modules):
                    module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases):
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    found = [hit for path in _sources() for hit in private_imports(path, test_modules)]
    assert not found, "private names used across modules (make them public or move the code):\n" + "\n".join(found)


def test_test_files_share_helpers_only_through_conftest():
    test_modules = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and not node.level else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}:{node.lineno}: imports {n}" for n in names if n in test_modules]
    assert not found, "move shared test helpers into tests/conftest.py:\n" + "\n".join(found)


def test_the_rule_catches_what_it_is_for(tmp_path):
    """The checker itself: a private import, private attributes of imported modules; its own names and public
    ones pass."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .checkpoint import _tags\nfrom . import runtime as rt\nimport fastmim_ds.config as c\n"
                     "from .probe import _mine\nx = rt._x\ny = c._coerce\nz = rt.public, c.__name__\n")
    hits = private_imports(probe, set(), here="fastmim_ds.probe")
    assert [h.split(": ", 1)[1] for h in hits] == [
        "from fastmim_ds.checkpoint import _tags", "rt._x", "c._coerce"]
