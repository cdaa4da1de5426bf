"""Building the built-in demo cohort: world → model → cohort import → predictions.

Each step is idempotent and keyed by what it produces: a second ``demo`` run finds the world,
the model and every prediction in place and does no work.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from core.config import Settings

log = logging.getLogger(__name__)
DEMO_MODEL = "demo-synthetic"
DEMO_COHORT = "demo"


def ensure_world(demo_dir: Path, *, seed: int, **world_kwargs) -> dict:
    from core.synth.world import build_world

    manifest_path = demo_dir / "world.json"
    if manifest_path.is_file():
        log.info("demo world: present (%s), skipped", demo_dir)
        return json.loads(manifest_path.read_text())
    log.info("demo world: building in %s", demo_dir)
    return build_world(demo_dir, seed=seed, **world_kwargs)


def ensure_model(demo_dir: Path, manifest: dict, *, seed: int, epochs: int = 40) -> Path:
    """Train the demo model on the world's ST sections, holding the last one out for metrics."""
    import anndata as ad

    from core.training.stdata import find_sections
    from core.training.fit import train_on_sections, training_section
    from core.training.reference import reference_profiles
    from models.scist import ModelCard, save_checkpoint

    out = demo_dir / "models" / DEMO_MODEL
    if (out / "card.json").is_file():
        log.info("demo model: present (%s), skipped", out)
        return out
    tile_um, mpp = 112.0, 1.0
    genes, types = manifest["genes"], manifest["cell_types"]
    reference = ad.read_h5ad(demo_dir / "reference" / "reference.h5ad")
    profiles, _ = reference_profiles(reference, genes, types)
    sections = [training_section(s, genes, tile_um=tile_um, mpp=mpp, cell_types=types)
                for s in find_sections(demo_dir / "st")]
    held_out = sections[-1].name
    model, metrics = train_on_sections(sections, profiles, held_out=held_out, epochs=epochs, seed=seed)
    card = ModelCard(
        model_id=DEMO_MODEL, genes=genes, cell_types=types, encoder=model.encoder_name,
        tile_um=tile_um, mpp=mpp, input_px=int(round(tile_um / mpp)),
        training_data={"source": "Tessera synthetic demo world", "seed": manifest.get("seed"),
                       "sections": [s.name for s in sections if s.name != held_out], "held_out": held_out},
        metrics=metrics,
        description="SciSt-style fusion (the same architecture as breast-her2st): learned composition × "
                    "synthetic reference profiles as a query token, two-way attention over frozen ImageNet "
                    "EfficientNet-Lite0 feature-map tokens, residual MLP to the panel; trained on synthetic ST sections.")
    save_checkpoint(out, model.head, card, joint=model.joint)
    log.info("demo model: trained, held-out %s mean PCC %.3f", held_out, metrics["held_out"][held_out]["mean_pcc"])
    return out


def demo_bulk(demo_dir: Path) -> Path:
    """``truth/bulk.csv``: the demo world's true per-patient expression (genes × patients), written once."""
    from core.synth.bulk import true_bulk

    path = demo_dir / "truth" / "bulk.csv"
    if not path.exists():
        tmp = path.with_suffix(".tmp.csv")
        true_bulk(demo_dir).to_csv(tmp)
        tmp.replace(path)
    return path


DEMO_CELL_SLIDES = 12      # the first usable slides also get a cells run (``predict --cells``)
DEMO_HIRES_SLIDES = 2      # … and the first of those a high-resolution run at stride ½


def ensure_typer(model, demo_dir: Path, *, seed: int) -> Path:
    """The learned per-nucleus typer beside the demo model (``cell_typer.json``), fitted once on
    the world's ST sections (:func:`core.training.cell_eval.train_typer`); the demo slides, on
    which ``cells evaluate-demo`` scores it, are not used."""
    from core.training.cell_eval import train_typer

    path = Path(model.directory) / "cell_typer.json"
    if path.is_file():
        log.info("demo cell typer: present (%s), skipped", path)
        return path
    typer, n = train_typer(model, demo_dir, seed=seed)
    tmp = path.with_suffix(".tmp.json")
    typer.save(tmp)
    tmp.replace(path)
    log.info("demo cell typer: trained on %d cells of the ST sections", n)
    return path


