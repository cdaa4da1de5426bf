"""AppTest of the "Measured vs predicted" page on the tiny demo world's ST sections."""
import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.safety import md_escape

from tests.app.test_pages import app_env, assert_clean, monkeypatch_module  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def run_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / "measured.py"), default_timeout=180)
    at.run()
    return at


def maps(at: AppTest) -> dict:
    """The side-by-side maps' figure (the first plotly chart) as a dict."""
    return json.loads(at.get("plotly_chart")[0].proto.spec)


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed array ``{"dtype": "f4", "bdata": base64}``."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(float)
    return np.asarray(value, float)


def spot_colours(fig: dict) -> list[np.ndarray]:
    return [_array(t["marker"]["color"]) for t in fig["data"] if t["type"] == "scatter"]


@pytest.fixture(scope="module")
def page(app_env):  # noqa: F811
    at = run_page()
    assert_clean(at)
    return at


def test_renders_a_demo_section_best_gene_first_on_one_scale(page, app_env):  # noqa: F811
    at = page
    section = Path(at.selectbox(key="mv_section").value)
    assert section.parent == (app_env.demo_dir / "st").resolve()
    table = at.dataframe[0].value
    assert list(table.columns[:3]) == ["gene", "pearson_r", "spearman_rho"]
    assert at.selectbox(key="mv_gene").value == table["gene"].iloc[0]
    assert table["pearson_r"].iloc[0] == table["pearson_r"].max()
    fig = maps(at)
    measured, predicted = spot_colours(fig)
    both = np.concatenate([measured, predicted])
    axis = fig["layout"]["coloraxis"]     # one scale: the robust (2–98 %) range of both maps together
    assert axis["cmin"] == pytest.approx(np.percentile(both, 2), rel=1e-5)
    assert axis["cmax"] == pytest.approx(np.percentile(both, 98), rel=1e-5)
    assert [t["marker"]["coloraxis"] for t in fig["data"] if t["type"] == "scatter"] == ["coloraxis"] * 2
    assert at.get("download_button")


def test_switching_gene_updates_the_maps(page):
    at = page
    before = maps(at)
    genes = list(at.selectbox(key="mv_gene").options)
    other = genes[-1]
    at.selectbox(key="mv_gene").select(other).run()
    assert_clean(at)
    after = maps(at)
    titles = [a["text"] for a in after["layout"]["annotations"]]
    assert titles == [f"measured {other}", f"predicted {other}"]
    assert not np.allclose(spot_colours(after)[0], spot_colours(before)[0])
    assert any(md_escape(other) in c.value for c in at.caption)


def test_typed_path_inside_the_roots_is_used(app_env):  # noqa: F811
    at = run_page()
    typed = sorted((app_env.demo_dir / "st").iterdir())[-1]   # not the section picked by default
    at.text_input(key="mv_path").input(str(typed)).run()
    assert_clean(at)
    assert any(md_escape(typed.name) in c.value for c in at.caption)   # captions escape Markdown


def test_a_path_outside_the_data_roots_is_refused(app_env):  # noqa: F811
    at = run_page()
    at.text_input(key="mv_path").input("/etc").run()
    assert not at.exception
    assert any("reads only inside its data folders" in e.value for e in at.error), [e.value for e in at.error]
    assert not at.get("plotly_chart")
