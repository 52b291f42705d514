"""Imports point one way, jobs -> actors -> orchestrator -> segxal, and the two lower layers never load Ray."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("segxal", "orchestrator", "actors", "jobs")  # each may import only those before it


def modules(package: str) -> list[str]:
    return sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / package).rglob("*.py")
    )


def imported_packages(module: str) -> set[str]:
    """The top-level project packages ``module`` imports, at any depth of its code."""
    path = REPO / Path(*module.split("."))
    source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_a_layer_above_its_own(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    wrong = {m: sorted(imported_packages(m) & above) for m in modules(layer)}
    assert {m: up for m, up in wrong.items() if up} == {}


def test_segxal_and_orchestrator_modules_leave_ray_unloaded():
    names = modules("segxal") + modules("orchestrator")
    code = (
        "import importlib, json, sys\n"
        f"names = {names!r}\n"
        "loaded = []\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    if 'ray' in sys.modules:\n"
        "        loaded.append(name)\n"
        "        break\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert len(names) > 40  # every module of both packages, not a sample
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
