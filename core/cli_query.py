"""CLI commands ``query`` and ``train-joint`` (registered by core.cli.build_parser).

    python -m core.cli query --cohort N (--gene G | --signature g1,g2 | --profile FILE [--obs col=v] |
        --patch IMG [--mpp M] | --tile SLIDE:IDX) [--k 24] [--space predicted|image|joint] [--lowest]
        [--per-slide N] [--per-patient N] [--where COLUMN=V1,V2 ...] [--composition] [--json F]

``query`` is :func:`core.analysis.retrieval.retrieve`, the function the Cross-modal page calls;
its JSON is ``{"query": {...}, "space": ..., "found_by": ..., "score": ..., "results": [{"rank",
"slide", "patient", "tile", "x", "y", "score"}]}``.

    python -m core.cli train-joint --model ID --st DIR [--held-out SECTION] [--epochs 40] [--json F]

``train-joint`` fits the model's joint image ↔ expression space on the ST sections of ``DIR``
(:func:`core.training.joint.ship_joint`) and writes it into the model's checkpoint; its
held-out retrieval and BLEEP-style prediction go into the model card.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import TesseraError


def _query_of(args, genes: list[str]):
    from core.analysis.retrieval import Query

    given = [n for n in ("gene", "signature", "profile", "patch", "tile") if getattr(args, n)]
    if len(given) != 1:
        raise TesseraError("Give exactly one of --gene, --signature, --profile, --patch, --tile.")
    if args.gene:
        match = {g.upper(): g for g in genes}.get(args.gene.upper())
        if match is None:
            raise TesseraError(f"{args.gene} is not in the model's panel ({len(genes)} genes).")
        return Query("gene", genes=[match])
    if args.signature:
        return Query("signature", signature=args.signature)
    if args.profile:
        from core.analysis.query_inputs import read_profile

        profile, label = read_profile(args.profile, obs=args.obs)
        return Query("profile", profile=profile, label=label)
    if args.tile:
        slide, _, idx = args.tile.rpartition(":")
        if not slide or not idx.isdigit():
            raise TesseraError(f"--tile {args.tile!r}: give SLIDE:INDEX, e.g. TCGA-A1-0001-01Z-00-DX1:12.")
        return Query("tile", slide=slide, tile=int(idx))
    return None                                   # a patch: needs the model (below)


def _patch_query(args, model):
    from core.analysis.crossmodal import patch_tile, predict_patch
    from core.analysis.query_inputs import read_patch
    from core.analysis.retrieval import Query

    path = Path(args.patch)
    if not path.is_file():
        raise TesseraError(f"No image {path}.")
    rgb, meta_mpp, source = read_patch(path.read_bytes(), path.name)
    mpp = args.mpp or meta_mpp
    notes = []
    if mpp is None:
        mpp = float(model.card["mpp"])
        notes.append(f"{path.name} records no µm/px; assumed the model's {mpp:g} µm/px. A level-0 crop of a "
                     "0.25 or 0.5 µm/px scan is not at that scale: pass --mpp.")
    elif args.mpp and meta_mpp and abs(args.mpp - meta_mpp) / meta_mpp > 0.05:
        notes.append(f"--mpp {args.mpp:g} overrides the file's {meta_mpp:.3g} µm/px ({source}).")
    tile, note = patch_tile(rgb, mpp, float(model.card["tile_um"]), int(model.card["input_px"]))
    out = predict_patch(model, tile)
    return Query("patch", patch=out, label=f"{path.name} at {mpp:.3g} µm/px: {note}"), notes


def _where(items: list[str] | None) -> dict[str, list[str]] | None:
    if not items:
        return None
    out = {}
    for item in items:
        column, sep, values = item.partition("=")
        wanted = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not column.strip() or not wanted:
            raise TesseraError(f"--where {item!r}: give COLUMN=VALUE[,VALUE…], e.g. PAM50=LumA,LumB.")
        out[column.strip()] = wanted
    return out


def cmd_query(args) -> int:
    from core.analysis.retrieval import result_composition, retrieve
    from core.cli_analysis import _emit, _model_key, _open

    with _open(args) as store:
        key = _model_key(store, args)
        if key is None:
            raise TesseraError(f"Cohort {args.cohort!r} has no predictions yet "
                               f"(python -m core.cli predict --cohort {args.cohort}).")
        genes = list(store.model_info(key).genes)
        query, notes = _query_of(args, genes), []
        model = None
        needs_model = query is None or (args.space == "joint" and query.kind in ("gene", "signature", "profile"))
        if needs_model:
            model = _load(key)
        if query is None:
            query, notes = _patch_query(args, model)
        joint = getattr(model.module, "joint", None) if model is not None else None
        res = retrieve(store, args.cohort, key, query, space=args.space, k=args.k, lowest=args.lowest,
                       per_slide=args.per_slide, per_patient=args.per_patient, where=_where(args.where), joint=joint,
                       method=args.method)
        res.notes[:0] = notes
        payload = res.to_json()
        payload.update(cohort=args.cohort, model=key)
        if args.composition and len(res.results):
            comp = result_composition(store, key, res.results, list(store.cohort_runs(args.cohort, key)
                                                                     .dropna(subset=["run_key"])["run_key"]))
            payload["composition"] = comp.to_dict("records")
    lines = [f"{res.found_by} · {res.space} space · {len(res.results)} tiles of {res.n_slides} slides",
             f"score: {res.score}", *[f"note: {n}" for n in res.notes], ""]
    lines += [f"{r['rank']:>3}  {r['slide']}  tile {r['tile']:>5}  ({r['x']}, {r['y']})  {r['score']:.4g}"
              for r in payload["results"]]
    return _emit(args, payload, "\n".join(lines))


def _load(model_key: str):
    from core.config import load_settings
    from core.engine.modelhub import load_model

    model_id, _, version = model_key.partition("@")
    model = load_model(model_id, load_settings().model_dirs)
    if version and model.version != version:
        raise TesseraError(f"The store's predictions are of {model_key}, but the model folder holds version "
                           f"{model.version}: re-predict the cohort, or restore that model.")
    return model


def cmd_train_joint(args) -> int:
    from core.cli_analysis import _emit
    from core.config import load_settings
    from core.engine.modelhub import load_model
    from core.training.joint import ship_joint

    settings = load_settings()
    model = load_model(args.model, settings.model_dirs)
    if not Path(args.st).is_dir():
        raise TesseraError(f"--st {args.st}: no such folder of ST sections.")
    metrics = ship_joint(model, Path(args.st), epochs=args.epochs, seed=args.seed, cache_dir=args.cache,
                         held_out=args.held_out)
    r, knn = metrics["retrieval"], metrics["knn_prediction"]
    text = (f"joint space written into {model.directory / 'model.pt'} (the model's version changes; re-predict "
            f"its cohorts)\nheld-out {metrics['held_out']} ({r['n']} spots): expression → spot top-1 {r['top1']:.3f} "
            f"(random {r['random1']:.4f}), top-5 {r['top5']:.3f} ({r['random5']:.3f}), top-50 {r['top50']:.3f} "
            f"({r['random50']:.3f}); BLEEP-style k={knn['k']} prediction mean PCC {knn['mean_pcc']:.3f}")
    return _emit(args, {"model": args.model, **metrics}, text)


def add_query_commands(sub) -> None:
    q = sub.add_parser("query", help="cross-modal query: gene / signature / profile / patch / tile → tiles",
                       description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--cohort", required=True)
    q.add_argument("--model", default=None)
    q.add_argument("--store", type=Path, default=None)
    q.add_argument("--gene")
    q.add_argument("--signature", help="a library signature name or genes separated by commas")
    q.add_argument("--profile", type=Path, help="CSV/TSV of gene,value (log1p CP10k) or an .h5ad (with --obs)")
    q.add_argument("--obs", help="an .h5ad profile's cells: column=value[,value…] (their mean is the query)")
    q.add_argument("--patch", type=Path, help="an H&E image (PNG, JPEG or TIFF)")
    q.add_argument("--mpp", type=float, default=None, help="the patch's µm/px (default: its metadata, else the model's)")
    q.add_argument("--tile", help="SLIDE:INDEX, a tile of a predicted slide")
    q.add_argument("--k", type=int, default=24)
    q.add_argument("--space", default=None, choices=["predicted", "image", "joint"],
                   help="default: predicted for genes/signatures, joint for profiles, image for tiles/patches")
    q.add_argument("--method", default=None, help="a signature's scoring method (as on the page; default score_genes)")
    q.add_argument("--lowest", action="store_true", help="the bottom k (for contrast)")
    q.add_argument("--per-slide", type=int, default=None, help="at most N tiles per slide")
    q.add_argument("--per-patient", type=int, default=None, help="at most N tiles per patient")
    q.add_argument("--where", action="append", help="clinical filter COLUMN=V1[,V2] (repeatable), e.g. PAM50=LumA")
    q.add_argument("--composition", action="store_true", help="the results' cell-type composition vs the cohort's")
    q.add_argument("--json", type=Path, default=None, help="write the result as JSON (- for stdout)")
    q.set_defaults(func=cmd_query)

    t = sub.add_parser("train-joint", help="fit a model's joint image ↔ expression space on ST sections")
    t.add_argument("--model", required=True)
    t.add_argument("--st", type=Path, required=True)
    t.add_argument("--held-out", default=None, help="section held out for the card's metrics (default: the last)")
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache", type=Path, default=Path("data/cache/features"))
    t.add_argument("--json", type=Path, default=None)
    t.set_defaults(func=cmd_train_joint)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(__import__("core.cli").cli.main())
