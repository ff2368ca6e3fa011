"""Front ends: translations of the agent's event stream (:mod:`qwenrun.events`) to a medium.

* :mod:`~qwenrun.frontends.base`: the :class:`~qwenrun.frontends.base.Launch` of ``qwenrun up``.
* :mod:`~qwenrun.frontends.settings`: the ``frontend:`` table's models;
  :mod:`~qwenrun.frontends.registry`: ``frontend.kind`` -> its ``run``.
* :mod:`~qwenrun.frontends.console` (``cli``, a REPL), :mod:`~qwenrun.frontends.openai` (an
  OpenAI-compatible server), :mod:`~qwenrun.frontends.chainlit.app` (a chat UI),
  :mod:`~qwenrun.frontends.mcp` (the agent as an MCP server).

Each keeps its state in its app or session objects, never in module globals.
"""
