"""Tessera — router only: page config and navigation over pages/."""
import streamlit as st

st.set_page_config(page_title="Tessera", page_icon="🔬", layout="wide")

PAGES = [
    st.Page("pages/cohort.py", title="Cohort", icon="🗂️", default=True),
    st.Page("pages/slide.py", title="Slide", icon="🧫"),
    st.Page("pages/crossmodal.py", title="Cross-modal", icon="🔁"),
    st.Page("pages/survival.py", title="Survival", icon="📈"),
]

st.sidebar.title("Tessera")
st.sidebar.caption("Gene expression predicted from H&E, across a cohort.")
st.navigation(PAGES).run()
