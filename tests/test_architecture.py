"""The architecture holds: imports at the top of modules, and a light ``import camlens``.

The layer order itself is checked by ``lint-imports`` (``make test``; the contract is in
pyproject.toml). Here: no camlens import hides inside a function (such imports used to hide
import cycles), except the one the layer contract declares; and ``import camlens`` loads no
heavy library until a name is used.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import camlens

SOURCE = Path(camlens.__file__).parent

#: Function-local camlens imports that are there on purpose: Explanation.save() calls the
#: explain job's writer, a higher layer (declared in the import-linter contract too); the
#: command line loads the library only when a command runs, so that ``--help`` is quick.
ALLOWED_LOCAL = {("explanation.py", "camlens.api.explaining")}
ALLOWED_FOLDERS = ("cli/",)


def _local_imports(path: Path) -> list[str]:
    """The camlens modules imported inside functions of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append(node.module)
    return [name for name in found if name == "camlens" or name.startswith("camlens.")]


def test_no_camlens_import_hides_inside_a_function():
    hidden = [
        (str(path.relative_to(SOURCE)), name)
        for path in sorted(SOURCE.rglob("*.py"))
        for name in _local_imports(path)
        if (str(path.relative_to(SOURCE)), name) not in ALLOWED_LOCAL
        and not str(path.relative_to(SOURCE)).startswith(ALLOWED_FOLDERS)
    ]
    assert hidden == []


def _modules_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(done.stdout.split())


def test_import_camlens_loads_no_heavy_library():
    loaded = _modules_after("import camlens")
    heavy = {"torch", "matplotlib", "jinja2", "fastapi", "uvicorn", "skimage", "ray", "sklearn"}
    assert heavy & loaded == set()
    assert "explain" in dir(camlens) and callable(camlens.explain)  # loaded on first use
