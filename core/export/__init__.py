"""Exports of predictions: AnnData (.h5ad), QuPath GeoJSON, tile tables (CSV/Parquet), map figures
(PNG/SVG). One function per format; the CLI (``python -m core.cli export``) and the pages call the same one."""
