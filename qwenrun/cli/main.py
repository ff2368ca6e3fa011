"""The ``qwenrun`` group and its agent commands: ``validate``, ``schema``, ``up``, ``run``,
``tools``, ``tiny-model``; ``sessions``, ``replay``, ``deploy`` and ``parse`` are added from their
modules.

``validate`` and ``schema`` never import vLLM or torch and start no MCP server; ``up`` hands the
file to the front end its ``frontend.kind`` names (:func:`qwenrun.frontends.registry.launch`);
``tools --agent FILE`` starts the file's MCP servers (not its engine) to list their tools.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from qwenrun.agent.observability import configure_logging
from qwenrun.cli import common
from qwenrun.cli.common import ConfigProblem, errors, load_spec, set_option
from qwenrun.cli.deploy import deploy
from qwenrun.cli.eval import eval_command, import_bfcl_command
from qwenrun.cli.models import model
from qwenrun.cli.parse import parse
from qwenrun.cli.sessions import replay, sessions
from qwenrun.errors import QwenrunError
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.version import __version__

if TYPE_CHECKING:
    from qwenrun.agent import Agent

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwenrun")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines as text, or as JSON objects with the session id.")  # fmt: skip
def main(verbose: int, log_format: str) -> None:
    """Run Qwen agents on vLLM from one YAML file."""
    global _verbose
    _verbose = verbose
    configure_logging(verbose, "json" if log_format == "json" else "text")
    # vLLM logs to stdout by default, mixing its lines into answers and --json output; send them
    # to stderr. Quiet by default: vLLM's (and torch's C++) warnings only with -v, its errors always
    # (the user's own settings win). These variables reach vLLM's child processes too.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if verbose == 0:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        # multiprocessing's resource tracker (a process of its own) reports the shared memory that
        # vLLM's engine core leaves behind when it is stopped in a hurry
        os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")
    _quiet_exit()  # here, so that every command that starts an engine (run, up, eval, replay...) is quiet


_verbose = 0
_exit_quieted = False


def _quiet_exit() -> None:
    """Without -v, nothing after the command's own output: once the command is done, the
    interpreter's finalization writes nothing to stderr. Triton (imported by vLLM) leaks nanobind
    objects, and nanobind reports each at exit: 30 to 500 lines of "nanobind: leaked ..." after
    every command that started an engine. Errors of the command itself are printed before this
    runs; a command that never imported Triton keeps its stderr to the end."""
    global _exit_quieted
    if _verbose or _exit_quieted:
        return
    _exit_quieted = True

    def silence() -> None:
        if "triton" not in sys.modules:  # nothing to hide
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)

    atexit.register(silence)  # atexit runs last-registered first: this is registered before vLLM's


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
def validate(files: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check agent files (syntax, types, tools, template) without starting anything."""
    from qwenrun.agent.plugins import load_tools
    from qwenrun.spec.team import tool_names

    def count_tools(spec: AgentSpec) -> int:
        """The agent's tools but its MCP servers' (and its team members', each loaded: an unknown
        tool of a sub-agent is found here, not when it is first asked)."""
        for member in spec.members.values():
            count_tools(member)
        team_tools = tool_names(spec.agent.delegate_to, spec.agent.handoffs)
        return len(load_tools(spec, strict=True)) + len(team_tools)

    problems = []
    for path in files:
        try:
            spec = load_spec(path, overrides)
            tools = count_tools(spec)
        except QwenrunError as exc:
            problems.append(str(exc))
            continue
        servers = f", {len(spec.mcp_servers)} MCP servers" if spec.mcp_servers else ""
        names = [spec.agent.name, *spec.members]
        team = f", a team of {len(names)}: {', '.join(names)}" if spec.members else ""
        click.echo(
            f"{path}: ok ({spec.agent.name}, {tools} tools{servers}{team}, frontend {spec.frontend.kind})"
        )
    if problems:
        raise ConfigProblem("\n".join(problems))


@main.command()
def schema() -> None:
    """Print the JSON Schema of agent files (for yaml-language-server)."""
    document = AgentSpec.model_json_schema()
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["title"] = "qwenrun agent"
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@set_option
@click.option("--resume", metavar="SESSION_ID", help="Continue a recorded session (cli front end).")
def up(file: str, overrides: tuple[str, ...], resume: str | None) -> None:
    """Start the agent with the front end its file names (cli, chainlit or openai)."""
    from qwenrun.frontends.base import Launch
    from qwenrun.frontends.registry import launch

    with errors():
        spec = load_spec(file, overrides)
        launch(Launch(spec, file, overrides, resume, make_agent=common.make_agent, verbose=_verbose))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", required=True, help="The question to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON lines.")
