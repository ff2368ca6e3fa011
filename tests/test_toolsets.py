"""The built-in toolsets: their YAML, the filesystem tools and the checks that keep them inside their
roots (attacks included: ``..``, encoded, mixed-case and look-alike paths, symlinks out, symlink
swaps between check and use, devices and FIFOs, huge files, smuggled arguments), think and todo,
and a filesystem read through the agent loop on the scripted engine. Fetch: test_toolsets_fetch.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.context import SESSION_ID
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, ToolError
from qwenrun.events import ToolResult
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool
from qwenrun.toolsets.paths import Roots

ROOT = Path(__file__).resolve().parent.parent
SECRET = "the secret outside the root"


def toolset(entry: dict[str, Any], source: str = "<dict>") -> dict[str, Tool]:
    spec = AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry]}, source=source)
    return {tool.name: tool for tool in load_tools(spec)}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` (notes.md, sub/deep.txt) beside ``outside/secret.txt``."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "notes.md").write_text("# Notes\nbuy milk\nCall Alice\n")
    (root / "sub" / "deep.txt").write_text("deep milk\n")
    (outside / "secret.txt").write_text(SECRET)
    return root


def files(root: Path, **settings: Any) -> dict[str, Tool]:
    return toolset({"toolset": "filesystem", "roots": [str(root)], **settings})


async def refused(tool: Tool, arguments: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ToolError, match=pattern) as caught:
        await tool.call(arguments)
    assert SECRET not in str(caught.value)


# -- the YAML ---------------------------------------------------------------------------------------


def test_the_yaml_names_the_tools_each_toolset_gives(tree: Path) -> None:
    spec = AgentSpec.from_text(
        f"model: {{path: x}}\ntools:\n  - toolset: filesystem\n    roots: [{tree}]\n"
        "  - {toolset: filesystem, roots: [.], write: true, prefix: rw_, approval: {write_file: ask}}\n"
        "  - {toolset: fetch, allow_hosts: [example.org]}\n  - toolset: think\n  - toolset: todo\n",
        source=str(tree / "agent.yaml"),
    )
    assert spec.known_tool_names() == [
        "list_directory", "read_file", "search_files",
        "rw_list_directory", "rw_read_file", "rw_search_files", "rw_write_file", "rw_edit_file",
        "fetch", "think", "todo_write", "todo_read",
    ]  # fmt: skip
    tools = {tool.name: tool for tool in load_tools(spec)}
    assert list(tools) == spec.known_tool_names()
    assert tools["rw_write_file"].approval == "ask" and tools["rw_edit_file"].approval == "auto"
    assert tools["read_file"].origin == "built-in toolset filesystem (tools[0])"
    assert str(tree) in tools["read_file"].description  # the model is told where it may go
    assert "{{ tools }}" not in spec.system_prompt() and "fetch" in AgentSpec.from_dict(
        {"model": {"path": "x"}, "agent": {"system_prompt": "{{ tools|join(',') }}"}, "tools": [{"toolset": "fetch", "allow_hosts": ["*"]}]}
    ).system_prompt()  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"toolset": "filesystem"}, r"\.roots: required key is missing"),
        ({"toolset": "filesystem", "roots": ["."], "rots": 1}, r"\.rots: unknown key 'rots'; did you mean 'roots'"),
        ({"toolset": "bash"}, r": expected toolset: filesystem, fetch, think, todo, shell, python or memory"),
        ({"toolset": "filesystem", "roots": ["."], "approval": {"edit_file": "ask"}}, r": .*edit_file, which need write: true"),
        ({"toolset": "think", "approval": {"nope": "ask"}}, r"\.approval: .*no such tool in this toolset: nope"),
        ({"toolset": "think", "approval": "sometimes"}, r"\.approval: .*expected auto, ask or deny"),
        ({"toolset": "fetch", "allow_hosts": ["http://evil/"]}, r"\.allow_hosts: .* is not a host name"),
        ({"toolset": "fetch", "allow_hosts": []}, r"\.allow_hosts: "),
        ({"toolset": "fetch", "allow_hosts": ["a.org"], "allow_networks": ["10.0.0.0/33"]}, r"\.allow_networks\[0\]"),
        ({"toolset": "todo", "max_items": 0}, r"\.max_items"),
    ],
)  # fmt: skip
def test_bad_entries_are_errors_naming_the_file_and_the_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^agents/x\.yaml: tools\[0\]" + message):
        AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry]}, source="agents/x.yaml")


def test_two_toolsets_of_one_kind_need_a_prefix_and_clashes_are_named(tree: Path) -> None:
    entry = {"toolset": "filesystem", "roots": [str(tree)]}
    with pytest.raises(ConfigError, match="declared twice: list_directory, read_file, search_files"):
        AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry, entry]})
    AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry, {**entry, "prefix": "b_"}]})
    mcp = {"mcp": {"name": "files", "command": "true"}, "allow": ["read_file"]}
    with pytest.raises(ConfigError, match=r"tool 'read_file' of tools\[1\].*clashes with 'read_file' of tools\[0\] \(toolset filesystem\)"):
        AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry, mcp]})
    spec = AgentSpec.from_dict({"model": {"path": "x"}, "agent": {"tool_choice": "read_file"}, "tools": [entry]})
    assert spec.agent.tool_choice == "read_file"  # a toolset's tool is a valid tool_choice


def test_a_root_that_is_not_a_folder_fails_when_the_tools_are_built(tree: Path) -> None:
    with pytest.raises(ConfigError, match=r"^a\.yaml: tools\[0\]: toolset filesystem: root 'missing' is not a folder"):
        toolset({"toolset": "filesystem", "roots": ["missing"]}, source="a.yaml")


def test_relative_roots_are_relative_to_the_agent_file(tree: Path) -> None:
    tools = toolset({"toolset": "filesystem", "roots": ["root"]}, source=str(tree.parent / "agent.yaml"))
    assert f"relative to {os.path.realpath(tree)}" in tools["read_file"].description


def test_validate_counts_toolset_tools(tree: Path) -> None:
    from click.testing import CliRunner

    from qwenrun.cli.main import main

    path = tree.parent / "agent.yaml"
    path.write_text("model: {path: x}\ntools:\n  - {toolset: filesystem, roots: [root]}\n  - toolset: think\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0 and "4 tools" in result.output, result.output


# -- the filesystem tools ---------------------------------------------------------------------------


async def test_list_read_and_search(tree: Path) -> None:
    tools = files(tree)
    assert sorted(tools) == ["list_directory", "read_file", "search_files"]  # read-only by default
    assert await tools["list_directory"].call({}) == "notes.md  28 bytes\nsub/"
    assert await tools["list_directory"].call({"recursive": True}) == "notes.md  28 bytes\nsub/\nsub/deep.txt  10 bytes"
    assert await tools["read_file"].call({"path": "notes.md"}) == "# Notes\nbuy milk\nCall Alice\n"
    assert await tools["read_file"].call({"path": "notes.md", "start_line": 2, "max_lines": 1}) == "buy milk\n"
    assert await tools["read_file"].call({"path": str(tree / "sub" / "deep.txt")}) == "deep milk\n"  # absolute, inside
    assert await tools["search_files"].call({"text": "MILK"}) == "notes.md:2: buy milk\nsub/deep.txt:1: deep milk"
    assert await tools["search_files"].call({"text": "milk", "name_pattern": "*.md"}) == "notes.md:2: buy milk"
    assert await tools["search_files"].call({"text": "bread"}) == "no line contains 'bread'"


async def test_write_and_edit_only_when_allowed(tree: Path) -> None:
    tools = files(tree, write=True)
    assert await tools["write_file"].call({"path": "sub/new.txt", "content": "one\ntwo\n"}) == "wrote 8 bytes to sub/new.txt"
    assert (tree / "sub" / "new.txt").read_text() == "one\ntwo\n"
    await tools["edit_file"].call({"path": "sub/new.txt", "old_text": "two", "new_text": "2"})
    assert (tree / "sub" / "new.txt").read_text() == "one\n2\n"
    await refused(tools["edit_file"], {"path": "notes.md", "old_text": "l", "new_text": "L"}, "occurs 4 times")
    await refused(tools["edit_file"], {"path": "notes.md", "old_text": "bread", "new_text": "x"}, "does not occur")
    await refused(tools["write_file"], {"path": "nowhere/x.txt", "content": "x"}, "does not exist")
    await refused(tools["write_file"], {"path": "big.txt", "content": "x" * 2_000_000}, "over the limit of 1000000")
    assert not (tree / "big.txt").exists()


async def test_huge_and_binary_files(tree: Path) -> None:
    (tree / "huge.log").write_bytes(b"a" * 2001)
    (tree / "blob.bin").write_bytes(b"\x00\x01\x02")
    tools = files(tree, max_file_bytes=2000)
    await refused(tools["read_file"], {"path": "huge.log"}, "2001 bytes, over the limit of 2000 bytes")
    assert await tools["read_file"].call({"path": "blob.bin"}) == "blob.bin is a binary file (3 bytes): not shown"
    found = await tools["search_files"].call({"text": "a"})
    assert "huge.log" not in found and "1 files skipped" in found


# -- getting out: every way the model might try ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        ("../outside/secret.txt", "'..' is not allowed"),
        ("sub/../../outside/secret.txt", "'..' is not allowed"),
        ("/etc/passwd", "outside the allowed folders"),
        ("{outside}/secret.txt", "outside the allowed folders"),
        ("．．/outside/secret.txt", "look like '.', '/'.*U\\+FF0E"),  # fullwidth full stops
        ("‥/outside/secret.txt", "U\\+2025"),  # two dot leader: NFKC ".."
        ("..／outside／secret.txt", "U\\+FF0F"),  # fullwidth solidus
        ("..\uff3coutside\uff3csecret.txt", "U\\+FF3C"),  # fullwidth reverse solidus
        ("notes.md\x00.txt", "NUL"),
        ("%2e%2e/outside/secret.txt", "does not exist"),  # never percent-decoded: a plain name inside
        ("%2e%2e%2foutside%2fsecret.txt", "does not exist"),
        ("..%2Foutside%2Fsecret.txt", "does not exist"),
        ("..\\outside\\secret.txt", "does not exist"),  # a backslash is part of a name on POSIX
        ("../OUTSIDE/SECRET.TXT", "'..' is not allowed"),
        ("Sub/../../outside/secret.txt", "'..' is not allowed"),
        ("..\u2215outside\u2215secret.txt", "does not exist"),  # division slash: a plain character
        ("x" * 5000, "longer than 4096|at most 4096"),
    ],
)  # fmt: skip
async def test_paths_that_try_to_get_out_are_refused(tree: Path, path: str, pattern: str) -> None:
    path = path.replace("{outside}", str(tree.parent / "outside"))
    for name in ("read_file", "list_directory", "search_files"):
        arguments = {"path": path, "text": "secret"} if name == "search_files" else {"path": path}
        try:
            result = await files(tree)[name].call(arguments)
        except ToolError as exc:
            assert re.search(pattern, str(exc)) or name != "read_file", str(exc)
            assert SECRET not in str(exc)
        else:
            assert name != "read_file" and SECRET not in result


async def test_write_paths_that_try_to_get_out_are_refused(tree: Path) -> None:
    tools = files(tree, write=True)
    outside = tree.parent / "outside"
    for path in ("../outside/x.txt", f"{outside}/x.txt", "．．/outside/x.txt", "sub/../../outside/x.txt"):
        await refused(tools["write_file"], {"path": path, "content": "pwned"}, "not allowed|outside|look like")
    assert sorted(os.listdir(outside)) == ["secret.txt"]


async def test_symlinks_that_lead_out_are_refused_and_those_inside_followed(tree: Path) -> None:
    outside = tree.parent / "outside"
    (tree / "out.txt").symlink_to(outside / "secret.txt")
    (tree / "outdir").symlink_to(outside)
    (tree / "alias.md").symlink_to(tree / "notes.md")
    tools = files(tree, write=True)
    await refused(tools["read_file"], {"path": "out.txt"}, "outside the allowed folders")
    await refused(tools["read_file"], {"path": "outdir/secret.txt"}, "outside the allowed folders")
    await refused(tools["list_directory"], {"path": "outdir"}, "outside the allowed folders")
    await refused(tools["write_file"], {"path": "out.txt", "content": "pwned"}, "symbolic link")
    await refused(tools["edit_file"], {"path": "out.txt", "old_text": "secret", "new_text": "x"}, "symbolic link")
    await refused(tools["write_file"], {"path": "outdir/x.txt", "content": "pwned"}, "outside the allowed folders")
    assert (outside / "secret.txt").read_text() == SECRET and sorted(os.listdir(outside)) == ["secret.txt"]
    assert "Call Alice" in await tools["read_file"].call({"path": "alias.md"})
    listing = await tools["list_directory"].call({})
    assert "out.txt -> (outside: refused)" in listing and "alias.md -> (inside)" in listing
    assert SECRET not in await tools["search_files"].call({"text": "secret"})  # links are not followed


async def test_hard_links_are_not_written_through(tree: Path) -> None:
    outside = tree.parent / "outside" / "secret.txt"
    os.link(outside, tree / "linked.txt")
    await refused(files(tree, write=True)["write_file"], {"path": "linked.txt", "content": "x"}, "hard links")
    assert outside.read_text() == SECRET


async def test_devices_and_fifos_are_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    tools = files(tree, write=True)
    for name, arguments in [("read_file", {"path": "pipe"}), ("write_file", {"path": "pipe", "content": "x"}),
                            ("edit_file", {"path": "pipe", "old_text": "a", "new_text": "b"})]:  # fmt: skip
        await refused(tools[name], arguments, "not a regular file")
    devices = files(Path("/dev"))
    await refused(devices["read_file"], {"path": "null"}, "not a regular file")
    await refused(devices["read_file"], {"path": "zero"}, "not a regular file")
    await refused(devices["read_file"], {"path": "/dev/urandom"}, "not a regular file")


async def test_smuggled_arguments_are_refused(tree: Path) -> None:
    tools = files(tree)
    for extra in ({"root": "/"}, {"settings": {"roots": ["/"]}}, {"write": True}, {"path2": "/etc/passwd"}):
        with pytest.raises(ToolError, match="invalid arguments for read_file"):
            await tools["read_file"].call({"path": "notes.md", **extra})
    with pytest.raises(ToolError, match="invalid arguments for read_file"):
        await tools["read_file"].call({"path": ["..", "outside"]})
    assert "write_file" not in tools  # read-only: no write tool to smuggle a call to


def test_a_folder_swapped_for_a_symlink_after_the_check_is_caught(tree: Path) -> None:
    """The race, made deterministic: the path was checked while sub/ was a folder, then sub/ becomes
    a symlink out; O_NOFOLLOW cannot see a link in the middle, the opened file's real path can."""
    roots = Roots([str(tree)])
    checked = roots.resolve("sub/deep.txt")
    os.rename(tree / "sub", tree / "sub-old")
    (tree / "sub").symlink_to(tree.parent / "outside")
    (tree.parent / "outside" / "deep.txt").write_text(SECRET)
    with pytest.raises(ToolError, match="leads outside the allowed folders"):
        roots.open(checked)
    checked = roots.resolve("notes.md")  # and the file itself swapped for a link after its check
    (tree / "notes.md").unlink()
    (tree / "notes.md").symlink_to(tree.parent / "outside" / "secret.txt")
    with pytest.raises(ToolError, match="symbolic link"):
        roots.open(checked)


