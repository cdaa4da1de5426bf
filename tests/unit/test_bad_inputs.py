"""The bad-input matrix: every case gets a clear, actionable message and leaves the store unchanged.

Each case runs against a real DuckDB store holding one imported cohort with a predicted slide. The
store's checksum (row count and a content hash of every table) is taken before and after: bad
input loses nothing and adds nothing. A case either raises a domain error (``TesseraError``) whose
message matches, or (files that an import must *report*, not refuse) returns a status with a
message. No case may end in a traceback of another type.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import TesseraError
from tests.conftest import make_slide

CLINICAL_OK = "bcr_patient_barcode,OS,OS.time\nTCGA-AA-0001,1,300\nTCGA-AA-0002,0,900\n"


# ---------------------------------------------------------------- the world each case runs in

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with cohort 'base' (two patients, one predicted slide) and a tiny model."""
    import torch

    from core.cohort.importer import import_cohort
    from core.engine.modelhub import load_model
    from core.engine.predict import predict_cohort
    from core.store.db import Store
    from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    genes = ["ERBB2", "ESR1", "CD8A", "MKI67"]
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, len(genes), 2), torch.rand(2, len(genes)))
    save_checkpoint(root / "models" / "tiny", head,
                    ModelCard("tiny", genes, ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112))
    model = load_model("tiny", [root / "models"])
    slides = root / "slides"
    slides.mkdir()
    make_slide(slides / "TCGA-AA-0001-01Z-00-DX1.tiff", width=900, height=700)
    (root / "clinical.csv").write_text(CLINICAL_OK)
    store_path = root / "store.duckdb"
    with Store(store_path) as store:
        import_cohort(store, "base", slides, root / "clinical.csv", tiling=model.tiling())
    results = predict_cohort(store_path, "base", model, device="cpu", workers=0, runtime="torch")
    assert [r.status for r in results] == ["computed"]
    return {"root": root, "store": store_path, "model": model, "slides": slides,
            "card": (root / "models" / "tiny" / "card.json").read_text()}


def checksum(store_path: Path) -> dict[str, tuple[int, str]]:
    """Row count and a content hash of every table (order-independent)."""
    import duckdb

    out = {}
    with duckdb.connect(str(store_path), read_only=True) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for t in sorted(tables):
            df = con.execute(f'SELECT * FROM "{t}"').df()
            digest = hashlib.sha256()
            for row in sorted(map(repr, df.astype(str).itertuples(index=False))):
                digest.update(row.encode())
            out[t] = (len(df), digest.hexdigest())
    return out


# ---------------------------------------------------------------- cases: (id, action, expected message)

def _file(root: Path, name: str, data: bytes) -> Path:
    path = root / "cases" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def probe(world, path: Path, mpp_override=None):
    from core.cohort.importer import probe_slide
    from core.wsi.tiling import TilingParams

    p = probe_slide(path, tiling=TilingParams(), mpp_override=mpp_override)
    return f"{p.status}: {p.message}"


def import_clinical(world, path: Path, **kw):
    from core.cohort.importer import import_cohort
    from core.store.db import Store

    with Store(world["store"]) as store:
        import_cohort(store, kw.pop("name", "new"), None, path, **kw)


def read_clin(world, path: Path):
    from core.cohort.clinical import read_clinical

    res = read_clinical(path)
    return " | ".join(i.message for i in res.issues if i.severity in ("warning", "error"))


