"""``python -m qwenrun.cli``: the ``qwenrun`` command."""

from __future__ import annotations

import sys

from qwenrun.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
