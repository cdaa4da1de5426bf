"""Background prediction jobs: started from the page, deduplicated across sessions, cancellable."""
import time

from tests.app.test_pages import app_env, monkeypatch_module, run_page  # noqa: F401  (fixtures)


def test_start_job_from_the_page_and_watch_it_finish(app_env):  # noqa: F811
    from core.engine.jobs import list_jobs

    at = run_page("pages/predictions.py")
    assert not at.exception
    at.button(key="pj_start").click().run()
    assert not at.exception
    assert any("Job started" in s.value or "already running" in s.value for s in list(at.success) + list(at.info))
    [job] = list_jobs(app_env.store_path)
    status = job.wait(timeout=300)
    assert status.status == "done", status
    assert "served from the cache" in status.message  # the demo cohort is predicted already
    at.run()
    assert not at.exception


def test_second_request_attaches_then_cancel(app_env):  # noqa: F811
    from core.engine.jobs import start_job

    store = app_env.store_path
    # --force recomputes every slide: long enough to attach to and cancel
    first, started = start_job(store, "demo", "demo-synthetic", extra_args=["--force", "--workers", "0"])
    second, started_again = start_job(store, "demo", "demo-synthetic")
    assert started and not started_again and second.id == first.id
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.status.done == 0 and first.active:
        time.sleep(0.1)
    first.cancel()
    status = first.wait(timeout=240)
    assert status.status == "cancelled", status
    assert "stopped early" in status.message
