"""Built-in toolsets, declared in ``tools:`` with ``toolset:`` (no plugin to install).

* :mod:`qwenrun.toolsets.spec`: the YAML of each entry (pydantic only, so ``qwenrun validate``
  touches no file and no network).
* :mod:`qwenrun.toolsets.registry`: ``toolset:`` -> the :class:`~qwenrun.tools.Tool` objects it gives.
* :mod:`qwenrun.toolsets.filesystem` (with :mod:`qwenrun.toolsets.paths`, the path checks),
  :mod:`qwenrun.toolsets.fetch`, :mod:`qwenrun.toolsets.think`, :mod:`qwenrun.toolsets.todo`,
  :mod:`qwenrun.toolsets.shell` and :mod:`qwenrun.toolsets.python` (with
  :mod:`qwenrun.toolsets.process`, one child process under its limits), :mod:`qwenrun.toolsets.memory`
  (facts in the session store).

See docs/toolsets.md.
"""
