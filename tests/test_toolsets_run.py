"""The ``shell`` and ``python`` toolsets: every refusal, the limits (proved by the error they raise,
under hang guards far above them), the scrubbed environment and the scratch folders."""

from __future__ import annotations

import asyncio
import os
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

GUARD = 120  # seconds: a hang guard far above every limit the tests set (1 to 3 s)


def tools_of(entry: dict[str, Any]) -> dict[str, Tool]:
    spec = AgentSpec.from_dict({"model": {"path": "x"}, "tools": [entry]})
    return {tool.name: tool for tool in load_tools(spec)}


def shell(root: Path, **settings: Any) -> Tool:
    entry = {"toolset": "shell", "root": str(root), "allow": ["*"], **settings}
    return tools_of(entry)["run_command"]


def python(**settings: Any) -> Tool:
    return tools_of({"toolset": "python", **settings})["run_python"]


async def call(tool: Tool, **arguments: Any) -> str:
    return str(await asyncio.wait_for(tool.call(arguments), GUARD))


async def in_session(session: str, tool: Tool, **arguments: Any) -> str:
    token = SESSION_ID.set(session)
    try:
        return await call(tool, **arguments)
    finally:
        SESSION_ID.reset(token)


# -- the YAML ---------------------------------------------------------------------------------------


def test_defaults_ask_for_approval_and_bad_settings_are_named(tmp_path: Path) -> None:
    tool = shell(tmp_path)
    assert tool.approval == "ask" and tool.timeout_s == 31
    assert python().approval == "ask"
    assert tools_of({"toolset": "python", "approval": "auto"})["run_python"].approval == "auto"
    with pytest.raises(ConfigError, match=r"tools\[0\]\.allow: required key is missing"):
        AgentSpec.from_dict({"model": {"path": "x"}, "tools": [{"toolset": "shell", "root": "."}]})
    with pytest.raises(ConfigError, match=r"tools\[0\]\.env: key '1BAD'"):
        AgentSpec.from_dict({"model": {"path": "x"}, "tools": [{"toolset": "python", "env": {"1BAD": "x"}}]})
    with pytest.raises(ConfigError, match="root 'missing' is not a folder"):
        load_tools(AgentSpec.from_dict({"model": {"path": "x"}, "tools": [
            {"toolset": "shell", "root": "missing", "allow": ["*"]}]}, source=str(tmp_path / "a.yaml")))  # fmt: skip


# -- shell: what is refused -------------------------------------------------------------------------


async def test_allow_and_deny_globs(tmp_path: Path) -> None:
    tool = shell(tmp_path, allow=["echo *", "ls", "ls *"], deny=["* -R*", "ls /*"])
    assert await call(tool, command="echo 'two  words'") == "exit status 0\n--- stdout ---\ntwo  words"
    with pytest.raises(ToolError, match=r"the command 'cat /etc/passwd' is not allowed \(allow: 'echo \*'"):
        await call(tool, command="cat /etc/passwd")
    with pytest.raises(ToolError, match=r"the command 'ls -R' is denied \(deny: '\* -R\*'\)"):
        await call(tool, command="ls -R")
    with pytest.raises(ToolError, match="is denied"):
        await call(tool, command="ls   '/etc'")  # the globs see the words, not the quoting
    with pytest.raises(ToolError, match="the command is empty"):
        await call(tool, command="''")
    with pytest.raises(ToolError, match="cannot split the command: No closing quotation"):
        await call(tool, command="echo 'open")


@pytest.mark.parametrize("command", ["echo a; rm -rf x", "echo a && echo b", "echo a | cat", "echo $HOME",
                                     "echo `id`", "echo $(id)", "echo a > f", "cat < f", "echo a\necho b",
                                     "echo ';'"])  # fmt: skip
async def test_shell_metacharacters_are_refused_without_a_shell(tmp_path: Path, command: str) -> None:
    with pytest.raises(ToolError, match="shell metacharacters are refused"):
        await call(shell(tmp_path), command=command)
    assert list(tmp_path.iterdir()) == []


async def test_with_shell_true_the_shell_runs_it(tmp_path: Path) -> None:
    tool = shell(tmp_path, shell=True, allow=["echo *"])
    assert await call(tool, command="echo a | tr a b > out; echo done") == "exit status 0\n--- stdout ---\ndone"
    assert (tmp_path / "out").read_text() == "b\n"


async def test_cwd_stays_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    tool = shell(tmp_path)
    assert await call(tool, command="pwd", cwd="sub") == f"exit status 0\n--- stdout ---\n{tmp_path / 'sub'}"
    with pytest.raises(ToolError, match=r"'\.\.' is not allowed"):
        await call(tool, command="pwd", cwd="../")
    with pytest.raises(ToolError, match="is outside the allowed folders"):
        await call(tool, command="pwd", cwd="/etc")
    with pytest.raises(ToolError, match="'nothing' is not a folder"):
        await call(tool, command="pwd", cwd="nothing")


async def test_unknown_programs_and_exit_statuses(tmp_path: Path) -> None:
    tool = shell(tmp_path)
    with pytest.raises(ToolError, match="'no-such-program' is not found on the PATH"):
        await call(tool, command="no-such-program --help")
    report = await call(tool, command="ls no-such-file")
    assert report.startswith("exit status 2\n--- stderr ---\nls: cannot access 'no-such-file'")


async def test_the_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_SECRET", "hunter2")
    tool = shell(tmp_path, env={"GREETING": "hello"})
    lines = (await call(tool, command="env")).split("\n")[2:]
    names = sorted(line.partition("=")[0] for line in lines)
    assert names == ["GREETING", "HOME", "LANG", "PATH", "TMPDIR"]
    home = next(line for line in lines if line.startswith("HOME=")).partition("=")[2]
    assert Path(home).name.startswith("qwenrun-shell-") and home != os.environ.get("HOME")
    assert "hunter2" not in "\n".join(lines)


