"""Predictions: start, watch and cancel background prediction jobs (they outlive this page)."""
import time

import pandas as pd
import streamlit as st

from core.vocab import MIN_TISSUE
from pages import _ui

st.header("Predictions")
with _ui.guard():
    _ui.flash()
    cohort, _ = _ui.sidebar()
    if cohort and _ui.role() != "operator":
        st.info("Starting predictions is for operators; you can watch the jobs below.")
    elif cohort:
        from core.engine.jobs import list_jobs, start_job
        from core.engine.modelhub import list_cards

        cards = list_cards(_ui.settings().model_dirs)
        if not cards:
            st.warning("No model checkpoints found: train one (`python -m core.cli train`) or add a folder "
                       "with model.pt + card.json to models/weights/.")
            st.stop()
        models = list(cards)
        c1, c2, c3 = st.columns([2, 2, 1])
        model_id = c1.selectbox("Model", models, key="pj_model",
                                index=models.index(_ui.settings().default_model)
                                if _ui.settings().default_model in models else 0,
                                format_func=lambda m: _ui.model_label(f"{m}@{cards[m].get('version', '')}"))
        min_tissue = c2.slider("Tissue a tile needs", 0.05, 1.0, MIN_TISSUE, 0.05, key="pj_tissue")
        nuclei = c2.checkbox("Also count nuclei per tile", key="pj_nuclei",
                             help="Segments and classifies the nuclei of every tile while the model runs "
                                  "(about 10–20 ms per tile of CPU): nucleus maps on the Slide page.")
        if c3.button("Predict cohort", type="primary", key="pj_start",
                     help="Runs in the background; close this page whenever you like. Slides already "
                          "predicted are served from the cache; an interrupted job resumes."):
            running = [j for j in list_jobs(_ui.store_path()) if j.active]
            cap = _ui.settings().max_jobs
            if len(running) >= cap:
                st.warning(f"{len(running)} prediction jobs are running on this server (the cap is {cap}, "
                           "TESSERA_MAX_JOBS): wait for one to finish, or cancel one below.")
            else:
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
        active = {job.id for job in jobs if job.active}
        if st.session_state.get("_active_jobs", set()) - active:
            # a job ended: rerun the whole page, so its "started" banner goes and the pickers see new runs
            st.session_state["_active_jobs"] = active
            st.rerun(scope="app")
        st.session_state["_active_jobs"] = active
        if not jobs:
            st.caption("No prediction jobs yet.")
            return
        rows = []
        for job in jobs:
            s = job.status
            with st.container(border=True):
                top = st.columns([3, 1])
                top[0].markdown(f"**{_ui.md_escape(s.cohort or '?')}** · "
                                f"{_ui.md_escape(_ui.model_label(s.model)) if s.model else '?'} · `{s.status}`")
                if s.active and top[1].button("Cancel", key=f"cancel_{job.id}"):
                    job.cancel()
                if s.active and not s.total:
                    st.progress(0.0, text="Planning: checking which slides need work (content hash, tissue grid)…")
                elif s.active:
                    st.progress(s.done / s.total,
                                text=f"{s.done:,} / {s.total:,} tiles · {s.tiles_per_s:.0f} tiles/s · "
                                     f"ETA {_eta(s.eta_s)} · {s.slide}")
                elif s.message:
                    (st.error if s.status == "failed" else st.caption)(s.message)
            rows.append({"job": job.id, "cohort": s.cohort, "model": s.model, "status": s.status,
                         "tiles": s.done, "started": time.strftime("%H:%M:%S", time.localtime(s.started))})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

    st.subheader("Jobs")
    jobs_panel()

    from core.engine.access import StoreAccess

    held = StoreAccess(_ui.store_path()).quarantined() if _ui.store_path().exists() else []
    if held:
        st.subheader(f"Quarantined runs ({len(held)})")
        st.caption("Finished runs that could not be stored (a damaged chunk or marker, or a store that refused "
                   "them three times). The other runs went in; these are kept aside with the reason. Predict "
                   "the slide again, or restore a run once the cause is fixed.")
        st.dataframe(pd.DataFrame([{"slide": q["slide"], "run": q["run_key"][:16], "stage": q["stage"],
                                    "reason": q["reason"],
                                    "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(q["time"]))}
                                   for q in held]), hide_index=True, width="stretch", key="pj_quarantine")
