"""The ``shell`` toolset: one tool, ``run_command``, that runs a command line the entry allows.

The checks, in order (each refusal is a :class:`~qwenrun.errors.ToolError` the model reads):

* the length (``max_command_chars``), no NUL;
* without ``shell: true``: no shell metacharacter anywhere in the text (:data:`METACHARACTERS`:
  ``;`` ``&`` ``|`` ``<`` ``>`` ``$`` a backquote, a newline), quoted or not, then :func:`shlex.split`;
  the words, joined by one space, are the *command line* the globs see;
* ``deny`` (any glob that matches refuses it), then ``allow`` (one must match), with
  :func:`fnmatch.fnmatchcase`;
* ``cwd``: a folder under ``root`` (the :class:`~qwenrun.toolsets.paths.Roots` checks: no ``..``,
  no symlink leading out).

The program then runs through :func:`~qwenrun.toolsets.process.run_process`: without a shell
(``exec`` of the words) unless ``shell: true`` (``/bin/sh -c`` of the text), in a scrubbed
environment (PATH, HOME and TMPDIR = a scratch folder of the entry, LANG, then ``env``), under
``timeout_s`` and ``max_output_bytes``. It is not a sandbox: an allowed program can read and write
what the user running qwenrun can.
"""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Annotated

from pydantic import Field

from qwenrun.errors import ToolError
from qwenrun.toolsets.paths import Roots
from qwenrun.toolsets.process import clean_env, run_process
from qwenrun.toolsets.spec import ShellToolset

__all__ = ["Shell"]

METACHARACTERS = frozenset(";&|<>$`\n\r")
"""Refused in a command line unless ``shell: true``: what chains, pipes, redirects or substitutes."""


class Shell:
    """The ``run_command`` tool of one entry, bound to its root, globs and limits."""

    def __init__(self, settings: ShellToolset, base: Path | None) -> None:
        self.settings = settings
        self.roots = Roots([settings.root], base)
        self._scratch: str | None = None

    def described(self) -> str:
        mode = "through /bin/sh" if self.settings.shell else "without a shell (no pipes or redirections)"
        return (
            f"Allowed command lines: {', '.join(self.settings.allow)}. Commands run {mode}, at most "
            f"{self.settings.timeout_s:g} s each."
            if self.settings.timeout_s is not None
            else f"Allowed command lines: {', '.join(self.settings.allow)}. Commands run {mode}."
        )

    def scratch(self) -> str:
        """HOME and TMPDIR of the commands: one temporary folder for the entry, removed with it."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="qwenrun-shell-")
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    def check(self, command: str) -> list[str]:
        """The words of ``command`` if the entry allows it (without ``shell``: its argv); else ToolError."""
        settings = self.settings
        if len(command) > settings.max_command_chars:
            raise ToolError(f"the command is longer than {settings.max_command_chars} characters")
        if "\x00" in command:
            raise ToolError("the command holds a NUL character")
        if not settings.shell:
            found = sorted({char for char in command if char in METACHARACTERS})
            if found:
                shown = " ".join(repr(char) for char in found)
                raise ToolError(
                    f"shell metacharacters are refused ({shown}): commands run without a shell, so "
                    "there are no pipes, redirections, variables or `;`; run one command at a time"
                )
        try:
            words = shlex.split(command)
        except ValueError as exc:
            raise ToolError(f"cannot split the command: {exc}") from None
        if not words or not words[0]:
            raise ToolError("the command is empty")
        line = " ".join(words)
        for pattern in settings.deny:
            if fnmatch.fnmatchcase(line, pattern):
                raise ToolError(f"the command {line!r} is denied (deny: {pattern!r})")
        if not any(fnmatch.fnmatchcase(line, pattern) for pattern in settings.allow):
            raise ToolError(
                f"the command {line!r} is not allowed (allow: {', '.join(repr(p) for p in settings.allow)})"
            )
        return words

    async def run_command(
        self,
        command: Annotated[str, Field(min_length=1, max_length=100_000)],
        cwd: Annotated[str, Field(max_length=4096)] = ".",
    ) -> str:
        """Run a command line and read its exit status, stdout and stderr.

        Args:
            command: The command line, e.g. "ls -la src" or "git log --oneline -5".
            cwd: The folder to run it in, relative to the working root (default: the root itself).
        """
        words = self.check(command)
        folder = self.roots.resolve(cwd or ".")
        if not Path(folder).is_dir():
            raise ToolError(f"{cwd!r} is not a folder")
        argv = ["/bin/sh", "-c", command] if self.settings.shell else words
        program, path = words[0], self.settings.path
        if not self.settings.shell and "/" not in program and shutil.which(program, path=path) is None:
            raise ToolError(f"{program!r} is not found on the PATH ({path})")
        home = self.scratch()
        finished = await run_process(
            argv,
            cwd=folder,
            env=clean_env(self.settings.path, home, self.settings.env),
            timeout_s=self.settings.timeout_s,
            max_output_bytes=self.settings.max_output_bytes,
        )
        return finished.report(self.settings.max_output_bytes)