def slide_cases():
    def zero(w):
        return probe(w, _file(w["root"], "TCGA-AA-0003-01Z-00-DX1.svs", b""))

    def truncated(w):
        src = make_slide(w["root"] / "cases" / "full.tiff", width=900, height=700)
        data = src.read_bytes()
        return probe(w, _file(w["root"], "TCGA-AA-0004-01Z-00-DX1.tiff", data[: len(data) // 3]))

    def text_as_svs(w):
        return probe(w, _file(w["root"], "TCGA-AA-0005-01Z-00-DX1.svs", b"this is a text file, not a slide\n" * 50))

    def png_as_ndpi(w):
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "white").save(buf, "PNG")
        return probe(w, _file(w["root"], "TCGA-AA-0006-01Z-00-DX1.ndpi", buf.getvalue()))

    def plain_tiff(w, shared=None):
        import tifffile

        path = w["root"] / "cases" / "TCGA-AA-0007-01Z-00-DX1.tif"
        tifffile.imwrite(path, np.full((300, 300, 3), 200, np.uint8))
        return probe(w, path)

    def no_mpp(w):
        import tifffile

        path = w["root"] / "cases" / "TCGA-AA-0008-01Z-00-DX1.tiff"
        rgb = np.full((1024, 1024, 3), 230, np.uint8)
        rgb[300:700, 300:700] = (200, 110, 180)
        with tifffile.TiffWriter(path) as tw:
            tw.write(rgb, tile=(256, 256), photometric="rgb", subifds=1)
            tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
        return probe(w, path)

    def absurd_override(w):
        return probe(w, make_slide(w["root"] / "cases" / "TCGA-AA-0009-01Z-00-DX1.tiff", width=600, height=400),
                     mpp_override=40.0)

    def blank(w):
        from core.synth.tiff import write_pyramidal_tiff

        path = w["root"] / "cases" / "TCGA-AA-0010-01Z-00-DX1.tiff"
        write_pyramidal_tiff(path, np.full((700, 900, 3), 243, np.uint8), mpp=0.5)
        return probe(w, path)

    def directory_named_svs(w):
        path = w["root"] / "cases" / "TCGA-AA-0011-01Z-00-DX1.svs"
        path.mkdir(parents=True, exist_ok=True)
        return probe(w, path)

    return [
        ("slide: zero-byte .svs", zero, r"unreadable|unsupported|empty"),
        ("slide: truncated TIFF", truncated, r"unreadable|unsupported|truncated|damaged"),
        ("slide: text renamed .svs", text_as_svs, r"unsupported|unreadable"),
        ("slide: PNG renamed .ndpi", png_as_ndpi, r"unsupported|unreadable"),
        ("slide: plain single-page TIFF", plain_tiff, r"unsupported|needs_mpp|no_tissue|unreadable"),
        ("slide: no µm/px in metadata", no_mpp, r"needs_mpp"),
        ("slide: µm/px override 40", absurd_override, r"needs_mpp|between|range"),
        ("slide: no tissue", blank, r"no_tissue"),
        ("slide: a folder named .svs", directory_named_svs, r"unreadable|unsupported|not a file|folder"),
    ]


def clinical_cases():
    def write(w, name, text, enc="utf-8"):
        return _file(w["root"], name, text.encode(enc) if isinstance(text, str) else text)

    def gzip_bomb(w):
        path = w["root"] / "cases" / "bomb.csv.gz"
        with gzip.open(path, "wb", compresslevel=9) as fh:
            fh.write(b"bcr_patient_barcode,OS,OS.time\n")
            chunk = b"0" * (1 << 20)
            for _ in range(260):      # 260 MB of zeros inflate from ~250 kB
                fh.write(chunk)
        return path

    def xlsx_bomb(w):
        path = w["root"] / "cases" / "bomb.xlsx"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("[Content_Types].xml", "<Types/>")
            z.writestr("xl/worksheets/sheet1.xml", "<a>" + "0" * (260 << 20) + "</a>")
        return path

    def laughs(w):
        path = w["root"] / "cases" / "laughs.xlsx"
        ent = '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + "".join(
            f'<!ENTITY a{i} "{"&a;" * 10 if i == 0 else f"&a{i - 1};" * 10}">' for i in range(8)) + "]><l>&a7;</l>"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("[Content_Types].xml", ent)
            z.writestr("xl/workbook.xml", ent)
        return path

    def oversized(w):
        from core.vocab import MAX_CLINICAL_FILE_BYTES

        path = w["root"] / "cases" / "huge.csv"
        with open(path, "wb") as fh:
            fh.write(CLINICAL_OK.encode())
            fh.truncate(MAX_CLINICAL_FILE_BYTES + 1)   # sparse: no real disk use
        return path

    refused = [
        ("clinical: empty file", lambda w: import_clinical(w, write(w, "empty.csv", "")), r"empty"),
        ("clinical: one column", lambda w: import_clinical(w, write(w, "one.csv", "id\nA\nB\n")), r"column"),
        ("clinical: no id/survival columns", lambda w: import_clinical(w, write(w, "cols.csv", "foo,bar\n1,2\n")),
         r"cannot tell which columns"),
        ("clinical: CDR missing OS columns", lambda w: import_clinical(w, write(w, "cdr.csv", "bcr_patient_barcode,age\nTCGA-AA-0001,50\n"), fmt="tcga-cdr"),
         r"needs column|OS"),
        ("clinical: binary file", lambda w: import_clinical(w, write(w, "bin.csv", os.urandom(4096))), r"binary|parse|encoding|table"),
        ("clinical: zip with .csv suffix", lambda w: import_clinical(w, write(w, "z.csv", b"PK\x03\x04" + b"\0" * 100)), r"zip|xlsx"),
        ("clinical: old .xls", lambda w: import_clinical(w, write(w, "old.xls", b"\xd0\xcf\x11\xe0" + b"\0" * 100)), r"\.xls"),
        ("clinical: unsupported suffix", lambda w: import_clinical(w, write(w, "clin.docx", b"x")), r"unsupported"),
        ("clinical: missing file", lambda w: import_clinical(w, w["root"] / "nope.csv"), r"No clinical file"),
        ("clinical: gzip bomb", lambda w: import_clinical(w, gzip_bomb(w)), r"inflat|decompress|larger|cap|MB"),
        ("clinical: xlsx bomb", lambda w: import_clinical(w, xlsx_bomb(w)), r"inflat|decompress|larger|cap|MB|workbook"),
        ("clinical: billion laughs xlsx", lambda w: import_clinical(w, laughs(w)), r"entit|DOCTYPE|XML|workbook"),
        ("clinical: oversized", lambda w: import_clinical(w, oversized(w)), r"MB|large|cap"),
        ("clinical: re-import without replace", lambda w: import_clinical(w, write(w, "again.csv", CLINICAL_OK), name="base"),
         r"already|exists|replace"),
        ("clinical: ambiguous event coding", lambda w: read_clin(w, write(w, "amb.csv", "patient_id,time,status\nA,10,1\nB,20,1\n")),
         r"ambiguous"),
        ("clinical: unknown event codes", lambda w: read_clin(w, write(w, "ev.csv", "patient_id,time,status\nA,10,0\nB,20,maybe\nC,5,1\n")),
         r"not a recognised event code"),
        ("clinical: duplicate ids", lambda w: read_clin(w, write(w, "dup.csv", "patient_id,time,status\nA,10,0\nA,20,1\nB,5,1\n")),
         r"duplicate"),
        ("clinical: text in times", lambda w: read_clin(w, write(w, "txt.csv", "patient_id,time,status\nA,ten,0\nB,20,1\nC,5,1\n")),
         r"not numbers"),
        ("clinical: negative times", lambda w: read_clin(w, write(w, "neg.csv", "patient_id,time,status\nA,-10,0\nB,20,1\nC,5,1\n")),
         r"negative"),
        ("clinical: rows without id", lambda w: read_clin(w, write(w, "noid.csv", "patient_id,time,status\n,10,0\nB,20,1\nC,5,1\n")),
         r"without a patient id"),
        ("clinical: malformed lines", lambda w: read_clin(w, write(w, "bad.csv", "patient_id,time,status\nA,10,0,9,9\nB,20,1\nC,5,1\n")),
         r"malformed"),
    ]
    return refused


def text_cases():
    sql = 'CD8A"; DROP TABLE runs; --'

    def gene_sql(w):
        from core.analysis.variables import parse_variable
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            parse_variable(sql, panel=store.model_info(store.models()["model_key"].iloc[0]).genes)

    def heatmap_sql(w):
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            key = store.models()["model_key"].iloc[0]
            run = store.cohort_runs("base", key)["run_key"].iloc[0]
            store.heatmap(key, run, sql)

    def cohort_sql(w):
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            store.clinical("base'; DROP TABLE cohorts; --")

    def cohort_html(w):
        from core.analysis.cohort_stats import km_by
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            km_by(store, "<script>alert(1)</script>", "OS", "clinical:OS.time")

    def clinical_col_sql(w):
        from core.analysis.cohort_stats import km_by
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            km_by(store, "base", "OS", 'clinical:x" FROM cohorts; --')

    def path_traversal(w):
        from core.safety import inside_roots

        inside_roots("../../etc/passwd", (w["root"],), kind="clinical file")

    def traversal_file_name(w):
        from core.safety import inside_roots

        inside_roots(str(w["root"] / ".." / ".." / "etc" / "passwd"), (w["root"],))

    def model_id_traversal(w):
        from core.engine.modelhub import load_model

        load_model("../../etc", (w["root"],))

    def endpoint_sql(w):
        from core.analysis.survival import survival_frame

        survival_frame(pd.DataFrame({"bcr_patient_barcode": ["A"]}), "OS; DROP TABLE runs")

    def variable_kind(w):
        from core.analysis.variables import parse_variable

        parse_variable("javascript:alert(1)")

    def measured_sql(w):
        from core.analysis.cohort_stats import km_by
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            km_by(store, "base", "OS", "measured:' OR 1=1 --")

    return [
        ("text: gene shaped like SQL", gene_sql, r"not in the model's panel"),
        ("text: heatmap gene shaped like SQL", heatmap_sql, r"not|unknown|panel|gene"),
        ("text: cohort shaped like SQL", cohort_sql, r"No cohort"),
        ("text: cohort shaped like HTML", cohort_html, r"cohort|No cohort"),
        ("text: clinical column shaped like SQL", clinical_col_sql, r"no column"),
        ("text: ../../etc/passwd as a server path", path_traversal, r"only inside its data folders"),
        ("text: a path that climbs out of the roots", traversal_file_name, r"only inside its data folders"),
        ("text: model id ../../etc", model_id_traversal, r"model id|not a valid|invalid"),
        ("text: endpoint shaped like SQL", endpoint_sql, r"Unknown endpoint"),
        ("text: variable kind javascript:", variable_kind, r"Unknown variable kind"),
        ("text: measured gene shaped like SQL", measured_sql, r"no measured expression"),
    ]


def store_cases():
    def not_a_checkpoint(w):
        from core.engine.modelhub import load_model

        folder = w["root"] / "models_bad" / "junk"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.pt").write_bytes(os.urandom(2048))
        (folder / "card.json").write_text(w["card"].replace('"tiny"', '"junk"'))
        load_model("junk", (w["root"] / "models_bad",))

    def pickle_exec(w):
        from core.engine.modelhub import load_model

        marker = w["root"] / "pwned"

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        folder = w["root"] / "models_evil" / "evil"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.pt").write_bytes(pickle.dumps(Evil()))
        (folder / "card.json").write_text(w["card"].replace('"tiny"', '"evil"'))
        try:
            load_model("evil", (w["root"] / "models_evil",))
        finally:
            assert not marker.exists(), "the pickle ran"

    def corrupt_chunk(w):
        from core.engine.access import StoreAccess
        from core.engine.predict import predict_slides
        from core.engine.spool import Spool, spool_dir

        other = make_slide(w["root"] / "cases" / "spooled.tiff", width=700, height=500, seed=3)
        results = predict_slides(w["store"], [(other, None)], w["model"], ingest=False, device="cpu", workers=0,
                                 runtime="torch")
        spool = Spool(spool_dir(w["store"]))
        next((spool.root / results[0].run_key).glob("chunk*.parquet")).write_bytes(b"not parquet at all")
        access = StoreAccess(w["store"])
        access.ingest(wait_s=2.0)
        held = access.quarantined()
        assert held, "the corrupt run was not quarantined"
        raise TesseraError(f"quarantined: {held[0]['reason']}")

    def read_only_write(w):
        from core.store.db import Store

        with Store(w["store"], read_only=True) as store:
            try:
                store.save_measured("base", pd.DataFrame({"patient": ["TCGA-AA-0001"], "gene": ["X"], "value": [1.0]}),
                                    {"file": "x"})
            except TesseraError:
                raise
            except Exception as exc:   # DuckDB's own read-only error is also acceptable, with its message
                raise TesseraError(f"read-only store: {exc}") from exc

    def case_clash_model(w):
        from core.store.db import Store

        with Store(w["store"]) as store:
            store.register_model("clash", "v1", ["CD8A", "cd8a"], ["t"], {})

    def deleted_slide(w):
        from core.engine.predict import predict_slides

        gone = make_slide(w["root"] / "cases" / "gone.tiff", width=700, height=500, seed=5)
        gone.unlink()                       # imported, then moved away before the job
        results = predict_slides(w["store"], [(gone, None)], w["model"], device="cpu", workers=0, runtime="torch")
        assert [r.status for r in results] == ["failed"]
        raise TesseraError(f"failed: {results[0].message}")

    return [
        ("store: a model.pt that is not a checkpoint", not_a_checkpoint, r"checkpoint|not a PyTorch|corrupt"),
        ("store: a pickle that would execute code", pickle_exec, r"refused|not loaded|checkpoint|weights"),
        ("store: a corrupt spool chunk and marker", corrupt_chunk, r"quarantined"),
        ("store: a write to a read-only store", read_only_write, r"read-only|read only|Cannot|readonly"),
        ("store: gene names differing by case", case_clash_model, r"ignoring case"),
        ("store: a slide deleted after import", deleted_slide, r"failed: .*(not found|no such|missing|exist)"),
    ]


def upload_cases():
    def not_image(w):
        from pages._ui import read_image

        read_image(b"%PDF-1.4 not an image", "scan.png")

    def png_bomb(w):
        from PIL import Image

        from pages._ui import read_image

        buf = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buf, "PNG")     # 50 kB that decodes to 400 Mpx
        read_image(buf.getvalue(), "bomb.png")

    def too_large(w):
        from pages._ui import saved_upload

        class Upload:
            name = "big.csv"
            size = 10 ** 12

            def getvalue(self):
                raise AssertionError("a capped upload must not be read")

        saved_upload(Upload())

    def svg_as_png(w):
        from pages._ui import read_image

        read_image(b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "x.png")

    return [
        ("upload: not an image", not_image, r"Could not read"),
        ("upload: image decompression bomb", png_bomb, r"patch, not a whole slide|Could not read|too large"),
        ("upload: over the size cap", too_large, r"capped"),
        ("upload: SVG with script as .png", svg_as_png, r"Could not read"),
    ]


CASES = slide_cases() + clinical_cases() + text_cases() + store_cases() + upload_cases()


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40, len(CASES)


@pytest.mark.parametrize("name,action,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, name, action, expected):
    import re

    before = checksum(world["store"])
    try:
        outcome = action(world)
        message = outcome if isinstance(outcome, str) else ""
        assert message, f"{name}: accepted silently"
    except TesseraError as exc:
        message = str(exc)
    assert re.search(expected, message, re.IGNORECASE), f"{name}: {message!r}"
    assert len(message) < 2000 and "Traceback" not in message
    assert checksum(world["store"]) == before, f"{name} changed the store"
