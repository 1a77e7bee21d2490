"""The architecture, enforced: who may import whom, and who writes what.

* nothing in the framework (``src/asyncdmabuf``) imports ``asyncdmabuf.exporters``;
* the exporters (``exporters/``) import only ``asyncdmabuf`` and
  ``asyncdmabuf.lowlevel``, exactly as a third-party exporter must;
* no module writes private attributes that another module defines
  (``x._y = ...`` where ``_y`` is not a slot or ``self._y`` of this module).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORK = ROOT / "src" / "asyncdmabuf"
EXPORTERS = ROOT / "exporters"


def _modules(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*.py")):
        if path.is_relative_to(FRAMEWORK / "exporters"):
            continue  # the symlink to exporters/
        yield path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, absolute, with its line number."""
    package = ".".join(path.relative_to(path.parents[0]).parts[:-1])
    tree = ast.parse(path.read_text(), str(path))
    if path.is_relative_to(FRAMEWORK):
        parts = ("asyncdmabuf", *path.parent.relative_to(FRAMEWORK).parts)
    else:
        parts = ("asyncdmabuf", "exporters", *path.parent.relative_to(EXPORTERS).parts)
    package = ".".join(p for p in parts if p)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"


def test_the_framework_never_imports_the_exporters() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _modules(FRAMEWORK)
        for line, name in _imports(path)
        if name == "asyncdmabuf.exporters" or name.startswith("asyncdmabuf.exporters.")
    ]
    assert not found, "\n".join(found)


def test_exporters_use_only_the_public_api() -> None:
    found = []
    for path in _modules(EXPORTERS):
        for line, name in _imports(path):
            if not name.startswith("asyncdmabuf"):
                continue
            if name.startswith("asyncdmabuf.exporters"):
                continue  # their own package
            parts = name.split(".")
            if any(part.startswith("_") for part in parts[1:2]):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
            if len(parts) > 2 and parts[1] == "lowlevel":
                continue
    assert not found, "\n".join(found)


def _own_privates(tree: ast.Module) -> set[str]:
    """The private attributes a module defines: its slots and ``self._x`` stores."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                target = item.target if isinstance(item, ast.AnnAssign) else None
                if isinstance(target, ast.Name):
                    names.add(target.id)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            for const in ast.walk(node.value):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    names.add(const.value)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return names


def _private_writes(path: Path) -> Iterator[str]:
    """Stores ``x._y = ...`` of a private ``_y`` that this module does not define."""
    tree = ast.parse(path.read_text(), str(path))
    own = _own_privates(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store | ast.Del)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in own
        ):
            yield f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


@pytest.mark.parametrize("top", [FRAMEWORK, EXPORTERS], ids=["framework", "exporters"])
def test_no_module_writes_another_objects_privates(top: Path) -> None:
    found = [hit for path in _modules(top) for hit in _private_writes(path)]
    assert not found, "\n".join(found)
