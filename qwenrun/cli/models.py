"""``qwenrun model fetch|import|list``: the command line of :mod:`qwenrun.weights.fetch`
(registered by the CLI).

Progress goes to stderr; ``fetch`` prints only the model folder on stdout, so scripts can write
``QWEN_MODEL=$(qwenrun model fetch qwen2.5-coder-0.5b)``.
"""

from __future__ import annotations

from pathlib import Path

import click

from qwenrun.cli.common import errors
from qwenrun.weights import convert
from qwenrun.weights import fetch as models

__all__ = ["model"]

_DTYPES = click.Choice(["bfloat16", "float16", "float32"])


def _progress(message: str) -> None:
    click.echo(message, err=True)


@click.group()
def model() -> None:
    """Fetch, convert and list real models (GGUF -> a folder vLLM loads)."""


@model.command("fetch")
@click.argument("name")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--dtype", type=_DTYPES, default="bfloat16", show_default=True, help="Weights' dtype on disk.")
def fetch(name: str, directory: str | None, dtype: str) -> None:
    """Download, verify (sha256) and convert the model NAME; print its folder.

    DIRECTORY defaults to the cache ($QWENRUN_MODELS_DIR, else
    ${XDG_CACHE_HOME:-~/.cache}/qwenrun/models/NAME); a second fetch is instant.
    See `qwenrun model list` for the names.
    """
    with errors():
        path = models.fetch(name, directory, dtype=dtype, report=_progress)
    click.echo(str(path))


@model.command("import")
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dtype", type=_DTYPES, default="bfloat16", show_default=True, help="Weights' dtype on disk.")
def import_(gguf_file: str, directory: str, dtype: str) -> None:
    """Convert GGUF_FILE into DIRECTORY (safetensors, tokenizer, chat template) for vLLM."""
    with errors():
        written = convert.import_gguf(gguf_file, directory, dtype=dtype, report=_progress)
    for path in written:
        click.echo(f"{path}  ({_size(path)})")
    click.echo(f"use it with: qwenrun up AGENT.yaml --set model.path={Path(directory)}", err=True)


@model.command("list")
def list_() -> None:
    """The known models, and where each is cached."""
    for recipe in models.RECIPES.values():
        path = models.cached_path(recipe.name)
        default = models.cache_dir() / recipe.name
        where = str(path) if path is not None else f"not fetched (would go to {default})"
        click.echo(f"{recipe.name}  {recipe.size / 1e6:.0f} MB GGUF, {recipe.licence}: {recipe.description}")
        click.echo(f"    {where}")


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size} bytes"
