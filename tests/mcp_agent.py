"""``qwenrun`` itself (the Click CLI) with a scripted model instead of vLLM, for tests that start
``qwenrun up FILE --set frontend.kind=mcp`` the way an MCP client does:
``python tests/mcp_agent.py up FILE [--set ...]``.

The model answers ``You said: <message>``; a message ``shout <text>`` makes it call ``shout``, a tool
that also writes to stdout (``print`` and fd 1 directly: only protocol bytes may reach the client),
then it answers with the tool's result; ``slow`` gets a long answer written slowly (10 ms a chunk,
10 s in all). With ``QWENRUN_TEST_ENGINE_FAILS`` set, the engine fails to start.
"""

from __future__ import annotations

import os
import sys

from qwenrun.agent import Agent
from qwenrun.cli import common, main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import EngineError
from qwenrun.sessions import open_store
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

SLOW = "word " * 1200


def shout(text: str) -> str:
    """Shout a text."""
    print("NOISE from print")
    os.write(1, b"NOISE on fd 1\n")
    return text.upper() + "!"


def script(request: ModelRequest) -> str:
    last = request.messages[-1]
    if last["role"] == "tool":
        return f"The tool said {last['content']}"
    message = str(last["content"])
    if message.startswith("shout "):
        return tool_call_text("shout", {"text": message.removeprefix("shout ")})
    return SLOW if message == "slow" else f"You said: {message}"


class Engine(ScriptedEngine):
    async def start(self) -> None:
        if os.environ.get("QWENRUN_TEST_ENGINE_FAILS"):
            raise EngineError("the scripted engine refuses to start")
        await super().start()


def make_agent(spec: AgentSpec) -> Agent:
    engine = Engine(script, delay_s=0.01, chunk_size=6)
    return Agent(spec, engine, tools=[Tool.from_function(shout)], store=open_store(spec))


common.make_agent = make_agent
if __name__ == "__main__":
    sys.exit(main())
