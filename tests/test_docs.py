"""The documentation stays true: links resolve, named modules exist, the plugin page's example
runs, and the README's test command sets the browser up (or says why it cannot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "plugins").glob("*/README.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code blocks hold examples, not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_the_pages_have_relative_links() -> None:
    assert ROOT / "README.md" in PAGES and ROOT / "docs" / "chainlit.md" in PAGES
    assert sum(len(relative_links(page)) for page in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_readme_names_modules_that_exist() -> None:
    """Every module and package the README's layout tree names exists, and every module of the
    package is named there (``engines/`` names its modules after it)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = text.split("## Layout", 1)[1].split("```", 2)[1]
    folder = ROOT
    named: set[Path] = set()
    for line in tree.splitlines():
        words = [word for word in line.split("   ")[0].split() if word != "qwenrun/"]
        if line[:2] == "  " and line[2:3] != " " and words:  # a new top-level entry
            folder = ROOT / "qwenrun"
        for word in words:
            if word.endswith("/"):
                folder = ROOT / "qwenrun" / word.rstrip("/")
                named.add(folder)
            elif word.endswith(".py"):
                named.add(folder / word if (folder / word).exists() else ROOT / "qwenrun" / word)
    missing = sorted(str(path.relative_to(ROOT)) for path in named if not path.exists())
    assert not missing, f"README's layout names {missing}, which do not exist"
    modules = {path for path in (ROOT / "qwenrun").glob("*.py") if path.name not in ("__init__.py", "py.typed")}
    unnamed = sorted(path.name for path in modules - named)
    assert not unnamed, f"README's layout does not name {unnamed}"


# -- docs/plugins.md: its example plugin works as written -------------------------------------------


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)


async def test_the_plugin_page_example_works_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin, test = _python_blocks(ROOT / "docs" / "plugins.md")
    module = types.ModuleType("qwenrun_clock")
    exec(compile(plugin, "docs/plugins.md", "exec"), module.__dict__)  # our own page
    monkeypatch.setitem(sys.modules, "qwenrun_clock", module)
    tool = Tool.from_function(module.current_time, settings={"default_timezone": "Europe/Paris"})
    assert tool.description.startswith("Get the current date and time in a time zone.")
    assert tool.parameters["properties"]["timezone"]["maxLength"] == 64
    assert "settings" not in tool.parameters["properties"]
    assert (await tool.call({})).endswith(("CET", "CEST"))
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        await tool.call({"timezone": "Mars/Base"})
    tests: dict[str, object] = {}
    exec(compile(test, "docs/plugins.md", "exec"), tests)
    await tests["test_the_agent_calls_the_tool"]()  # type: ignore[operator]
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "sessions": {"enabled": False}})
    final = await Agent(spec, ScriptedEngine([tool_call_text("current_time", {}), "ok"]), tools=[tool]).ask("?")
    assert final.tool_calls == 1


# -- docs/api.md: its embedding example prints what the page says ---------------------------------

API_EXAMPLE_OUTPUT = """\
call: get_current_weather({'city': '广州'})
result: 广州: 多云, 28~31℃
answer: 广州今天多云, 气温28~31℃。 (1 tool call)
"""


def test_the_api_page_example_prints_what_it_says(tmp_path: Path) -> None:
    page = ROOT / "docs" / "api.md"
    (example,) = _python_blocks(page)
    shown = page.read_text(encoding="utf-8").split(example, 1)[1].split("It prints:\n\n```\n", 1)[1]
    assert shown.split("```", 1)[0] == API_EXAMPLE_OUTPUT
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
        encoding="utf-8", timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == API_EXAMPLE_OUTPUT
    assert list(tmp_path.iterdir()) == []  # no session database, no file left behind


# -- scripts/test.sh: Chromium for the browser tests -------------------------------------------------


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(("uid", "installs"), [("0", True), ("1000", False)], ids=["root", "user"])
def test_the_test_script_installs_chromium_when_it_can(tmp_path: Path, uid: str, installs: bool) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir()
    _stub(bin_dir, "id", f"echo {uid}")
    _stub(bin_dir, "apt-get", f'echo "$@" >> {calls}')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QWENRUN_CHROMIUM": str(tmp_path / "nope")}
    env.pop("QWENRUN_BROWSER_SKIP", None)
    script = 'source scripts/browser.sh; echo "skip=${QWENRUN_BROWSER_SKIP:-}"'
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "source scripts/browser.sh" in (ROOT / "scripts" / "test.sh").read_text()
    if installs:
        assert calls.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
        assert done.stdout.strip() == "skip="
    else:
        assert not calls.exists()
        assert "needs root (sudo apt-get install chromium)" in done.stdout
        assert "warning: the browser tests will be skipped" in done.stderr


def test_without_chromium_the_browser_tests_are_skipped_with_the_reason(tmp_path: Path) -> None:
    env = {**os.environ, "QWENRUN_CHROMIUM": str(tmp_path / "nope"), "QWENRUN_BROWSER_SKIP": "no root here"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_chainlit_browser.py", "-k", "password_login", "-rs", "-p",
         "no:cacheprovider", f"--basetemp={tmp_path / 'tmp'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout and "no root here" in done.stdout
