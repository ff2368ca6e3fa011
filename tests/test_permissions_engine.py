"""``permissions:`` on the real vLLM engine (tiny random-weight model, calls pinned): the built-in
filesystem toolset's calls pass the rules in the loop, a denied call's error names its rule and goes
back to the model through the real chat template, an allowed one writes its file."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_mcp_engine import agent_spec, calls

from qwenrun.agent import Agent
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, ToolResult
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine


async def test_deny_and_allow_rules_on_the_real_engine(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "secret").mkdir()
    data = agent_spec(tiny_spec, {"toolset": "filesystem", "roots": ["."], "write": True}).model_dump(
        mode="json"
    )
    data["permissions"] = {"deny": ['write_file(path="secret/**")'], "allow": ['write_file(path="docs/**")']}
    data["agent"]["parallel_tool_calls"] = True
    spec = AgentSpec.from_dict(data, source=str(tmp_path / "agent.yaml"))
    pinned = PinnedEngine(
        engine,
        calls(
            ("write_file", {"path": "docs/a.md", "content": "ok"}),
            ("write_file", {"path": "docs/../SECRET/key", "content": "stolen"}),
        ),
        call_max_tokens=300,
    )
    async with Agent(spec, pinned) as agent:
        events = [event async for event in agent.session(record=False).stream("write the files")]
        schemas = agent.tool_schemas()
    outcomes = sorted((event.is_error, event.content) for event in events if isinstance(event, ToolResult))
    assert len(outcomes) == 2 and not outcomes[0][0] and outcomes[1][0]
    assert "docs/a.md" in outcomes[0][1]
    assert outcomes[1][1] == (
        "Error: write_file is not allowed here (denied by the rule permissions.deny[0]: "
        'write_file(path="secret/**")); the call was not run.'
    )
    assert (tmp_path / "docs" / "a.md").read_text() == "ok"
    assert list((tmp_path / "secret").iterdir()) == []
    final = events[-1]
    assert isinstance(final, Final) and final.tool_calls == 2
    prompt = engine.render(pinned.requests[1], schemas)  # the refusal went back to the model
    assert "denied by the rule permissions.deny[0]" in prompt
