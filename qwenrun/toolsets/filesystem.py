"""The ``filesystem`` toolset: list, read and search files under declared roots; with ``write:
true`` also write and edit them. Every path goes through :class:`~qwenrun.toolsets.paths.Roots`
(no ``..``, nothing outside the roots, no symlink leading out, no device or FIFO, no file over
``max_file_bytes``); each tool is a sync function, so it runs on a thread of its own.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from pydantic import Field

from qwenrun.errors import ToolError
from qwenrun.toolsets.paths import Opened, Roots, check_text
from qwenrun.toolsets.spec import FilesystemToolset

__all__ = ["FileTools"]

PathArg = Annotated[str, Field(max_length=4096)]


class FileTools:
    """The tools of one ``filesystem`` entry, bound to its roots and limits."""

    def __init__(self, settings: FilesystemToolset, base: Path | None) -> None:
        self.settings = settings
        self.roots = Roots(settings.roots, base)

    def described(self) -> str:
        """The sentence each tool's description ends with: where it may go."""
        first, *others = self.roots.roots
        where = f"Paths are relative to {first}" + (f"; also allowed: {', '.join(others)}" if others else "")
        return f"{where}. '..' is not allowed."

    def _read(self, real: str) -> tuple[str, bytes]:
        opened = self.roots.open(real, max_bytes=self.settings.max_file_bytes)
        try:
            data = _read_all(opened.fd, self.settings.max_file_bytes)
        finally:
            opened.close()
        return self.roots.shown(real), data

    # -- the tools -------------------------------------------------------------------------------

    def list_directory(self, path: PathArg = ".", recursive: bool = False) -> str:
        """List the files and folders in a folder (a folder's name ends with /, a file shows its size).

        Args:
            path: The folder, e.g. "." or "docs".
            recursive: Also list what the folders inside hold.
        """
        real = self.roots.resolve(path)
        lines: list[str] = []
        limit = self.settings.max_entries
        pending = [real]
        while pending and len(lines) < limit:
            folder = pending.pop(0)
            opened = self.roots.open(folder, folder=True)
            try:  # stat while the folder is open: its entries are read through its descriptor
                entries = sorted(
                    (entry.name, entry.stat(follow_symlinks=False)) for entry in os.scandir(opened.fd)
                )
            finally:
                opened.close()
            for name, info in entries:
                if len(lines) >= limit:
                    break
                inner = os.path.join(folder, name)
                shown = self.roots.shown(inner)
                if stat.S_ISDIR(info.st_mode):
                    lines.append(f"{shown}/")
                    if recursive:
                        pending.append(inner)
                elif stat.S_ISLNK(info.st_mode):
                    target = os.path.realpath(inner)
                    lines.append(
                        f"{shown} -> {'(inside)' if self.roots.inside(target) else '(outside: refused)'}"
                    )
                elif stat.S_ISREG(info.st_mode):
                    lines.append(f"{shown}  {info.st_size} bytes")
                else:
                    lines.append(f"{shown}  (not a regular file)")
        if not lines:
            return f"{self.roots.shown(real)}/ is empty"
        if len(lines) >= limit:
            lines.append(f"[stopped at {limit} entries (max_entries)]")
        return "\n".join(lines)

    def read_file(
        self,
        path: PathArg,
        start_line: Annotated[int, Field(ge=1)] = 1,
        max_lines: Annotated[int, Field(ge=1)] | None = None,
    ) -> str:
        """Read a text file, whole or some of its lines.

        Args:
            path: The file, e.g. "notes/todo.md".
            start_line: The first line to read (1: from the start).
            max_lines: At most this many lines (default: to the end).
        """
        shown, data = self._read(self.roots.resolve(path))
        if b"\x00" in data:
            return f"{shown} is a binary file ({len(data)} bytes): not shown"
        text = data.decode("utf-8", errors="replace")
        if start_line == 1 and max_lines is None:
            return text
        lines = text.splitlines(keepends=True)
        end = len(lines) if max_lines is None else start_line - 1 + max_lines
        return "".join(lines[start_line - 1 : end]) or f"({shown} has {len(lines)} lines)"

    def search_files(
        self,
        text: Annotated[str, Field(min_length=1, max_length=1000)],
        path: PathArg = ".",
        name_pattern: Annotated[str, Field(max_length=200)] = "*",
    ) -> str:
        """Find the lines of text files that contain a text (case-insensitive), under a folder.

        Args:
            text: The text to look for (not a regular expression).
            path: The folder to search, e.g. "." or "src".
            name_pattern: Only files whose name matches this shell pattern, e.g. "*.md".
        """
        check_text(name_pattern)
        real = self.roots.resolve(path)
        needle = text.casefold()
        found: list[str] = []
        files = skipped = 0
        limit, cap = self.settings.max_entries, self.settings.max_files_searched
        for folder, names in _walk(self.roots, real):
            for name in names:
                if len(found) >= limit or files >= cap:
                    break
                if not fnmatch.fnmatch(name, name_pattern):
                    continue
                files += 1
                try:
                    shown, data = self._read(os.path.join(folder, name))
                except ToolError:
                    skipped += 1
                    continue
                if b"\x00" in data:
                    continue
                for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                    if needle in line.casefold():
                        found.append(f"{shown}:{number}: {line.strip()[:300]}")
                        if len(found) >= limit:
                            break
        notes = []
        if len(found) >= limit:
            notes.append(f"stopped at {limit} matches (max_entries)")
        if files >= cap:
            notes.append(f"stopped after {cap} files (max_files_searched)")
        if skipped:
            notes.append(f"{skipped} files skipped (too large, not regular, or leading outside)")
        body = "\n".join(found) or f"no line contains {text!r}"
        return body + "".join(f"\n[{note}]" for note in notes)

    def write_file(self, path: PathArg, content: str) -> str:
        """Write a text file: create it, or replace all of its content. Its folder must exist.

        Args:
            path: The file, e.g. "notes/plan.md".
            content: The whole new content.
        """
        data = content.encode("utf-8")
        self._check_size(len(data))
        folder, name = self._folder_of(path)
        try:
            fd = self.roots.open_in(folder, name, os.O_WRONLY | os.O_CREAT)
            try:
                self.roots.check_fd(fd, path)
                _replace(fd, data)
            finally:
                os.close(fd)
        finally:
            folder.close()
        return f"wrote {len(data)} bytes to {self.roots.shown(os.path.join(folder.path, name))}"

    def edit_file(
        self,
        path: PathArg,
        old_text: Annotated[str, Field(min_length=1)],
        new_text: str,
    ) -> str:
        """Replace one exact piece of a text file with another (it must occur exactly once).

        Args:
            path: The file, e.g. "notes/plan.md".
            old_text: The text to replace, exactly as it is in the file (enough of it to be unique).
            new_text: What to put in its place.
        """
        folder, name = self._folder_of(path)
        try:
            fd = self.roots.open_in(folder, name, os.O_RDWR)
            try:
                self.roots.check_fd(fd, path, self.settings.max_file_bytes)
                text = _read_all(fd, self.settings.max_file_bytes).decode("utf-8")
                count = text.count(old_text)
                if count != 1:
                    where = "does not occur" if count == 0 else f"occurs {count} times"
                    raise ToolError(f"old_text {where} in {path!r}; give a piece that occurs exactly once")
                data = text.replace(old_text, new_text).encode("utf-8")
                self._check_size(len(data))
                _replace(fd, data)
            finally:
                os.close(fd)
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not UTF-8 text; refused") from None
        finally:
            folder.close()
        return f"edited {path}: replaced 1 occurrence ({len(data)} bytes now)"

    # -- helpers ---------------------------------------------------------------------------------

    def _check_size(self, size: int) -> None:
        if size > self.settings.max_file_bytes:
            raise ToolError(f"the content is {size} bytes, over the limit of {self.settings.max_file_bytes}")

    def _folder_of(self, path: str) -> tuple[Opened, str]:
        """The opened, checked folder of ``path`` and the file's name in it."""
        check_text(path)
        head, _, name = path.rstrip("/").rpartition("/")
        if not name or name == ".":
            raise ToolError(f"{path!r} does not name a file")
        folder = self.roots.resolve(head or ".")
        return self.roots.open(folder, folder=True), name


def _read_all(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes of an open file, from its start (ToolError if there are more)."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ToolError(f"the file grew over the limit of {limit} bytes (max_file_bytes) while it was read")
    return b"".join(chunks)


def _replace(fd: int, data: bytes) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _walk(roots: Roots, top: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of ``top`` and the folders under it, symlinked folders not followed."""
    for folder, folders, names in os.walk(top, followlinks=False):
        folders.sort()
        if roots.inside(os.path.realpath(folder)):
            yield folder, sorted(names)