@set_option
def run(file: str, prompt: str, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Answer one question and exit."""
    from qwenrun.frontends.base import run_agent
    from qwenrun.frontends.console import run_once

    with errors():
        agent = common.make_agent(load_spec(file, overrides))

        async def once(agent: Agent) -> None:
            await run_once(agent, prompt, as_json=as_json, notices=_verbose > 0)

        run_agent(agent, once)


agent_option = click.option(
    "-a", "--agent", "agent_file", type=click.Path(dir_okay=False), metavar="FILE",
    help="The tools of this agent file, its MCP servers' included (they are started; the engine is not).",
)  # fmt: skip


@main.group(invoke_without_command=True)
@click.option("--doctor", is_flag=True, help="Import every tool (start each MCP server) and report problems.")
@agent_option
@click.pass_context
def tools(ctx: click.Context, doctor: bool, agent_file: str | None) -> None:
    """List the installed tools (entry points of group qwenrun.tools), or an agent file's tools."""
    if ctx.invoked_subcommand is not None:
        return
    from qwenrun.agent import plugins

    if agent_file is not None:
        with errors():
            _agent_tools(agent_file, doctor)
        return
    if doctor:
        broken = clashes = 0
        for report in plugins.doctor():
            if report.error:
                broken += 1
                click.echo(f"BROKEN {report.entry.name} ({report.entry.origin}): {report.error}")
            elif report.clash:
                clashes += 1
                click.echo(f"CLASH  {report.entry.name} ({report.entry.origin}): {report.clash}")
            else:
                click.echo(f"ok     {report.entry.name} ({report.entry.origin})")
        problems = [f"{broken} broken tool(s); they are skipped when agents load"] if broken else []
        if clashes:
            problems.append(f"{clashes} tool name(s) declared by several packages")
        if problems:
            raise click.ClickException("; ".join(problems))
        return
    entries = plugins.installed_tools()
    if not entries:
        click.echo("No tools installed. Install a plugin, e.g.: pip install ./plugins/qwenrun-weather")
    for entry in entries.values():
        summary = _summary(entry)
        click.echo(f"{entry.name:<24} {entry.origin:<28} {summary}")


def _agent_tools(path: str, doctor: bool) -> None:
    """``qwenrun tools --agent FILE [--doctor]``: its entry-point tools, then each MCP server's."""
    from qwenrun.agent.plugins import load_tools
    from qwenrun.mcp.toolset import survey

    spec = load_spec(path, ())
    found = {tool.name: tool for tool in load_tools(spec, strict=True)}
    if spec.mcp_servers:
        click.echo(f"Starting {len(spec.mcp_servers)} MCP server(s) of {path} ...", err=True)
    reports = asyncio.run(survey(spec, found))
    if not doctor:
        for tool in found.values():
            mode = f" [approval: {tool.approval}]" if tool.approval != "auto" else ""
            summary = tool.description.splitlines()[0] if tool.description else ""
            click.echo(f"{tool.name:<24} {tool.origin:<28} {summary}{mode}")
        for report in reports:
            if report.error:
                problem = f"(MCP server {report.name!r} did not start: {report.error})"
                click.echo(click.style(problem, fg="red"))
        return
    for tool in found.values():
        if not tool.origin.startswith("MCP server"):
            click.echo(f"ok     {tool.name} ({tool.origin})")
    failed = 0
    for report in reports:
        label = f"MCP server {report.name!r} ({report.transport})"
        if report.error:
            failed += 1
            click.echo(f"BROKEN {label}: {report.error}")
            continue
        listed = ", ".join(tool.name for tool in report.tools) or "none"
        click.echo(f"ok     {label}: {len(report.tools)} tools: {listed}")
        for problem in report.problems:
            click.echo(f"WARN   {label}: {problem}")
        failed += any(" clashes with " in problem for problem in report.problems)
    if failed:
        raise click.ClickException(f"{failed} MCP server(s) with problems; see above")


def _summary(entry: Any) -> str:
    """The first line of the tool's docstring, read without importing when possible."""
    try:
        tool = entry.load()
    except Exception as exc:  # listing must not fail on a broken plugin
        cause = exc.__cause__ or exc
        return click.style(f"(broken: {type(cause).__name__}; see qwenrun tools --doctor)", fg="red")
    return str(tool.description.splitlines()[0]) if tool.description else ""


@tools.command("show")
@click.argument("name")
@agent_option
def tools_show(name: str, agent_file: str | None) -> None:
    """Print the OpenAI/Hermes schema of one tool (of an agent file: MCP tools too)."""
    from qwenrun.agent import plugins

    if agent_file is not None:
        from qwenrun.mcp.toolset import survey

        with errors():
            spec = load_spec(agent_file, ())
            found = {tool.name: tool for tool in plugins.load_tools(spec, strict=True)}
            if name not in found and spec.mcp_servers:
                asyncio.run(survey(spec, found))
        if name not in found:
            raise click.ClickException(f"unknown tool {name!r}; see `qwenrun tools --agent {agent_file}`")
        click.echo(json.dumps(found[name].openai_schema(), indent=2, ensure_ascii=False))
        return
    entry = plugins.installed_tools().get(name)
    if entry is None:
        raise click.ClickException(f"unknown tool {name!r}; see `qwenrun tools`")
    with errors():
        tool = entry.load()
    click.echo(json.dumps(tool.openai_schema(), indent=2, ensure_ascii=False))


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Rebuild even if it exists.")
@click.option(
    "--flavour", type=click.Choice(["qwen2", "qwen3", "qwen3_coder"]), default="qwen2", show_default=True,
    help="qwen2: Qwen2.5's chat template; qwen3: Qwen3's (thinking, Hermes calls); qwen3_coder: "
    "Qwen3-Coder's (XML calls).",
)  # fmt: skip
def tiny_model(directory: str, force: bool, flavour: str) -> None:
    """Build the tiny random-weight Qwen model used by the demo and the tests."""
    from qwenrun.weights.tiny import build_tiny_model

    path = build_tiny_model(directory, force=force, flavour=flavour)
    click.echo(f"tiny model ({flavour}) ready in {path}")


main.add_command(deploy)
main.add_command(model)
main.add_command(parse)
main.add_command(sessions)
main.add_command(replay)
main.add_command(eval_command)
main.add_command(import_bfcl_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
