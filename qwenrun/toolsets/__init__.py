"""Built-in toolsets, declared in ``tools:`` with ``toolset:`` (no plugin to install).

* :mod:`qwenrun.toolsets.spec`: the YAML of each entry (pydantic only, so ``qwenrun validate``
  touches no file and no network).
* :mod:`qwenrun.toolsets.registry`: ``toolset:`` -> the :class:`~qwenrun.tools.Tool` objects it gives.
* :mod:`qwenrun.toolsets.filesystem` (with :mod:`qwenrun.toolsets.paths`, the path checks),
  :mod:`qwenrun.toolsets.fetch`, :mod:`qwenrun.toolsets.think`, :mod:`qwenrun.toolsets.todo`.

See docs/toolsets.md.
"""
