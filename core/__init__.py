"""Tessera core: pure Python logic (never imports streamlit)."""