async def test_folder_swaps_racing_the_reads_never_leak(tree: Path) -> None:
    """A thread turns ``d`` into a folder (d/f: "inside") and into a link to the folder outside
    (its f: the secret), over and over, while the tool reads d/f: every read returns the inside file
    or a refusal, never the secret."""
    outside = tree.parent / "outside"
    (outside / "f").write_text(SECRET)
    (tree / "d").mkdir()
    (tree / "d" / "f").write_text("inside")
    (tree / "link").symlink_to(outside)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(tree / "d", tree / "parked")
            os.rename(tree / "link", tree / "d")
            os.rename(tree / "d", tree / "link")
            os.rename(tree / "parked", tree / "d")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    read = files(tree)["read_file"]
    outcomes: list[str] = []
    try:
        for _ in range(400):
            try:
                outcomes.append(await read.call({"path": "d/f"}))
            except ToolError as exc:
                assert SECRET not in str(exc)
                outcomes.append("refused")
    finally:
        stop.set()
        swapper.join(10)
    assert SECRET not in outcomes and set(outcomes) <= {"inside", "refused"}
    assert "inside" in outcomes and "refused" in outcomes  # both sides of the race were seen


# -- think and todo ---------------------------------------------------------------------------------


async def test_think_records_nothing_but_the_call() -> None:
    think = toolset({"toolset": "think"})["think"]
    assert await think.call({"thought": "the user wants Paris"}) == "(thought noted: 20 characters)"
    assert think.parameters["required"] == ["thought"]


