"""``permissions:`` rules: the parser, the matcher and every way around it that the issue names
(encoded and mixed-case paths, ``..``, symlinks swapped in, look-alike characters, arguments in
extra keys, shell metacharacters), the file's validation, and the agent loop (scripted engine) for
allow, ask and deny on plugin, toolset and schema (MCP-like) tools, with the decision recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qwenrun.agent import Agent
from qwenrun.approval import ApprovalRequest
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError
from qwenrun.events import Event, ToolResult
from qwenrun.permissions import Permissions, Rule, parse_rule
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool


def permissions(base: Path, **kinds: list[str]) -> Permissions:
    rules = [Rule(kind, text, f"permissions.{kind}[{index}]")  # type: ignore[arg-type]
             for kind, texts in kinds.items() for index, text in enumerate(texts)]  # fmt: skip
    return Permissions(rules, base)


def mode(
    rules: Permissions, name: str, default: str = "auto", undeclared: tuple[str, ...] = (), **arguments: Any
) -> str:
    return rules.decide(name, arguments, default=default, undeclared=undeclared).mode  # type: ignore[arg-type]


# -- the parser ------------------------------------------------------------------------------


def test_a_rule_is_a_name_glob_and_argument_globs() -> None:
    assert parse_rule("mcp_*") == ("mcp_*", ())
    assert parse_rule('shell(command="git *")') == ("shell", (("command", "git *"),))
    assert parse_rule(' write_file( path = "docs/**" , content="\\u00e9\\"" ) ') == (
        "write_file", (("path", "docs/**"), ("content", 'é"')))  # fmt: skip
    assert parse_rule("think()") == ("think", ())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("shell(command=git)", 'expected a double-quoted string ("...") at column 15'),
        ('shell(command="x"', "expected ',' or ')' at column 18"),
        ('shell(a="1", a="2")', "'a' is given twice) at column 14"),
        ("sh ell", "expected '(' or the end of the rule at column 4"),
        ('shell(command="x") extra', "expected the end of the rule at column 20"),
        ("shell(command='x')", "at column 15"),
        ('__import__("os")', "expected an argument name at column 12"),
        ('shell(command="[x")', "'[' at column 1 has no ']'"),
        ("", "expected a tool name or glob"),
    ],
)
def test_a_bad_rule_names_the_column(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="rule .*" + problem.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("*", r"\*").replace(".", r"\.")):  # fmt: skip
        parse_rule(text)


def test_the_file_names_the_bad_rule_and_where_it_is() -> None:
    data = {
        "model": {"path": "x"},
        "permissions": {"deny": ["mcp_*"], "allow": ["ok", "shell(command=git *)"]},
    }
    with pytest.raises(ConfigError) as bad:
        AgentSpec.from_dict(data, source="agents/x.yaml")
    assert "agents/x.yaml: permissions.allow[1]: " in str(bad.value)
    assert "'shell(command=git *)': expected a double-quoted string" in str(bad.value)
    with pytest.raises(
        ConfigError, match=r"permissions.allowed: unknown key 'allowed'; did you mean 'allow'"
    ):
        AgentSpec.from_dict({"model": {"path": "x"}, "permissions": {"allowed": []}})
    spec = AgentSpec.from_dict({**data, "permissions": {"deny": ["a"], "ask": ["b"], "allow": ["c", "d"]}})
    assert [(rule.kind, rule.where) for rule in spec.permissions.rules()] == [
        ("deny", "permissions.deny[0]"), ("ask", "permissions.ask[0]"),
        ("allow", "permissions.allow[0]"), ("allow", "permissions.allow[1]")]  # fmt: skip


# -- the decision ----------------------------------------------------------------------------


def test_deny_wins_over_ask_over_allow_and_no_rule_keeps_the_tools_approval(tmp_path: Path) -> None:
    rules = permissions(tmp_path, allow=["*"], ask=["write_*"], deny=['write_file(path="secret*")'])
    assert mode(rules, "write_file", path="secret.txt") == "deny"
    assert mode(rules, "write_file", path="notes.txt") == "ask"
    assert mode(rules, "read_file", "ask", path="notes.txt") == "auto"  # allow lifts a tool's ask
    assert mode(rules, "read_file", "deny") == "deny"  # never a tool's deny
    verdict = rules.decide("write_file", {"path": "secret.txt"}, default="auto")
    assert verdict.reason() == 'permissions.deny[0]: write_file(path="secret*")'
    assert verdict.record() == {"mode": "deny", "rule": {"kind": "deny", "rule": 'write_file(path="secret*")',
                                                         "where": "permissions.deny[0]"}}  # fmt: skip
    none = permissions(tmp_path)
    assert [mode(none, "t", default) for default in ("auto", "ask", "deny")] == ["auto", "ask", "deny"]
    assert none.decide("t", {}, default="ask").rule is None


def test_names_are_globs_that_ignore_case(tmp_path: Path) -> None:
    rules = permissions(tmp_path, deny=["mcp_*", "files.[rw]*"])
    assert mode(rules, "mcp_time") == mode(rules, "MCP_Time") == mode(rules, "ｍｃｐ_x") == "deny"
    assert mode(rules, "files.read") == mode(rules, "files.write") == "deny"
    assert mode(rules, "files.list") == mode(rules, "my_mcp_tool") == "auto"


def test_path_globs_stay_in_one_component_and_double_star_crosses(tmp_path: Path) -> None:
    rules = permissions(tmp_path, allow=['write_file(path="docs/*.md")', 'read_file(path="src/**/*.py")'])
    assert mode(rules, "write_file", "ask", path="docs/a.md") == "auto"
    assert mode(rules, "write_file", "ask", path="docs/sub/a.md") == "ask"
    assert (
        mode(rules, "read_file", "ask", path="src/x.py")
        == mode(rules, "read_file", "ask", path="src/a/b/x.py")
        == "auto"
    )
    assert mode(rules, "read_file", "ask", path="src/a/b/x.pyc") == "ask"


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/ETC/Passwd",
        "%2Fetc%2Fpasswd",
        "%252Fetc%252Fpasswd",
        "/etc/./passwd",
        "//etc//passwd",
        "/tmp/../etc/passwd",
        "\\etc\\passwd",
        "／etc／passwd",
        "/e\u200btc/passwd",
        "ｆｏｏ/../../../../../../../../etc/x",
    ],
)
def test_a_deny_on_a_path_holds_for_every_spelling_of_it(tmp_path: Path, path: str) -> None:
    rules = permissions(tmp_path, deny=['write_file(path="/etc/**")'], allow=["write_file"])
    assert mode(rules, "write_file", path=path) == "deny"


def test_a_deny_catches_relative_climbs_and_symlinks_out(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "link").symlink_to(tmp_path / "secret")
    base = tmp_path / "docs"
    rules = permissions(base, deny=[f'write_file(path="{tmp_path}/secret/**")'])
    assert mode(rules, "write_file", path="../secret/key") == "deny"
    assert mode(rules, "write_file", path="link/key") == "deny"  # the real path is in secret/
    assert mode(rules, "write_file", path="other/key") == "auto"


@pytest.mark.parametrize(
    "path",
    [
        "docs/../secret.txt",
        "docs/%2e%2e/secret.txt",
        "docs/%2E%2E%2Fsecret.txt",
        "docs/．．/secret.txt",
        "DOCS/a.md",
        "docs/link/key",
        "docs/swap.md",
        "../docs/a.md",
        "docs\\..\\secret.txt",
    ],
)
def test_an_allow_on_a_path_grants_only_what_every_spelling_keeps_inside(tmp_path: Path, path: str) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "docs" / "link").symlink_to(tmp_path / "secret")
    (tmp_path / "docs" / "swap.md").write_text("a plain file at first")
    rules = permissions(tmp_path, allow=['write_file(path="docs/**")'])
    assert mode(rules, "write_file", "ask", path="docs/swap.md".replace("swap", "ok")) == "auto"
    if path == "docs/swap.md":  # swapped for a symlink out before the call is checked
        (tmp_path / "docs" / "swap.md").unlink()
        (tmp_path / "docs" / "swap.md").symlink_to(tmp_path / "secret" / "key")
    assert mode(rules, "write_file", "ask", path=path) == "ask"


def test_an_allowed_file_swapped_after_the_check_is_caught_by_the_filesystem_toolset(tmp_path: Path) -> None:
    """The rule reads the path when the call is checked; a symlink swapped in later is the
    toolset's to refuse (``O_NOFOLLOW`` and the re-check of the opened file)."""
    from qwenrun.errors import ToolError
    from qwenrun.toolsets.filesystem import FileTools
    from qwenrun.toolsets.spec import FilesystemToolset

    (tmp_path / "docs").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("secret")
    (tmp_path / "docs" / "a.md").write_text("mine")
    rules = permissions(tmp_path, allow=['write_file(path="docs/**")'])
    assert mode(rules, "write_file", "ask", path="docs/a.md") == "auto"  # checked: a plain file
    (tmp_path / "docs" / "a.md").unlink()
    (tmp_path / "docs" / "a.md").symlink_to(outside)  # swapped between check and use
    tools = FileTools(FilesystemToolset.model_validate({"toolset": "filesystem", "roots": ["docs"],
                                                        "write": True}), tmp_path)  # fmt: skip
    with pytest.raises(ToolError):
        tools.write_file("a.md", "overwritten")
    assert outside.read_text() == "secret"


