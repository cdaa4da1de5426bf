"""Predictions: start, watch and cancel background prediction jobs (they outlive this page)."""
import time

import pandas as pd
import streamlit as st

from pages import _ui

st.header("Predictions")
with _ui.guard():
    _ui.flash()
    cohort, _ = _ui.sidebar()
    if cohort:
        from core.engine.jobs import start_job
        from core.engine.modelhub import list_models

        models = list(list_models(_ui.settings().model_dirs))
        if not models:
            st.warning("No model checkpoints found: train one (`python -m core.cli train`) or add a folder "
                       "with model.pt + card.json to models/weights/.")
            st.stop()
        c1, c2, c3 = st.columns([2, 2, 1])
        model_id = c1.selectbox("Model", models, key="pj_model",
                                index=models.index(_ui.settings().default_model)
                                if _ui.settings().default_model in models else 0)
        min_tissue = c2.slider("Tissue a tile needs", 0.05, 1.0, 0.3, 0.05, key="pj_tissue")
        nuclei = c2.checkbox("Also count nuclei per tile", key="pj_nuclei",
                             help="Segments and classifies the nuclei of every tile while the model runs "
                                  "(about 10–20 ms per tile of CPU): nucleus maps on the Slide page.")
        if c3.button("Predict cohort", type="primary", key="pj_start",
                     help="Runs in the background; close this page whenever you like. Slides already "
                          "predicted are served from the cache; an interrupted job resumes."):
            job, started = start_job(_ui.store_path(), cohort, model_id, min_tissue=min_tissue, nuclei=nuclei)
            st.session_state["flash"] = ("Job started: it runs in the background." if started else
                                         "This prediction is already running (maybe from another session): "
                                         "showing it below.")
            st.rerun()

    def _eta(seconds) -> str:
        if seconds is None:
            return "—"
        seconds = int(seconds)
        return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"

    @st.fragment(run_every=1.0)
    def jobs_panel():
        from core.engine.jobs import list_jobs

        if _ui.ingest_pending():
            st.toast("New predictions are in the store.")
        jobs = list_jobs(_ui.store_path())
        if not jobs:
            st.caption("No prediction jobs yet.")
            return
        rows = []
        for job in jobs:
            s = job.status
            with st.container(border=True):
                top = st.columns([3, 1])
                top[0].markdown(f"**{s.get('cohort', '?')}** · {s.get('model', '?')} · `{s['status']}`")
                if job.active and top[1].button("Cancel", key=f"cancel_{job.id}"):
                    job.cancel()
                total, done = int(s.get("total") or 0), int(s.get("done") or 0)
                if job.active:
                    st.progress(done / total if total else 0.0,
                                text=f"{done:,} / {total:,} tiles · {s.get('tiles_per_s', 0):.0f} tiles/s · "
                                     f"ETA {_eta(s.get('eta_s'))} · {s.get('slide', '')}")
                elif s.get("message"):
                    (st.error if s["status"] == "failed" else st.caption)(s["message"])
            rows.append({"job": job.id, "cohort": s.get("cohort"), "model": s.get("model"), "status": s["status"],
                         "tiles": done, "started": time.strftime("%H:%M:%S", time.localtime(s.get("started", 0)))})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

    st.subheader("Jobs")
    jobs_panel()