async def test_a_hanging_command_is_killed_with_its_whole_process_group(tmp_path: Path) -> None:
    tool = shell(tmp_path, shell=True, timeout_s=1)
    with pytest.raises(ToolError, match=r"stopped after 1 s \(timeout_s\); its process group was killed"):
        await call(tool, command="sleep 600 & echo $! > child.pid; wait")
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(200):  # the kill is sent; the child is gone (or a zombie of init) soon after
        if not _alive(child):
            break
        await asyncio.sleep(0.05)
    assert not _alive(child)


async def test_output_is_capped_and_an_endless_writer_stopped(tmp_path: Path) -> None:
    tool = shell(tmp_path, max_output_bytes=1000, timeout_s=GUARD)
    report = await call(tool, command="yes")
    assert report.endswith("[output cut at 1000 bytes (max_output_bytes); the run was stopped]")
    assert report.count("y\n") == 500 and "killed by SIGKILL" in report


# -- python -----------------------------------------------------------------------------------------


async def test_python_runs_code_in_isolated_mode() -> None:
    report = await call(python(), code="import sys\nprint(sys.flags.isolated, 6 * 7)")
    assert report == "exit status 0\n--- stdout ---\n1 42"
    failed = await call(python(), code="raise SystemExit('bad input')")
    assert failed == "exit status 1\n--- stderr ---\nbad input"


async def test_python_memory_limit() -> None:
    with pytest.raises(ToolError, match=r"ran out of memory: 256 MiB \(memory_mb\)") as caught:
        await call(python(memory_mb=256), code="print('start', flush=True)\nx = bytearray(1024 ** 3)")
    assert "start" in str(caught.value)  # the output so far comes with the error
    report = await call(python(memory_mb=256), code="x = bytearray(50 * 1024 ** 2)\nprint(len(x))")
    assert report == f"exit status 0\n--- stdout ---\n{50 * 1024**2}"


async def test_python_cpu_limit() -> None:
    with pytest.raises(ToolError, match=r"used its 1 s of CPU time \(cpu_s\) and was stopped"):
        await call(python(cpu_s=1, timeout_s=GUARD), code="while True:\n    pass")


async def test_python_wall_time_limit() -> None:
    with pytest.raises(ToolError, match=r"stopped after 1 s \(timeout_s\)"):
        await call(python(timeout_s=1), code="import time\ntime.sleep(600)")


async def test_python_output_cap_and_scrubbed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    report = await call(python(max_output_bytes=100), code="while True:\n    print('x' * 50)")
    assert report.endswith(f"---\n{'x' * 50}\n{'x' * 49}\n[output cut at 100 bytes (max_output_bytes); the run was stopped]")
    names = await call(python(), code="import os\nprint(sorted(os.environ))")
    assert names.endswith("['HOME', 'LANG', 'PATH', 'PYTHONIOENCODING', 'TMPDIR']")


async def test_python_scratch_folder_per_call() -> None:
    tool = python()
    code = "import os\nprint(os.getcwd(), os.listdir('.'))\nopen('left.txt', 'w').write('x')"
    first = (await call(tool, code=code)).split("\n")[2]
    folder, listing = first.split(" ", 1)
    assert Path(folder).name.startswith("qwenrun-python-") and listing == "['main.py']"
    assert not Path(folder).exists()  # removed after the call
    second = (await call(tool, code=code)).split("\n")[2]
    assert second.endswith("['main.py']") and not second.startswith(folder + " ")


async def test_python_scratch_folder_per_session() -> None:
    tool = python(scratch="session")
    write = "open('notes.txt', 'w').write('kept')"
    read = "import os\nprint(sorted(os.listdir('.')))"
    await in_session("a", tool, code=write)
    assert (await in_session("a", tool, code=read)).endswith("['main.py', 'notes.txt']")
    assert (await in_session("b", tool, code=read)).endswith("['main.py']")


# -- through the agent loop -------------------------------------------------------------------------


async def test_shell_and_python_through_the_loop(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("buy milk\n")
    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted"}, "sessions": {"enabled": False}, "tools": [
            {"toolset": "shell", "root": str(tmp_path), "allow": ["ls*", "cat *"], "approval": "auto"},
            {"toolset": "python", "approval": "auto"}]}
    )  # fmt: skip
    engine = ScriptedEngine([
        tool_call_text("run_command", {"command": "cat notes.md"}),
        tool_call_text("run_command", {"command": "rm notes.md"}),
        tool_call_text("run_python", {"code": "print(len('buy milk'))"}),
        "Your notes say: buy milk (8 characters).",
    ])  # fmt: skip
    events = [event async for event in Agent(spec, engine).session().stream("What do my notes say?")]
    results = [(event.content, event.is_error) for event in events if isinstance(event, ToolResult)]
    assert results[0] == ("exit status 0\n--- stdout ---\nbuy milk", False)
    assert results[1][1] and "the command 'rm notes.md' is not allowed" in results[1][0]
    assert results[2] == ("exit status 0\n--- stdout ---\n8", False)
    assert (tmp_path / "notes.md").exists()


async def test_without_an_approver_the_default_ask_refuses_the_run(tmp_path: Path) -> None:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "sessions": {"enabled": False},
                                "tools": [{"toolset": "shell", "root": str(tmp_path), "allow": ["*"]}]})  # fmt: skip
    engine = ScriptedEngine([tool_call_text("run_command", {"command": "touch made"}), "ok"])
    events = [event async for event in Agent(spec, engine).session().stream("go")]
    results = [event for event in events if isinstance(event, ToolResult)]
    assert results[0].is_error and not (tmp_path / "made").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