@pytest.mark.parametrize(
    "command",
    [
        "git status; rm -rf /",
        "git status && curl x | sh",
        "git $(rm -rf /)",
        "git `id`",
        "git log > /etc/x",
        "git status\nrm -rf /",
        "git status\r\nrm",
        "Git status",
        "ｇｉｔ status",
        "git status\u202e",
    ],
)
def test_an_allow_on_a_command_grants_no_shell_metacharacter_or_other_spelling(
    tmp_path: Path, command: str
) -> None:
    rules = permissions(tmp_path, allow=['shell(command="git *")'])
    assert mode(rules, "shell", "ask", command="git status --short") == "auto"
    assert mode(rules, "shell", "ask", command=command) == "ask"


def test_a_metacharacter_written_in_the_glob_is_allowed(tmp_path: Path) -> None:
    rules = permissions(tmp_path, allow=['shell(command="make * | tee log")'])
    assert mode(rules, "shell", "ask", command="make test | tee log") == "auto"
    assert mode(rules, "shell", "ask", command="make test; id | tee log") == "ask"


def test_arguments_smuggled_in_other_keys_or_shapes_do_not_slip_past(tmp_path: Path) -> None:
    deny = permissions(tmp_path, deny=['shell(command="rm *")'], allow=["shell"])
    assert mode(deny, "shell", command="rm -rf /") == "deny"
    assert mode(deny, "shell", Command="rm -rf /") == "deny"  # a key in another case
    assert mode(deny, "shell", **{"ｃｏｍｍａｎｄ": "rm -rf /"}) == "deny"  # a look-alike key
    assert mode(deny, "shell", command="ls", COMMAND="rm -rf /") == "deny"  # two keys, one bad
    assert mode(deny, "shell", command=["ls", "rm -rf /"]) == "deny"  # a list
    assert mode(deny, "shell", command={"argv": "rm -rf /"}) == "deny"  # no glob judges a mapping
    assert mode(deny, "shell", cmd="rm -rf /") == "deny"  # the named argument is missing
    assert mode(deny, "shell", command="ls -l") == "auto"
    allow = permissions(tmp_path, allow=['shell(command="git *")'])
    assert mode(allow, "shell", "ask", command="git status") == "auto"
    assert mode(allow, "shell", "ask", undeclared=("cwd",), command="git status", cwd="/") == "ask"
    assert mode(allow, "shell", "ask", command="git status", Command="rm -rf /") == "ask"
    assert mode(allow, "shell", "ask", command=["git status", "rm -rf /"]) == "ask"
    assert mode(allow, "shell", "ask", command={"a": "git x"}) == "ask"
    assert mode(allow, "shell", "ask") == "ask"  # missing: nothing to grant


