"""The public API (docs/api.md): every name of ``qwenrun.__all__`` imports from ``qwenrun`` and is
in the page's table, ``import qwenrun`` stays cheap, and the names all the package's ``__all__``s
export together do not grow unnoticed (issue 28, item 6)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qwenrun

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwenrun"
API_PAGE = ROOT / "docs" / "api.md"

MAX_EXPORTED = 475
"""The most names all ``__all__``s of the package may export together: 471 when the public API was
decided (543 before). A new export is a decision: raise this with it, or keep the name private."""


def exported(package: Path) -> dict[str, list[str]]:
    """Module file (relative to ``package``'s parent) -> the names of its ``__all__``."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            value = getattr(node, "value", None)
            if value is not None and any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                found[str(path.relative_to(package.parent))] = list(ast.literal_eval(value))
    return found


def documented(page: Path) -> list[str]:
    """The names of the table of ``page`` (its rows' first cells)."""
    return re.findall(r"^\| `(\w+)` \|", page.read_text(encoding="utf-8"), re.M)


@pytest.mark.parametrize("name", qwenrun.__all__)
def test_every_public_name_imports_from_qwenrun(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from qwenrun import {name}", namespace)  # the statement a program writes
    assert namespace[name] is getattr(qwenrun, name)


def test_the_lazy_names_come_from_the_modules_the_table_names() -> None:
    assert set(qwenrun._LAZY) <= set(qwenrun.__all__)
    for name, module in qwenrun._LAZY.items():
        assert getattr(importlib.import_module(module), name) is getattr(qwenrun, name)
    with pytest.raises(AttributeError, match="module 'qwenrun' has no attribute 'Nope'"):
        qwenrun.Nope  # noqa: B018


def test_every_public_name_is_documented_and_nothing_else() -> None:
    rows = documented(API_PAGE)
    assert sorted(rows) == sorted(qwenrun.__all__), "docs/api.md's table and qwenrun.__all__ differ"
    assert len(rows) == len(set(rows))
    text = API_PAGE.read_text(encoding="utf-8")
    for name, module in qwenrun._LAZY.items():  # the "where it lives" column of the lazy names
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`{module.replace('.', '/')}.py`" in row, row


def test_importing_qwenrun_loads_only_the_errors_and_the_events() -> None:
    watched = ("qwenrun", "vllm", "torch", "fastapi", "pydantic", "jinja2", "chainlit", "openai", "mcp")
    code = f"import sys, qwenrun; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {watched!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["qwenrun", "qwenrun.errors", "qwenrun.events"]


def test_the_package_exports_no_more_than_max_exported() -> None:
    total = sum(len(names) for names in exported(PACKAGE).values())
    assert total <= MAX_EXPORTED, (
        f"the package's __all__s export {total} names, more than MAX_EXPORTED = {MAX_EXPORTED}: "
        "export only what another module imports, or raise MAX_EXPORTED on purpose"
    )


def test_the_export_count_reads_every_all(tmp_path: Path) -> None:
    package = tmp_path / "qwenrun"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('__all__ = ["a", "b"]\n')
    (package / "sub" / "mod.py").write_text('"""Doc."""\n\n__all__ = ["c"]  # fmt: skip\nx = 1\n')
    (package / "sub" / "none.py").write_text("y = 2\n")
    assert exported(package) == {"qwenrun/__init__.py": ["a", "b"], "qwenrun/sub/mod.py": ["c"]}
