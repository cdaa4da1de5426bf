"""``--engine ray``: the same engine, spread over a Ray cluster, results in the same store.

Each Ray actor loads the model once and builds one :class:`core.engine.loop.Engine` (one actor per
GPU when the cluster has GPUs, else one per ``cpus_per_actor`` CPUs). The driver hands out small
groups of slides; an actor plans them (fingerprint, cache check, tissue grid — it reads the
store read-only), computes the missing chunks into the spool and returns. Only the driver
writes the store: it ingests each group's finished runs as the group returns. Slides, the store,
its spool and the model folder must be on a filesystem every node sees (NFS, Lustre, …).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

from core.engine.modelhub import LoadedModel
from core.engine.access import StoreAccess
from core.engine.plan import SlideResult, usable_slides

log = logging.getLogger(__name__)


def _actor_class():
    import ray

    @ray.remote
    class SlideWorker:
        def __init__(self, model_id: str, model_dirs: list[str], engine_kwargs: dict,
                     encoder_weights: str | None = None):
            import os

            import torch

            from core.engine.modelhub import load_model
            from core.engine.loop import Engine

            if engine_kwargs.get("device", "auto") != "cuda":  # CPU actors: one thread per CPU Ray gave us
                torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
            self.model = load_model(model_id, [Path(d) for d in model_dirs], encoder_weights=encoder_weights)
            self.engine = Engine(self.model, **engine_kwargs)

        def predict(self, store_path: str, slides: list, tiling: dict, force: bool, nuclei: bool = False,
                    cells: bool = False) -> list[dict]:
            from core.engine.predict import predict_slides
            from core.wsi.tiling import TilingParams

            results = predict_slides(store_path, slides, self.model, tiling=TilingParams(**tiling), force=force,
                                     engine=self.engine, ingest=False, nuclei=nuclei, cells=cells)
            return [asdict(r) for r in results]

    return SlideWorker


def predict_cohort_ray(store_path: str | Path, cohort: str, model: LoadedModel, *, address: str | None = None,
                       device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                       force: bool = False, min_tissue: float | None = None, runtime: str = "auto",
                       ingest_wait_s: float = 30.0, nuclei: bool = False, cpus_per_actor: int = 1, group_size: int = 4,
                       num_cpus: int | None = None, cells: bool = False, stride: float = 1.0) -> list[SlideResult]:
    """Predict a cohort over a Ray cluster (``address``, ``$RAY_ADDRESS``, or a new local instance)."""
    import ray
    from ray.util import ActorPool

    from core.config import load_settings

    access = StoreAccess(store_path)
    with access.open(5.0, or_read_only=True) as st:
        pairs = usable_slides(st, cohort)
    tiling = model.tiling(stride=float(stride), **({"min_tissue": min_tissue} if min_tissue is not None else {}))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 and device != "cpu"
        n_actors = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // cpus_per_actor)
        n_actors = max(1, min(n_actors, math.ceil(len(pairs) / group_size) or 1))
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}
        env = {"env_vars": {"OMP_NUM_THREADS": str(cpus_per_actor)}} if not use_gpu else {}
        engine_kwargs = {"device": "cuda" if use_gpu else "cpu", "batch_size": batch_size,
                         "workers": workers if workers is not None else 0, "runtime": runtime}
        model_dirs = [str(d) for d in load_settings().model_dirs]
        worker_cls = _actor_class()
        actors = [worker_cls.options(**options, runtime_env=env or None).remote(model.model_id, model_dirs, engine_kwargs,
                                                                                      model.encoder_weights)
                  for _ in range(n_actors)]
        log.info("ray: %d actor(s) (%s) over %d slides", n_actors, "GPU" if use_gpu else f"{cpus_per_actor} CPU each",
                 len(pairs))
        groups = [pairs[i:i + group_size] for i in range(0, len(pairs), group_size)]
        pool = ActorPool(actors)
        results: list[SlideResult] = []
        for group in pool.map_unordered(lambda a, g: a.predict.remote(str(store_path), g, asdict(tiling), force, nuclei, cells),
                                        groups):
            results.extend(SlideResult(**r) for r in group)
            access.ingest(wait_s=0.0)
        if access.spool.complete_runs() and not access.ingest(wait_s=ingest_wait_s):
            log.warning("the store stayed busy: finished runs wait in %s", access.spool.root)
        if any(r.status == "computed" for r in results):
            access.refresh_index(model.key)
    finally:
        if started_here:
            ray.shutdown()
    order = {Path(p).name: i for i, (p, _) in enumerate(pairs)}
    return sorted(results, key=lambda r: order.get(r.slide_name, 0))