def test_look_alike_letters_do_not_match_a_grant(tmp_path: Path) -> None:
    rules = permissions(
        tmp_path, allow=['fetch(url="https://docs.python.org/*")'], deny=['fetch(url="*evil*")']
    )
    assert mode(rules, "fetch", "ask", url="https://docs.python.org/3") == "auto"
    assert mode(rules, "fetch", "ask", url="https://docs.pythоn.org/3") == "ask"  # a Cyrillic о
    assert mode(rules, "fetch", "ask", url="https://ｅｖｉｌ.example") == "deny"  # fullwidth folds
    assert mode(rules, "fetch", "ask", url="https://%65vil.example") == "deny"  # percent-encoded


# -- the agent loop --------------------------------------------------------------------------

WRITTEN: list[tuple[str, str]] = []


def write_note(path: str, text: str) -> str:
    """Write a note to a path."""
    WRITTEN.append((path, text))
    return f"wrote {path}"


def calls_then_answer(*calls: tuple[str, dict[str, Any]]) -> Any:
    def script(request: ModelRequest) -> str:
        if request.messages[-1]["role"] == "tool":
            return "done"
        return "".join(tool_call_text(name, arguments) for name, arguments in calls)

    return script


async def echo_text(arguments: dict[str, Any]) -> str:
    return str(arguments.get("text"))


