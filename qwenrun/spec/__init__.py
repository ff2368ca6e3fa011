"""The agent file: its pydantic models (:mod:`~qwenrun.spec.agent_file`, ``extra="forbid"`` on
every table), the loading ladder with its clear errors (:mod:`~qwenrun.spec.loading`), and the
base of every settings model (:mod:`~qwenrun.spec.base`), which the engines', front ends' and MCP's
settings modules build on. ``from qwenrun import AgentSpec`` is the public face."""
