"""Paths the model names, kept inside declared roots: the checks of the ``filesystem`` toolset.

:class:`Roots` turns the model's path into a real path inside one of the roots, or refuses it with a
:class:`~qwenrun.errors.ToolError` the model can read. The checks, in order:

* the text: no NUL, no ``..`` component, no character that Unicode compatibility folding (NFKC)
  turns into ``.``, ``/`` or ``\\`` (``．．／`` and friends are refused, not taken literally);
  nothing is percent-decoded, so ``%2e%2e`` is a plain file name;
* :func:`os.path.realpath` of the joined path, which must lie in a root's real path (symlinks that
  lead out are refused);
* :meth:`Roots.open`: ``O_NOFOLLOW`` (the last component cannot have become a symlink since the
  check) and ``O_NONBLOCK`` (a FIFO cannot hang the call), then the opened file's own path
  (``/proc/self/fd/N``) is checked again, so that a folder on the way swapped for a symlink between
  check and use is caught before a byte is read or written; then ``fstat``: only regular files (or
  folders where one is asked for), never devices, FIFOs or sockets, and no file over the size cap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from qwenrun.errors import ToolError

__all__ = ["Opened", "Roots"]

MAX_PATH_CHARS = 4096
_LOOKALIKE = frozenset("./\\")


@dataclass(slots=True)
class Opened:
    """An open, checked file or folder: close ``fd`` when done."""

    fd: int
    path: str
    size: int
    is_dir: bool

    def close(self) -> None:
        os.close(self.fd)


class Roots:
    """The real paths of the declared roots; the first one is where relative paths start."""

    def __init__(self, roots: list[str], base: Path | None = None) -> None:
        self.roots: list[str] = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            real = os.path.realpath(path)
            if not os.path.isdir(real):
                raise ToolError(f"root {root!r} is not a folder ({real})")
            self.roots.append(real)

    def inside(self, real: str) -> bool:
        """Whether the real path ``real`` is a root or lies under one."""
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def shown(self, real: str) -> str:
        """``real`` as the model should write it: relative to the first root where it can."""
        first = self.roots[0]
        if real == first:
            return "."
        if real.startswith(first.rstrip(os.sep) + os.sep):
            return real[len(first.rstrip(os.sep)) + 1 :]
        return real

    def resolve(self, path: str) -> str:
        """The real path of the model's ``path`` (relative: to the first root), if it is inside."""
        check_text(path)
        joined = os.path.join(self.roots[0], path) if path else self.roots[0]
        try:
            real = os.path.realpath(joined)
        except OSError as exc:  # a link on the way changed while it was read
            raise ToolError(f"{path!r} changed while it was checked: {exc.strerror}; refused") from None
        if not self.inside(real):
            raise ToolError(f"{path!r} is outside the allowed folders ({', '.join(self.roots)})")
        return real

    def open(
        self, real: str, *, flags: int = os.O_RDONLY, folder: bool = False, max_bytes: int | None = None
    ) -> Opened:
        """Open the checked real path ``real`` (see the module's docstring); ToolError if refused."""
        try:
            before = os.lstat(real)
        except FileNotFoundError:
            raise ToolError(f"{self.shown(real)!r} does not exist") from None
        except OSError as exc:
            raise ToolError(f"cannot open {self.shown(real)!r}: {exc.strerror}") from None
        _check_kind(before.st_mode, self.shown(real), folder)
        mode = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0)
        try:
            fd = os.open(real, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ToolError(f"{self.shown(real)!r} changed into a symbolic link; refused") from None
            raise ToolError(f"cannot open {self.shown(real)!r}: {exc.strerror}") from None
        try:
            opened = self._checked(fd, real, folder, max_bytes)
        except BaseException:
            os.close(fd)
            raise
        return opened

    def open_in(self, folder: Opened, name: str, flags: int) -> int:
        """Open (or create) the file ``name`` in the opened, checked ``folder``, never through a link."""
        check_text(name)
        if not name or "/" in name or name in (".", ".."):
            raise ToolError(f"{name!r} is not a file name")
        with contextlib.suppress(FileNotFoundError):  # an existing device or FIFO: refused unopened
            _check_kind(os.lstat(name, dir_fd=folder.fd).st_mode, name, False)
        mode = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            return os.open(name, mode, 0o644, dir_fd=folder.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ToolError(f"{name!r} is a symbolic link; refused") from None
            raise ToolError(f"cannot open {name!r}: {exc.strerror}") from None

    def _checked(self, fd: int, real: str, folder: bool, max_bytes: int | None) -> Opened:
        where = opened_path(fd)
        if where is not None and not self.inside(where):
            raise ToolError(f"{self.shown(real)!r} leads outside the allowed folders; refused")
        info = os.fstat(fd)
        _check_kind(info.st_mode, self.shown(real), folder)
        if where is None:  # no /proc: the path must still name the very file that was opened
            now = os.stat(real, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                raise ToolError(f"{self.shown(real)!r} changed while it was opened; refused")
        if not folder:
            _check_size(info, self.shown(real), max_bytes)
        return Opened(fd, where or real, info.st_size, folder)

    def check_fd(self, fd: int, shown: str, max_bytes: int | None = None) -> os.stat_result:
        """The checks of an opened file (its path inside, a regular file, one link, under the cap)."""
        where = opened_path(fd)
        if where is not None and not self.inside(where):
            raise ToolError(f"{shown!r} leads outside the allowed folders; refused")
        info = os.fstat(fd)
        _check_kind(info.st_mode, shown, False)
        if info.st_nlink > 1:
            raise ToolError(f"{shown!r} has other hard links (it may be a file outside the folders); refused")
        _check_size(info, shown, max_bytes)
        return info


def check_text(path: str) -> None:
    """Refuse a path whose text is unsafe before it meets the file system."""
    if len(path) > MAX_PATH_CHARS:
        raise ToolError(f"the path is longer than {MAX_PATH_CHARS} characters")
    if "\x00" in path:
        raise ToolError("the path holds a NUL character")
    parts = path.split("/")
    if ".." in parts:
        raise ToolError(f"{path!r}: '..' is not allowed; name the file from its folder instead")
    odd = sorted({char for char in path if char not in _LOOKALIKE and set(_folded(char)) & _LOOKALIKE})
    if odd:
        shown = ", ".join(f"U+{ord(char):04X}" for char in odd)
        raise ToolError(f"{path!r}: holds characters that look like '.', '/' or '\\' ({shown}); refused")


def _folded(char: str) -> str:
    return unicodedata.normalize("NFKC", char)


def opened_path(fd: int) -> str | None:
    """The real path of an open file (Linux: /proc/self/fd), None where that cannot be read."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _check_size(info: os.stat_result, shown: str, max_bytes: int | None) -> None:
    if max_bytes is not None and info.st_size > max_bytes:
        size = info.st_size
        raise ToolError(f"{shown!r} is {size} bytes, over the limit of {max_bytes} bytes (max_file_bytes)")


def _check_kind(mode: int, shown: str, folder: bool) -> None:
    if folder:
        if not stat.S_ISDIR(mode):
            raise ToolError(f"{shown!r} is not a folder")
        return
    if stat.S_ISDIR(mode):
        raise ToolError(f"{shown!r} is a folder, not a file")
    if stat.S_ISLNK(mode):
        raise ToolError(f"{shown!r} is a symbolic link; refused")
    if not stat.S_ISREG(mode):
        raise ToolError(f"{shown!r} is not a regular file (a device, FIFO or socket); refused")
