"""What comes from a browser: server paths inside the data roots, upload names, Markdown escaping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.config import load_settings
from core.safety import PathNotAllowedError, inside_roots, md_escape, safe_filename


def test_inside_roots(tmp_path):
    root = tmp_path / "data"
    (root / "cohort").mkdir(parents=True)
    (root / "cohort" / "a.csv").write_text("x")
    assert inside_roots(str(root / "cohort" / "a.csv"), (root,)) == (root / "cohort" / "a.csv").resolve()
    assert inside_roots(str(root), (root,)) == root.resolve()
    for bad in ("/", "/etc/passwd", str(root / ".." / "elsewhere"), str(tmp_path), "~", "\x00x"):
        with pytest.raises(PathNotAllowedError) as exc:
            inside_roots(bad, (root,))
        assert "passwd" not in str(exc.value) or bad == "/etc/passwd" and "root:" not in str(exc.value)
    (root / "escape").symlink_to("/etc")
    with pytest.raises(PathNotAllowedError, match="not inside"):
        inside_roots(str(root / "escape" / "passwd"), (root,))
    with pytest.raises(PathNotAllowedError, match="No such"):
        inside_roots(str(root / "missing.csv"), (root,))
    with pytest.raises(PathNotAllowedError, match="Give a"):
        inside_roots("  ", (root,))


def test_refusal_is_the_same_whether_or_not_the_file_exists(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    messages = set()
    for outside in ("/etc/passwd", "/etc/does-not-exist-xyz"):
        with pytest.raises(PathNotAllowedError) as exc:
            inside_roots(outside, (root,))
        messages.add(str(exc.value))
    assert len(messages) == 1


def test_default_roots_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("TESSERA_DATA_ROOTS", raising=False)
    s = load_settings(demo_dir=tmp_path / "demo")
    assert s.data_roots_or_default() == ((tmp_path / "demo").resolve(), s.data_dir)
    monkeypatch.setenv("TESSERA_DATA_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert load_settings().data_roots_or_default() == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
    monkeypatch.setenv("TESSERA_OPERATORS", "Ana@Example.org, bo@x.org")
    assert load_settings().operators == ("ana@example.org", "bo@x.org")


@pytest.mark.parametrize("name,expected", [
    ("clinical.csv", "clinical.csv"), ("../../etc/passwd", "passwd"), ("a/b\\c.tsv", "b_c.tsv"),
    ("..", "upload"), ("<script>.csv", "_script_.csv"), ("x" * 300 + ".xlsx", "x" * 110 + ".xlsx"),
    (".hidden", "hidden"), ("naïve data.csv", "na_ve data.csv")])
def test_safe_filename(name, expected):
    assert safe_filename(name) == expected


@pytest.mark.parametrize("text", ["[click](javascript:alert(1))", "![img](http://x/y.png)", "**bold** _it_",
                                  "<b>html</b>", "# heading", "`code`", "a|b", "$x$"])
def test_md_escape_neutralises_markdown(text):
    out = md_escape(text)
    for ch in "[]()!*_<>#`|$":
        assert ch not in out.replace("\\" + ch, "")
