"""Architecture rules: core/ and models/ never import streamlit; models/ never imports core."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package,forbidden", [("core", {"streamlit"}), ("models", {"streamlit", "core", "openslide"}),
                                               ("pages", {"duckdb", "openslide", "torch"})])
def test_layering(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        assert not imports(path) & forbidden, f"{path.relative_to(ROOT)} imports {imports(path) & forbidden}"


def test_only_store_imports_duckdb():
    users = [p.relative_to(ROOT).as_posix() for p in (ROOT / "core").rglob("*.py") if "duckdb" in imports(p)]
    assert users == ["core/store/db.py"]
