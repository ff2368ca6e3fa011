"""The ``qwenrun`` command line (Click): :mod:`~qwenrun.cli.main` (the group and the agent
commands), :mod:`~qwenrun.cli.sessions` (``sessions``, ``replay``), :mod:`~qwenrun.cli.deploy`
(``deploy``), and :mod:`~qwenrun.cli.common` (loading files, errors as exit codes)."""

from __future__ import annotations

from qwenrun.cli.main import main

__all__ = ["main"]
