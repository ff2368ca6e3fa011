"""The seed's weather flow on the qwenrun Python API: ask, let the agent call the tool, answer.

python examples/weather.py agents/weather.yaml          # real Qwen2.5-7B-Instruct weights
python examples/weather.py agents/weather-tiny.yaml     # tiny random model (noise, forced call)
"""

from __future__ import annotations

import asyncio
import sys

from qwenrun import Agent, Final, TextDelta, ToolCall, ToolResult


async def main(path: str, question: str = "广州天气情况如何?") -> Final:
    async with Agent.from_file(path) as agent:
        async for event in agent.session().stream(question):
            if isinstance(event, ToolCall):
                print(f"[tool call] {event.name}({event.arguments})")
            elif isinstance(event, ToolResult):
                print(f"[tool result] {event.content}")
            elif isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, Final):
                print()
                return event
    raise RuntimeError("the turn ended without a final answer")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "agents/weather.yaml"))
