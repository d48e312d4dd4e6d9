"""The training methods Tunery knows, in one registry: every place that differs by method looks the job's
`method.type` up here (docs/methods.md, "The slices"). Adding a method is its module in this folder and one
line below; its recipe, and for a new kind of data a reader and an evaluator, are named by import path.

Torch-free: the API imports it (tests/test_layers.py checks).
"""

from __future__ import annotations

from shared.methods import classification, dpo, kto, orpo, supervised
from shared.methods.base import CommonHyperparameters, Kind, Method, Planned, Rules, load

# In the order the API lists them (method.type's values, a catalog model's default tasks).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        supervised.METHOD,
        dpo.METHOD,
        classification.METHOD,
        kto.METHOD,
        orpo.METHOD,
    )
}
NAMES: tuple[str, ...] = tuple(METHODS)
# What a job that names no method trains (OpenAI's default), and what a catalog model alone is evaluated as.
DEFAULT_METHOD = supervised.METHOD.name


class UnknownMethod(ValueError):
    pass


def method(name: str) -> Method:
    """The registered method called `name`; UnknownMethod for any other name."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; expected one of {', '.join(NAMES)}") from None


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "NAMES",
    "CommonHyperparameters",
    "Kind",
    "Method",
    "Planned",
    "Rules",
    "UnknownMethod",
    "load",
    "method",
]