def predict_demo_cells(settings: Settings, model, *, n_cells: int, n_hires: int, progress=None) -> list:
    """Cells runs for the first ``n_cells`` usable slides and stride-½ runs for the first
    ``n_hires``, through the same engine path as ``predict --cells`` / ``--stride 0.5``."""
    from core.engine.access import StoreAccess
    from core.engine.plan import usable_slides
    from core.engine.predict import predict_slides

    with StoreAccess(settings.store_path).open(wait_s=5.0, or_read_only=True) as st:
        pairs = usable_slides(st, DEMO_COHORT)
    common = dict(device=settings.device, batch_size=settings.batch_size, workers=settings.workers, progress=progress)
    results = []
    if n_cells:
        results += predict_slides(settings.store_path, pairs[:n_cells], model, tiling=model.tiling(), cells=True, **common)
    if n_hires:
        results += predict_slides(settings.store_path, pairs[:n_hires], model, tiling=model.tiling(stride=0.5), **common)
    return results


def build_demo(settings: Settings, *, world_kwargs: dict | None = None, epochs: int = 40,
               progress=None, cell_slides: int = DEMO_CELL_SLIDES, hires_slides: int = DEMO_HIRES_SLIDES) -> dict:
    """Run every step; returns counts of computed vs cached slides and the timings. With
    ``cell_slides`` > 0 the demo model also ships its learned cell typer and that many slides get
    cells runs; ``hires_slides`` of them get a stride-½ run."""
    from core.cohort.importer import import_cohort, import_measured
    from core.engine.modelhub import load_model
    from core.engine.predict import predict_cohort
    from core.store.db import Store

    timings = {}
    t = time.perf_counter()
    manifest = ensure_world(settings.demo_dir, seed=settings.seed, **(world_kwargs or {}))
    timings["world_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ensure_model(settings.demo_dir, manifest, seed=settings.seed, epochs=epochs)
    timings["model_s"] = time.perf_counter() - t
    model = load_model(DEMO_MODEL, settings.model_dirs)
    if cell_slides:
        t = time.perf_counter()
        ensure_typer(model, settings.demo_dir, seed=settings.seed)
        timings["typer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    demo = settings.demo_dir
    with Store(settings.store_path) as store:
        if DEMO_COHORT not in store.cohorts():
            import_cohort(store, DEMO_COHORT, demo / "slides", demo / "clinical" / "clinical.csv",
                          fmt="tcga-cdr", tiling=model.tiling())
        if not store.measured_genes(DEMO_COHORT):
            # the demo's "measured RNA" is the world's true bulk expression, so validation compares with truth
            import_measured(store, DEMO_COHORT, demo_bulk(demo))
    # by path: the engine opens the store only for moments, so the app can read meanwhile
    results = predict_cohort(settings.store_path, DEMO_COHORT, model, device=settings.device,
                             batch_size=settings.batch_size, workers=settings.workers, progress=progress)
    timings["predict_s"] = time.perf_counter() - t
    t = time.perf_counter()
    extra = predict_demo_cells(settings, model, n_cells=cell_slides, n_hires=min(hires_slides, cell_slides),
                               progress=progress) if cell_slides else []
    timings["cells_s"] = time.perf_counter() - t
    computed = [r for r in results + extra if r.status == "computed"]
    return {"slides": len(results), "computed": len(computed), "cached": len(results) + len(extra) - len(computed),
            "tiles": sum(r.n_tiles for r in results), "cell_runs": min(cell_slides, len(results)),
            "hires_runs": min(hires_slides, cell_slides, len(results)), **{k: round(v, 1) for k, v in timings.items()}}
