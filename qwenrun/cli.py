"""The ``qwenrun`` command line (Click). The only place that turns qwenrun errors into exit codes.

``validate`` and ``schema`` never import vLLM or torch; ``up`` dispatches on ``frontend.kind``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from qwenrun import __version__
from qwenrun.config import AgentSpec
from qwenrun.deploy.cli import deploy
from qwenrun.errors import ConfigError, QwenrunError
from qwenrun.evals.cli import eval_command, import_bfcl_command
from qwenrun.models_cli import model
from qwenrun.observability import configure_logging
from qwenrun.sessions_cli import replay, sessions

if TYPE_CHECKING:
    from qwenrun.agent import Agent

__all__ = ["main"]


class ConfigProblem(click.ClickException):
    """A bad agent file: printed without a traceback, exit code 2."""

    exit_code = 2


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    except QwenrunError as exc:
        raise click.ClickException(str(exc)) from None


def _load(path: str, overrides: Sequence[str]) -> AgentSpec:
    return AgentSpec.from_file(path, overrides)


def make_agent(spec: AgentSpec) -> Agent:
    """Build the agent of a spec (tests replace this to run without vLLM)."""
    from qwenrun.agent import Agent
    from qwenrun.store import open_store

    return Agent(spec, strict_plugins=False, store=open_store(spec))


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a value of the file, e.g. --set engine.max_num_seqs=8 (repeatable).",
)


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


_verbose = 0
_exit_quieted = False


def _quiet_exit() -> None:
    """Without -v, nothing after the command's own output: once the command is done, the
    interpreter's finalization writes nothing to stderr. Triton (imported by vLLM) leaks nanobind
    objects, and nanobind reports each at exit: ~30 lines of "nanobind: leaked ..." after every
    answer. Errors of the command itself are printed before this runs."""
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
    from qwenrun.plugins import load_tools

    problems = []
    for path in files:
        try:
            spec = _load(path, overrides)
            load_tools(spec, strict=True)
        except QwenrunError as exc:
            problems.append(str(exc))
            continue
        click.echo(f"{path}: ok ({spec.agent.name}, {len(spec.tools)} tools, frontend {spec.frontend.kind})")
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
    with _errors():
        spec = _load(file, overrides)
        kind = spec.frontend.kind
        _quiet_exit()
        if resume is not None and kind != "cli":
            raise click.UsageError(f"--resume is for frontend.kind cli, not {kind}")
        if kind == "chainlit":
            from qwenrun.web import serve as serve_web

            serve_web(file, overrides)
            return
        agent = make_agent(spec)
        if kind == "openai":
            from qwenrun.server import serve as serve_http

            serve_http(agent)
            return
        from qwenrun.console import repl
        from qwenrun.sessions_cli import require_session

        if resume is not None:
            require_session(agent.store, resume)
        _run_async(agent, lambda agent: repl(agent, resume=resume))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", required=True, help="The question to answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON lines.")
@set_option
def run(file: str, prompt: str, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Answer one question and exit."""
    from qwenrun.console import run_once

    with _errors():
        agent = make_agent(_load(file, overrides))
        _quiet_exit()

        async def once(agent: Agent) -> None:
            await run_once(agent, prompt, as_json=as_json)

        _run_async(agent, once)


def _run_async(agent: Agent, body: Callable[[Agent], Any]) -> None:
    async def main_task() -> None:
        from qwenrun.console import start_with_status

        try:
            await start_with_status(agent)
            await body(agent)
        finally:
            await agent.shutdown()

    asyncio.run(main_task())


@main.group(invoke_without_command=True)
@click.option("--doctor", is_flag=True, help="Import every tool and report the broken ones.")
@click.pass_context
def tools(ctx: click.Context, doctor: bool) -> None:
    """List the installed tools (entry points of group qwenrun.tools)."""
    if ctx.invoked_subcommand is not None:
        return
    from qwenrun import plugins

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
def tools_show(name: str) -> None:
    """Print the OpenAI/Hermes schema of one tool."""
    from qwenrun import plugins

    entry = plugins.installed_tools().get(name)
    if entry is None:
        raise click.ClickException(f"unknown tool {name!r}; see `qwenrun tools`")
    with _errors():
        tool = entry.load()
    click.echo(json.dumps(tool.openai_schema(), indent=2, ensure_ascii=False))


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Rebuild even if it exists.")
def tiny_model(directory: str, force: bool) -> None:
    """Build the tiny random-weight Qwen2 model used by the demo and the tests."""
    from qwenrun.tiny import build_tiny_model

    path = build_tiny_model(directory, force=force)
    click.echo(f"tiny model ready in {path}")


main.add_command(deploy)
main.add_command(model)
main.add_command(sessions)
main.add_command(replay)
main.add_command(eval_command)
main.add_command(import_bfcl_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
