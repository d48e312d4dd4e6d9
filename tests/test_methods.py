"""The method registry (shared/methods/, docs/methods.md "The slices"): every place that differs by training
method looks the method up there, so that adding one touches its light module and a registry line, its
recipe, and only for a new kind of data a reader and an evaluator (named by import path from the light
module, so no other file changes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.api.schemas import JobCreate, MethodIn
from shared.methods import METHODS, NAMES, UnknownMethod, load, method

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", NAMES)
def test_every_heavy_part_a_method_names_imports_on_a_worker_as_a_function(name: str) -> None:
    m = method(name)
    for path in (m.recipe, m.evaluator, m.data_kind.reader, m.data_kind.planner):
        assert callable(load(path)), path


@pytest.mark.parametrize("name", NAMES)
def test_a_method_shows_its_own_hyperparameters_and_reports_every_validation_metric_per_step(
    name: str,
) -> None:
    m = method(name)
    assert set(m.shown) <= set(m.hyperparameters.model_fields)
    assert m.result_columns[0] == "step"
    assert {f"valid_{metric}" for metric in m.validation_metrics} <= set(m.result_columns)


def test_the_api_accepts_exactly_the_registered_methods_each_with_its_own_hyperparameters() -> None:
    schema = MethodIn.model_json_schema()
    assert schema["properties"]["type"]["enum"] == list(NAMES)
    assert set(schema["properties"]) == {"type", *NAMES}
    for name in NAMES:
        body = JobCreate(model="m", training_file="f", method={"type": name, name: {"hyperparameters": {}}})
        assert body.method_type == name
        assert isinstance(body.method.hyperparameters(), METHODS[name].hyperparameters)
    for other in ("reinforcement", "grpo"):
        with pytest.raises(ValidationError) as refused:
            JobCreate(model="m", training_file="f", method={"type": other})
        assert [error["loc"] for error in refused.value.errors()] == [("method", "type")]


def test_an_unknown_method_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UnknownMethod, match="unknown method 'grpo'; expected one of supervised, dpo"):
        method("grpo")


def _ladders(path: Path) -> list[str]:
    """Where a module branches on a method's name: `... method_type == "dpo"`, a table keyed by method
    names, or a list of every method spelled out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            on_method = any(
                (isinstance(s, ast.Name) and s.id == "method_type")
                or (isinstance(s, ast.Attribute) and s.attr == "method_type")
                for s in sides
            )
            named = any(isinstance(s, ast.Constant) and s.value in NAMES for s in sides)
            if on_method and named:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares method_type with a name")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys & set(NAMES)) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} keys a table by method names")
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            if items >= set(NAMES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} lists every method by name")
    return found


def test_no_code_outside_the_registry_branches_on_a_method_name() -> None:
    found = []
    for package in ("shared", "services", "cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where.startswith("shared/methods/"):
                continue
            found += _ladders(path)
    assert found == []
