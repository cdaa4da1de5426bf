"""Settings as a frozen dataclass.

Precedence: defaults < ``tessera.toml`` (repo root or ``$TESSERA_CONFIG``) < environment
(``TESSERA_*``) < explicit keyword arguments to :func:`load_settings`.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    """Where things live and how inference runs. Paths are absolute after loading."""

    data_dir: Path = REPO_ROOT / "data"
    cache_dir: Path = REPO_ROOT / "data" / "cache"  # exported ONNX models, feature caches
    store_path: Path = REPO_ROOT / "data" / "demo" / "tessera.duckdb"
    demo_dir: Path = REPO_ROOT / "data" / "demo"
    model_dirs: tuple[Path, ...] = (REPO_ROOT / "models" / "weights", REPO_ROOT / "data" / "demo" / "models")
    default_model: str = "demo-synthetic"
    device: str = "auto"
    batch_size: int = 64
    workers: int = 1
    seed: int = 0
    # Server paths typed in the UI must resolve (symlinks followed) inside one of these; empty =
    # the demo folder and the project's data/ (see data_roots_or_default). The CLI may take any path.
    data_roots: tuple[Path, ...] = ()
    max_jobs: int = 2            # prediction jobs running at once, across every session of a server
    upload_mb: int = 200         # per uploaded file (Streamlit's server.maxUploadSize is set to match)
    operators: tuple[str, ...] = ()   # with login on: e-mails of users who may import, predict, manage
    # local foundation-encoder weights (files or folders) looked at before a model's recorded path;
    # a model uses the one whose SHA-256 its card records (see models.encoder_weights)
    encoder_weights: tuple[Path, ...] = ()

    def data_roots_or_default(self) -> tuple[Path, ...]:
        return self.data_roots or (self.demo_dir, self.data_dir)


_ENV = {
    "data_dir": "TESSERA_DATA_DIR",
    "cache_dir": "TESSERA_CACHE_DIR",
    "store_path": "TESSERA_STORE",
    "demo_dir": "TESSERA_DEMO_DIR",
    "default_model": "TESSERA_MODEL",
    "device": "TESSERA_DEVICE",
    "batch_size": "TESSERA_BATCH_SIZE",
    "workers": "TESSERA_WORKERS",
    "seed": "TESSERA_SEED",
    "data_roots": "TESSERA_DATA_ROOTS",
    "max_jobs": "TESSERA_MAX_JOBS",
    "upload_mb": "TESSERA_UPLOAD_MB",
    "operators": "TESSERA_OPERATORS",
    "encoder_weights": "TESSERA_ENCODER_WEIGHTS",
}


def _coerce(name: str, value):
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if name == "operators":
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(v).strip().lower() for v in items if str(v).strip())
    if "Path" in str(kind) and "tuple" not in str(kind):
        return Path(value).expanduser().resolve()
    if "tuple" in str(kind):
        items = value.split(os.pathsep) if isinstance(value, str) else value
        return tuple(Path(v).expanduser().resolve() for v in items if str(v).strip())  # "" is no path, not cwd
    if kind in ("int", int):
        return int(value)
    return str(value)


def load_settings(config_file: Path | None = None, **overrides) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment and overrides."""
    values: dict = {}
    path = config_file or Path(os.environ.get("TESSERA_CONFIG", REPO_ROOT / "tessera.toml"))
    if Path(path).is_file():
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh).get("tessera", {}))
    for name, env in _ENV.items():
        if env in os.environ:
            values[name] = os.environ[env]
    if "TESSERA_MODEL_DIRS" in os.environ:
        values["model_dirs"] = os.environ["TESSERA_MODEL_DIRS"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings()
    demo_dir = values.get("demo_dir")
    if demo_dir is not None and "store_path" not in values:
        values["store_path"] = Path(demo_dir) / "tessera.duckdb"
    if demo_dir is not None and "model_dirs" not in values:
        values["model_dirs"] = (REPO_ROOT / "models" / "weights", Path(demo_dir) / "models")
    return replace(settings, **{k: _coerce(k, v) for k, v in values.items()})
