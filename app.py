"""Tessera — router only: page config and navigation over pages/ (each page draws the sidebar's
cohort and model pickers through ``pages._ui.sidebar``, which keeps the choice across pages)."""
import streamlit as st

st.set_page_config(page_title="Tessera", page_icon=":material/grid_view:", layout="wide")

PAGES = [
    st.Page("pages/cohort.py", title="Cohort", icon=":material/table_view:", default=True),
    st.Page("pages/slide.py", title="Slide", icon=":material/biotech:"),
    st.Page("pages/crossmodal.py", title="Cross-modal", icon=":material/sync_alt:"),
    st.Page("pages/survival.py", title="Survival", icon=":material/monitoring:"),
    st.Page("pages/associations.py", title="Associations", icon=":material/scatter_plot:"),
    st.Page("pages/measured.py", title="Measured vs predicted", icon=":material/compare:"),
    st.Page("pages/predictions.py", title="Predictions", icon=":material/play_circle:"),
    st.Page("pages/importer.py", title="Import", icon=":material/upload_file:"),
]

from pages import _ui  # noqa: E402

_ui.exposure_check()   # an open address without login is refused (README: Deploying for a team)
_ui.role()             # with login configured: nothing shows before the user signs in
st.sidebar.title("Tessera")
st.sidebar.caption("Gene expression predicted from H&E, across a cohort.")
st.navigation(PAGES).run()
