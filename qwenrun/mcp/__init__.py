"""MCP servers as tools (``tools: [{mcp: {...}}]`` in the agent file), with the official ``mcp`` SDK.

* :mod:`qwenrun.mcp.spec`: the YAML of one server entry (stdio or streamable HTTP, ``allow`` /
  ``deny``, ``approval``, time limits); pydantic only, so ``qwenrun validate`` starts nothing.
* :mod:`qwenrun.mcp.connection`: one running server: its supervisor task, restarts with backoff,
  calls, and a shutdown that leaves no child process behind.
* :mod:`qwenrun.mcp.processes`: a stdio server's processes, found by a marker variable (Linux).
* :mod:`qwenrun.mcp.toolset`: the servers of one agent as qwenrun :class:`~qwenrun.tools.Tool` s
  (schemas and results translated, name clashes refused), started and stopped with the agent.

The SDK (and the starlette/uvicorn it pulls in) is imported only when a server starts.
See docs/mcp.md.
"""
