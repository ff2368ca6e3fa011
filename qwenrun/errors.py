"""The exception tree of qwenrun.

Library code raises these; only the CLI turns them into ``click.ClickException``.
"""

from __future__ import annotations


class QwenrunError(Exception):
    """Base class of every error qwenrun raises on purpose."""


class ConfigError(QwenrunError):
    """An agent file is unreadable, malformed or invalid. The message names file, path and problem."""


class PluginError(QwenrunError):
    """A tool plugin is missing, fails to import or has an unusable signature."""


class ToolError(QwenrunError):
    """A tool call failed: bad arguments, an exception in the tool, a timeout."""


class EngineError(QwenrunError):
    """The inference engine failed to start, died, or rejected a request."""


class OutputError(QwenrunError):
    """The final answer of a turn is not valid JSON of its output schema (``agent.output_schema`` or
    a request's), even after one repair: cut off at ``max_tokens``, or failing a check the engine's
    grammar cannot enforce (a pydantic validator, a ``format``). The message says what is wrong."""


class RequestError(QwenrunError):
    """The engine refused one request as invalid: a prompt longer than ``max_model_len``, a
    sampling value vLLM rejects. The caller's fault, not the engine's: the engine goes on serving
    (the OpenAI server answers 400, not 503). ``code`` is OpenAI's error code, if it has one."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class StoreError(QwenrunError):
    """A session store cannot be used: its database is unreachable, or its schema is newer than
    this qwenrun's. The message names the store (a database URL without its password)."""


class ModelError(QwenrunError):
    """A model could not be fetched, verified or converted (``qwenrun model``)."""


class ChecksumError(ModelError):
    """A downloaded file is not the one a recipe pins (size or sha256); the download is deleted."""


class DownloadError(ModelError):
    """The package registry is unreachable, or does not have a package a recipe needs."""


class DiskFullError(ModelError):
    """Not enough free space to download or convert a model; nothing partial is kept."""


class EvalError(QwenrunError):
    """An eval case file is unreadable or invalid, or benchmark data cannot be imported. The message
    names the file, the line and the problem."""


class MissingExtraError(QwenrunError):
    """An optional dependency (a front end's extra) is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; install it with: pip install 'qwenrun[{extra}]'")
        self.package = package
        self.extra = extra
