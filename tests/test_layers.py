"""The layering of the code, checked rather than kept by discipline (docs/methods.md, "The layers of shared/").

The API must start without the ML stack (its image and its start-up time depend on it); the project's
modules must import each other without a circle; services talk to each other through Redis and storage,
so each imports `shared/` and never another service, and `shared/` imports no service. Nothing here
starts a service: the import graph is read from the source with `ast`, and the API is imported in a
subprocess of its own so that what this test process has imported does not count.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "services", "cli")
HEAVY = ("torch", "transformers", "peft", "accelerate")


def test_the_api_imports_no_ml_library(tmp_path: Path) -> None:
    """Importing the app and creating it (Redis need not answer: nothing is asked of it yet) leaves
    torch, transformers, peft and accelerate unimported."""
    script = f"""
import sys
from services.api.app import create_app
from shared.platform.settings import Settings
create_app(Settings(redis_url="redis://127.0.0.1:9/0", data_dir={str(tmp_path)!r}))
print(" ".join(name for name in {HEAVY!r} if name in sys.modules))
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TUNERY_")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"the API imported {done.stdout.strip()}"


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by its dotted name (a package by its own)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports anywhere in its file (module level, in functions, under
    TYPE_CHECKING); `from x import y` counts as x.y where y is a submodule. A module importing itself by
    name (as `python -m` does to pickle under its real name) is not an edge."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name in a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def test_no_import_circle() -> None:
    try:
        graphlib.TopologicalSorter(_graph()).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_services_import_shared_only() -> None:
    """services/<a>/ imports no services/<b>/, and shared/ no service at all (task paths named as strings,
    such as "services.trainer.task.run_training", are not imports)."""
    crossings = []
    for name, imported in _graph().items():
        layer = name.split(".")
        if layer[0] == "services" and len(layer) > 1:
            own = f"services.{layer[1]}"
            crossings += [
                f"{name} -> {t}" for t in imported if _within(t, "services") and not _within(t, own)
            ]
        elif layer[0] == "shared":
            crossings += [f"{name} -> {t}" for t in imported if _within(t, "services")]
    assert crossings == []


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


LIGHT_LAYERS = ("shared.platform", "shared.data", "shared.planning", "shared.methods")


def test_the_light_layers_of_shared_import_no_ml_library_nor_the_ml_layer() -> None:
    """shared/platform, data, planning and methods import no torch, transformers, peft or accelerate and
    nothing of shared/ml, not even inside a function: the API and the light workers rest on them alone."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        if not any(_within(name, layer) for layer in LIGHT_LAYERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            found += [
                f"{name} -> {t}" for t in targets if t.split(".")[0] in HEAVY or _within(t, "shared.ml")
            ]
    assert found == []


def test_every_module_of_shared_lives_in_a_layer() -> None:
    loose = [p.name for p in (ROOT / "shared").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