async def test_todo_lists_are_kept_per_session() -> None:
    tools = toolset({"toolset": "todo", "max_items": 3})
    write, read = tools["todo_write"], tools["todo_read"]

    async def in_session(session: str, tool: Tool, arguments: dict[str, Any]) -> str:
        token = SESSION_ID.set(session)
        try:
            return str(await tool.call(arguments))
        finally:
            SESSION_ID.reset(token)

    plan = {"items": [{"text": "find the file"}, {"text": "read it", "status": "in_progress"}]}
    assert await in_session("a", write, plan) == "To-do (0 of 2 done):\n1. [ ] find the file\n2. [~] read it"
    assert await in_session("b", read, {}) == "The to-do list is empty."
    assert (await in_session("a", read, {})).startswith("To-do (0 of 2 done)")
    with pytest.raises(ToolError, match="at most 3 items"):
        await in_session("a", write, {"items": [{"text": "x"}] * 4})
    with pytest.raises(ToolError, match="invalid arguments"):
        await in_session("a", write, {"items": [{"text": "x", "status": "maybe"}]})


# -- through the agent loop -------------------------------------------------------------------------


async def test_an_agent_file_with_a_filesystem_toolset_reads_through_the_loop(tree: Path) -> None:
    path = tree.parent / "agent.yaml"
    path.write_text(
        "model: {path: scripted}\nsessions: {enabled: false}\n"
        "tools:\n  - toolset: filesystem\n    roots: [root]\n  - toolset: todo\n"
    )
    spec = AgentSpec.from_file(path)
    engine = ScriptedEngine(
        [
            tool_call_text("read_file", {"path": "notes.md"}),
            tool_call_text("todo_write", {"items": [{"text": "buy milk"}]}),
            tool_call_text("read_file", {"path": "../outside/secret.txt"}),
            "You need milk.",
        ]
    )
    agent = Agent(spec, engine)
    session = agent.session()
    events = [event async for event in session.stream("What do my notes say?")]
    results = [event for event in events if isinstance(event, ToolResult)]
    assert [result.content for result in results[:2]] == [
        "# Notes\nbuy milk\nCall Alice\n", "To-do (0 of 1 done):\n1. [ ] buy milk"
    ]  # fmt: skip
    assert results[2].is_error and "'..' is not allowed" in results[2].content
    assert events[-1].text == "You need milk."  # type: ignore[attr-defined]
    assert [tool["function"]["name"] for tool in engine.calls[0].tools or []] == [
        "list_directory", "read_file", "search_files", "todo_write", "todo_read"
    ]  # fmt: skip
    token = SESSION_ID.set(session.id)  # the list belongs to that session
    try:
        assert "buy milk" in await agent.tools["todo_read"].call({})
    finally:
        SESSION_ID.reset(token)
    assert await asyncio.wait_for(agent.tools["todo_read"].call({}), 10) == "The to-do list is empty."


