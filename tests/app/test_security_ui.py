"""A shared server: an open address without login is refused; with login, viewers cannot import or
predict and operators can; typed names render as text, not Markdown."""
from pathlib import Path

import pytest
import streamlit as st
from streamlit import config
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import app_env, assert_clean, monkeypatch_module  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32,
        "client_id": "tessera", "client_secret": "s", "server_metadata_url": "https://idp.example/.well-known"}


@pytest.fixture
def open_address():
    before = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    yield
    config.set_option("server.address", before)


def app(page: str | None = None, *, user=None, auth: bool = False) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    if auth:
        at.secrets["auth"] = AUTH
    if user is not None:
        at.user = user
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def test_open_address_without_login_is_refused(app_env, open_address, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TESSERA_ALLOW_OPEN", raising=False)
    at = app()
    assert any("without login" in e.value for e in at.error)
    assert not at.get("selectbox")                    # no page content at all
    monkeypatch.setenv("TESSERA_ALLOW_OPEN", "1")     # a proxy in front authenticates
    at = app()
    assert_clean(at) and not at.error


def test_login_required_then_roles(app_env, monkeypatch):  # noqa: F811
    at = app(auth=True, user={"is_logged_in": False})
    assert any("Sign in" in i.value for i in at.info) and at.button(key="login")
    monkeypatch.setenv("TESSERA_OPERATORS", "op@hospital.org")
    st.cache_resource.clear()                        # settings are cached per server
    viewer = {"is_logged_in": True, "email": "viewer@hospital.org"}
    at = app("pages/importer.py", auth=True, user=viewer)
    assert any("for operators" in i.value for i in at.info) and not at.text_input
    at = app("pages/predictions.py", auth=True, user=viewer)
    assert any("for operators" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == "pj_start"]
    at = app("pages/survival.py", auth=True, user=viewer)   # viewers analyse
    assert_clean(at) and any(m.label == "Log-rank p" for m in at.metric)
    at = app("pages/importer.py", auth=True, user={"is_logged_in": True, "email": "OP@hospital.org"})
    assert_clean(at) and at.text_input(key="imp_name")
    st.cache_resource.clear()


def test_typed_text_is_not_markdown(app_env):  # noqa: F811
    at = app("pages/survival.py")
    at.selectbox(key="sv_km_kind").select("Signature").run()
    at.selectbox(key="sv_km_sig").select("custom…").run()
    at.text_input(key="sv_km_sig_genes").input("CD8A, [x](javascript:alert(1))").run()
    shown = " ".join(e.value for e in at.error)
    assert "javascript" in shown and "\\[x\\]\\(javascript" in shown   # escaped: rendered as literal text