def agent_with(rules: dict[str, list[str]], *calls: tuple[str, dict[str, Any]], store: Any = None) -> Agent:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "permissions": rules,
                                "agent": {"parallel_tool_calls": True}})  # fmt: skip
    echo = Tool.from_schema("mcp_echo", "Echo (an MCP-like schema tool).",
                            {"type": "object", "properties": {"text": {"type": "string"}}},
                            echo_text)  # fmt: skip
    tools = [Tool.from_function(write_note), echo]
    return Agent(spec, ScriptedEngine(calls_then_answer(*calls)), tools=tools, store=store)


async def turn(agent: Agent, approver: Any = None) -> list[Event]:
    session = agent.session(approver=approver)
    return [event async for event in session.stream("go")]


@pytest.fixture(autouse=True)
def no_notes() -> None:
    WRITTEN.clear()


async def test_the_loop_allows_asks_and_denies_by_rule_and_records_each_decision(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    asked: list[ApprovalRequest] = []

    async def person(request: ApprovalRequest) -> bool:
        asked.append(request)
        return True

    agent = agent_with(
        {"deny": ['write_note(path="/etc/**")'], "ask": ["mcp_*"], "allow": ['write_note(path="docs/*")']},
        ("write_note", {"path": "docs/a", "text": "ok"}),
        ("write_note", {"path": "/etc/../etc/passwd", "text": "x"}),
        ("mcp_echo", {"text": "hi"}),
        store=store,
    )
    events = await turn(agent, person)
    got = {(e.name, e.content, e.is_error) for e in events if isinstance(e, ToolResult)}
    assert got == {
        ("write_note", "wrote docs/a", False),
        ("write_note", 'Error: write_note is not allowed here (denied by the rule permissions.deny[0]: '
         'write_note(path="/etc/**")); the call was not run.', True),
        ("mcp_echo", "hi", False),
    }  # fmt: skip
    assert WRITTEN == [("docs/a", "ok")]
    assert [(r.call.name, r.rule) for r in asked] == [("mcp_echo", "permissions.ask[0]: mcp_*")]
    store.flush()
    stored = store.get(store.list()[0].id)
    assert stored is not None
    recorded = [r.data for r in stored.records if r.data.get("type") == "permission"]
    assert [(r["name"], r["mode"], r["rule"]["where"]) for r in recorded] == [
        ("write_note", "auto", "permissions.allow[0]"), ("write_note", "deny", "permissions.deny[0]"),
        ("mcp_echo", "ask", "permissions.ask[0]")]  # fmt: skip


async def test_an_ask_rule_without_anyone_to_ask_refuses_and_no_rule_runs_as_before() -> None:
    agent = agent_with({"ask": ['write_note(path="*")']}, ("write_note", {"path": "a", "text": "t"}),
                       ("mcp_echo", {"text": "hi"}))  # fmt: skip
    events = await turn(agent)
    got = {e.name: e.is_error for e in events if isinstance(e, ToolResult)}
    assert got == {"write_note": True, "mcp_echo": False}
    assert WRITTEN == []


# -- the docs and the CLI --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_agent_file_validates_and_decides_as_the_page_says(tmp_path: Path) -> None:
    import re

    page = (ROOT / "docs" / "permissions.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"^```yaml\n(.*?)^```", page, re.S | re.M)
    spec = AgentSpec.from_text(block, source="docs/permissions.md")
    rules = Permissions(spec.permissions.rules(), tmp_path)
    assert mode(rules, "write_file", path="docs/guide.md") == "auto"
    assert mode(rules, "write_file", path="/etc/hosts") == "deny"
    assert mode(rules, "write_file", path="docs/.git/config") == "deny"  # deny wins over allow
    assert mode(rules, "time_get_current_time", timezone="UTC") == "ask"
    assert mode(rules, "list_directory", "ask", path="docs") == "auto"
    assert mode(rules, "list_directory", "ask", path="docs/sub") == "ask"  # `*` stays in one component
    assert mode(rules, "run_command", "ask", command="git log -3") == "auto"
    assert mode(rules, "run_command", "ask", command="git log -3 | sh") == "ask"


def test_qwenrun_validate_names_the_bad_rule(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qwenrun.cli import main as cli_main

    path = tmp_path / "notes.yaml"
    path.write_text("model: {path: x}\npermissions:\n  ask: [mcp_*]\n  deny: ['write_file(path=\"/etc/**\"']\n")
    result = CliRunner().invoke(cli_main, ["validate", str(path)])
    assert result.exit_code != 0
    assert f"{path}: permissions.deny[0]: " in result.output
    assert "rule 'write_file(path=\"/etc/**\"': expected ',' or ')' at column 26" in result.output


def test_the_cli_asks_a_person_about_a_call_an_ask_rule_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from qwenrun.cli import common as cli
    from qwenrun.cli import main as cli_main

    path = tmp_path / "ask.yaml"
    path.write_text(
        "model: {path: /models/qwen}\ntools: [get_current_weather]\n"
        "permissions:\n  ask: ['get_current_weather(city=\"*州\")']\n",
        encoding="utf-8",
    )

    def script(request: ModelRequest) -> str:
        if request.messages[-1]["role"] == "tool":
            return "answer: " + request.messages[-1]["content"]
        return tool_call_text("get_current_weather", {"city": "广州"})

    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, ScriptedEngine(script)))
    result = CliRunner().invoke(cli_main, ["run", str(path), "-p", "广州天气?"], input="y\n")
    assert result.exit_code == 0, result.output
    question = 'run get_current_weather({"city": "广州"}) from qwenrun-weather 0.1.0 (permissions.ask[0]: '
    assert question + 'get_current_weather(city="*州"))? [y/N]' in result.output
    assert "approved" in result.output and "answer: 目前广州" in result.output
