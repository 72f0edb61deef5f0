"""Layering of the package, checked on the import statements of the source files (no import needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "squall_sd"

#: Lower layer -> the higher layers it must not import.
FORBIDDEN = {
    "_sdata": ("tl", "train", "pl", "cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Return the absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            # `from squall_sd import tl` imports the subpackage
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _layer_files(layer: str) -> list[Path]:
    return sorted((SRC / layer).rglob("*.py"))


def test_imported_modules_sees_every_import_form():
    found = imported_modules(SRC / "_sdata" / "__init__.py")
    assert "squall_sd._sdata._keys" in found
    assert "squall_sd._constants" in imported_modules(SRC / "_sdata" / "_mpp.py")
    assert "squall_sd._sdata" in imported_modules(SRC / "io" / "_he.py")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layer_does_not_import_higher(layer):
    files = _layer_files(layer)
    assert files, f"no source files in squall_sd/{layer}"
    bad = []
    for path in files:
        for module in sorted(imported_modules(path)):
            for higher in FORBIDDEN[layer]:
                name = f"squall_sd.{higher}"
                if module == name or module.startswith(name + "."):
                    bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, f"squall_sd.{layer} must not import {FORBIDDEN[layer]}:\n" + "\n".join(bad)