async def test_approval_ask_applies_to_toolset_tools(tree: Path) -> None:
    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted"}, "sessions": {"enabled": False},
         "tools": [{"toolset": "filesystem", "roots": [str(tree)], "write": True, "approval": {"write_file": "ask"}}]}
    )  # fmt: skip
    engine = ScriptedEngine([tool_call_text("write_file", {"path": "x.txt", "content": "x"}), "ok"])
    final = await Agent(spec, engine).ask("write")  # no approver: an `ask` call is refused
    assert final.text == "ok" and not (tree / "x.txt").exists()


def test_each_tool_says_what_it_does_in_its_first_sentence(tree: Path) -> None:
    entries = [{"toolset": "filesystem", "roots": [str(tree)], "write": True}, {"toolset": "fetch", "allow_hosts": ["*"]},
               {"toolset": "think"}, {"toolset": "todo"}]  # fmt: skip
    for entry in entries:
        for tool in toolset(entry).values():
            first = tool.description.split("\n\n")[0]
            assert "\n" not in first and first.endswith("."), (tool.name, tool.description)


# -- docs/toolsets.md -------------------------------------------------------------------------------


def test_every_agent_file_in_the_toolsets_page_validates(tmp_path: Path) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs" / "toolsets.md").read_text(), re.S | re.M)
    assert len(blocks) == 8
    for block in blocks:
        spec = AgentSpec.from_text(block, source="docs/toolsets.md")
        for _, entry in spec.toolsets:  # the roots exist where the file is: the tools build too
            for root in [*getattr(entry, "roots", []), *filter(None, [getattr(entry, "root", None)])]:
                (tmp_path / root.lstrip("/")).mkdir(parents=True, exist_ok=True)
        rooted = block.replace("/srv/", "srv/")
        load_tools(AgentSpec.from_text(rooted, source=str(tmp_path / "agent.yaml"), overrides=[]))
    first = AgentSpec.from_text(blocks[0].replace("  - get_current_weather                   # an entry-point tool (a plugin)\n", ""))
    assert first.known_tool_names() == [
        "list_directory", "read_file", "search_files", "fetch", "think", "todo_write", "todo_read",
        "remember", "recall", "forget",
    ]  # fmt: skip
