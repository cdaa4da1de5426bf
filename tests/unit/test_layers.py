"""Architecture rules, read from the source (every import statement, module level or inside a
function): arrows point down only, ``app.py → pages → core.analysis/engine/cohort/training →
core.store/wsi → models``; only the store imports duckdb; core/ and models/ never import streamlit;
models/ never imports core. A failure names the file, the line and the offending import."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BASE = {"core.config", "core.errors", "core.vocab", "core.safety"}   # importable from every layer; they import no project code
# What each part of core/ may import besides itself (and the standard library / third-party packages).
ALLOWED = {
    "core.config": set(), "core.errors": set(), "core.vocab": set(), "core.safety": {"core.errors"},
    "core.wsi": BASE,
    "core.store": BASE,
    "core.cohort": BASE | {"core.wsi", "core.store"},
    "core.analysis": BASE | {"core.wsi", "core.store"},
    "core.engine": BASE | {"core.wsi", "core.store", "core.analysis", "models"},   # analysis: slide summaries at ingest
    "core.training": BASE | {"core.wsi", "core.engine", "core.analysis", "core.synth", "models"},  # engine: the model hub; analysis, synth: cells scored on the demo truth
    "core.synth": BASE | {"core.wsi"},                                             # wsi: the true bulk uses the engine's tiling
    "core.export": BASE | {"core.wsi", "core.store", "core.analysis"},             # files of what analysis computes
    "core.viewer": BASE | {"core.wsi"},                                            # tiles read from the slide
    "core.demo": None, "core.cli": None, "core.cli_analysis": None,               # the top: anything in core
    "core.cli_export": None, "core.cli_cells": None, "core.cli_query": None, "core.cli_domains": None, "core.cli_measured": None, "core.cli_signatures": None,
}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; relative imports resolved against its package."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def part_of(module: str) -> str | None:
    """``core.engine.plan`` → ``core.engine``; ``core.cli`` → ``core.cli``; ``models.x`` → ``models``."""
    parts = module.split(".")
    if parts[0] == "models":
        return "models"
    if parts[0] != "core" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def offending(package: str, rule, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imports(path, root):
            if rule(path.relative_to(root), module):
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package,forbidden", [("core", {"streamlit"}), ("models", {"streamlit", "core", "openslide"}),
                                               ("pages", {"duckdb", "openslide", "torch"})])
def test_layering(package, forbidden):
    bad = offending(package, lambda path, module: module.split(".")[0] in forbidden)
    assert not bad, "\n".join(bad)


def test_only_store_imports_duckdb():
    bad = offending("core", lambda path, module: module.split(".")[0] == "duckdb"
                    and not path.as_posix().startswith("core/store/"))
    assert not bad, "only core/store/ may import duckdb:\n" + "\n".join(bad)


def test_every_part_of_core_has_a_rule():
    parts = {part_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in (ROOT / "core").rglob("*.py")}
    assert parts - {None, "core.__init__"} <= set(ALLOWED), sorted(parts - set(ALLOWED))


def against_the_arrows(path: Path, module: str) -> bool:
    own = part_of(".".join(path.with_suffix("").parts))
    target = part_of(module)
    allowed = ALLOWED.get(own)
    if target is None or target == own or allowed is None:
        return False
    return target not in allowed


def test_arrows_point_down():
    bad = offending("core", against_the_arrows)
    assert not bad, "imports against the arrows (see ALLOWED in this test):\n" + "\n".join(bad)


def test_pages_call_functions_not_strings():
    """Pages pass functions to the cached query helper, never ``"module:function"`` strings."""
    bad = []
    for path in sorted((ROOT / "pages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    (node.value.startswith("core.") and ":" in node.value or node.value.startswith("store:")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not bad, "\n".join(bad)


def test_the_rule_names_the_offender(tmp_path):
    """The check itself, on a small fake tree: a store module importing the analysis layer inside a
    function, and a wsi module importing the store, are reported with file and line; an allowed
    import (cohort → store) is not."""
    (tmp_path / "core" / "store").mkdir(parents=True)
    (tmp_path / "core" / "wsi").mkdir()
    (tmp_path / "core" / "cohort").mkdir()
    (tmp_path / "core" / "store" / "db.py").write_text("import json\n\n\ndef f():\n    from core.analysis.survival import km_curve\n")
    (tmp_path / "core" / "wsi" / "slide.py").write_text("from ..store.db import Store\n")
    (tmp_path / "core" / "cohort" / "importer.py").write_text("from core.store.db import Store\n")
    assert offending("core", against_the_arrows, tmp_path) == [
        "core/store/db.py:5 imports core.analysis.survival", "core/wsi/slide.py:1 imports core.store.db"]
