"""``qwenrun eval`` and ``qwenrun import-bfcl`` (Click). vLLM is imported only when cases run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from qwenrun.cli.common import ConfigProblem, errors
from qwenrun.engines.base import Engine
from qwenrun.errors import QwenrunError
from qwenrun.evals.cases import select
from qwenrun.evals.runner import Via
from qwenrun.spec.agent_file import AgentSpec

__all__ = ["eval_command", "import_bfcl_command", "make_engine"]


def make_engine(spec: AgentSpec) -> Engine | None:
    """The engine to evaluate on; None: a vLLM engine of ``spec`` (tests return a scripted one)."""
    return None


@click.command("eval")
@click.argument("agent_file", type=click.Path(dir_okay=False))
@click.argument("cases_file", type=click.Path(dir_okay=False))
@click.option(
    "--via",
    type=click.Choice(["agent", "server"]),
    default="agent",
    show_default=True,
    help="Through the agent loop, or through the OpenAI server's pass-through mode.",
)
@click.option(
    "--category",
    "categories",
    multiple=True,
    metavar="NAME",
    help="Only the cases of this category (repeatable).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), metavar="N", help="At most the first N cases of each category."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Cases in flight at once (latency is per case; 1 measures it unloaded).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report (every case) as JSON.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a value of the agent file, e.g. --set model.path=DIR (repeatable).",
)
@click.option("-q", "--quiet", is_flag=True, help="No line per case on stderr.")
def eval_command(
    agent_file: str,
    cases_file: str,
    via: str,
    categories: tuple[str, ...],
    limit: int | None,
    concurrency: int,
    as_json: bool,
    overrides: tuple[str, ...],
    quiet: bool,
) -> None:
    """Score the agent's tool calls on CASES_FILE (JSONL), for qwenrun and for vLLM's Hermes parser."""
    from qwenrun.evals.cases import load_cases
    from qwenrun.evals.evaluate import evaluate
    from qwenrun.evals.report import CaseResult

    try:  # a bad agent file or case file: exit code 2
        spec = AgentSpec.from_file(agent_file, overrides)
        cases = select(load_cases(cases_file), categories, limit)
    except QwenrunError as exc:
        raise ConfigProblem(str(exc)) from None
    done = 0

    def progress(result: CaseResult) -> None:
        nonlocal done
        done += 1
        if quiet:
            return
        marks = " ".join(f"{name} {'pass' if one.passed else 'FAIL'}" for name, one in result.readers.items())
        problem = f" error: {result.error}" if result.error else ""
        line = f"[{done}/{len(cases)}] {result.id}: {marks} ({result.latency_s:.2f} s){problem}"
        click.echo(line, err=True)

    with errors():
        path: Via = "server" if via == "server" else "agent"
        work = evaluate(
            spec, cases, via=path, engine=make_engine(spec), concurrency=concurrency, on_result=progress
        )
        report = asyncio.run(work)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
    else:
        click.echo(report.table())


@click.command("import-bfcl")
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--category",
    "categories",
    multiple=True,
    metavar="NAME",
    help="A BFCL v4 category, e.g. simple_python (repeatable; needed for a wheel or folder).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the cases here (default: standard output).",
)
def import_bfcl_command(source: str, categories: tuple[str, ...], output: str | None) -> None:
    """Convert BFCL v4 data to qwenrun eval cases (JSONL).

    SOURCE is a downloaded bfcl-eval wheel (pip download --no-deps bfcl-eval), its bfcl_eval/data
    folder, or one question file such as BFCL_v4_simple_python.json (with possible_answer/ beside it).
    """
    from qwenrun.evals.bfcl import import_bfcl
    from qwenrun.evals.cases import dump_cases

    try:
        cases = import_bfcl(source, list(categories))
    except QwenrunError as exc:
        raise ConfigProblem(str(exc)) from None
    text = dump_cases(cases)
    if output is None:
        click.echo(text, nl=False)
        return
    Path(output).write_text(text, encoding="utf-8")
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.category] = counts.get(case.category, 0) + 1
    summary = ", ".join(f"{count} {category}" for category, count in counts.items())
    click.echo(f"wrote {len(cases)} cases ({summary}) to {output}", err=True)
