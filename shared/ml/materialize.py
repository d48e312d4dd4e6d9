"""A catalog entry as a local directory of weights and tokenizer on this worker: built (builtin), used in
place (package, path) or downloaded once into the model cache (s3, hf)."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

from shared.ml.builtin_models import build_tiny_chat_model
from shared.planning.catalog import BUILTIN_ARCHS, CatalogEntry
from shared.platform.failures import ModelUnavailable
from shared.platform.settings import Settings


def materialize(entry: CatalogEntry, settings: Settings) -> Path:
    """A local directory holding the model and tokenizer, downloading or building it once."""
    source = entry.source
    cache = settings.resolved_model_cache_dir
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        directory = cache / "builtin" / name
        if not (directory / "config.json").exists():
            build_tiny_chat_model(directory, arch=BUILTIN_ARCHS[name])
        return directory
    if source.startswith("package:"):
        return _package_model(entry)
    if source.startswith("s3://"):
        return _download_s3(source, cache / "s3" / _digest(source), settings)
    if source.startswith("hf:"):
        return _download_hub(source.removeprefix("hf:"), cache / "hf")
    directory = Path(source.removeprefix("path:"))
    if not (directory / "config.json").exists():
        raise ModelUnavailable(f"model {entry.id!r}: {directory} has no config.json on this worker")
    return directory


def _package_model(entry: CatalogEntry) -> Path:
    """The model directory a package ships (its `MODEL_DIR`), used in place."""
    name = entry.source.removeprefix("package:")
    try:
        directory = Path(importlib.import_module(name).MODEL_DIR)
    except (ImportError, AttributeError) as exc:
        raise ModelUnavailable(f"model {entry.id!r}: package {name} gives no MODEL_DIR here: {exc}") from exc
    if not (directory / "config.json").exists():
        raise ModelUnavailable(f"model {entry.id!r}: {directory} (package {name}) has no config.json")
    return directory


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _download_s3(source: str, directory: Path, settings: Settings) -> Path:
    from shared.platform.storage import S3Storage, StorageError

    if (directory / ".complete").exists():
        return directory
    bucket, prefix = source.removeprefix("s3://").split("/", 1)
    store = S3Storage(
        bucket=bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
    )
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        files = store.download_prefix(prefix.rstrip("/") + "/", partial)
    except StorageError as exc:
        raise ModelUnavailable(f"could not download {source}: {exc}") from exc
    if not (partial / "config.json").exists():
        raise ModelUnavailable(f"{source} holds no config.json ({len(files)} files found)")
    (partial / ".complete").touch()
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def _download_hub(spec: str, cache_dir: Path) -> Path:
    repo_id, revision = spec.rsplit("@", 1)
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        raise ModelUnavailable(f"could not download {repo_id}@{revision} from the hub: {exc}") from exc
    return Path(path)
