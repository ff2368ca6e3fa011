"""The OpenAI server's reasoning and Qwen3-Coder calls on the scripted engine, through the official
client: ``reasoning`` / ``reasoning_content`` on messages and stream deltas, ``include_reasoning``,
``chat_template_kwargs`` and ``thinking_token_budget`` per request, XML arguments sent as fragments
once the call is complete (a malformed one as text), a remote endpoint's lone ``</think>``. (The same on the real engine: ``test_toolcalls_server.py``.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_server import AGENT, QUESTION, SERVED, WEATHER_TOOL, Harness, scripted_server

from qwenrun.engines.scripted import tool_call_text

USER: Any = [{"role": "user", "content": QUESTION}]
THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\n"
CODE = 'if tag == "</tool_call>":\n    return "</parameter>"'
CODE_TOOL: Any = {"type": "function", "function": {"name": "run_code", "parameters": {
    "type": "object", "properties": {"code": {"type": "string"}, "times": {"type": "integer"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    with scripted_server() as harness:
        yield harness


@pytest.fixture
def srv(server: Harness) -> Harness:
    server.engine.calls.clear()
    server.engine.tool_call_format = "hermes"
    server.replies.clear()
    server.script = None
    return server


def extra(item: Any) -> dict[str, Any]:
    return item.model_extra or {}


def stream_parts(chunks: list[Any]) -> tuple[str, str, dict[int, list[str]]]:
    content, reasoning, fragments = "", "", {}
    for chunk in chunks:
        for choice in chunk.choices:
            fields = extra(choice.delta)
            assert fields.get("reasoning") == fields.get("reasoning_content")  # both names, always equal
            content += choice.delta.content or ""
            reasoning += fields.get("reasoning") or ""
            for call in choice.delta.tool_calls or ():
                if call.function and call.function.arguments:
                    fragments.setdefault(call.index, []).append(call.function.arguments)
    return content, reasoning, fragments


@pytest.mark.parametrize("tools", [[WEATHER_TOOL], None], ids=["with-tools", "without-tools"])
def test_reasoning_like_vllm_reasoning_parser_qwen3(srv: Harness, tools: Any) -> None:
    srv.script = lambda request: THOUGHT + "Hello. <tool_call> is a tag."
    with srv.sync_client() as client:
        kwargs: Any = {"tools": tools} if tools else {}
        whole = client.chat.completions.create(model=SERVED, messages=USER, **kwargs).choices[0]
        chunks = list(client.chat.completions.create(model=SERVED, messages=USER, stream=True, **kwargs))
        hidden = client.chat.completions.create(
            model=SERVED, messages=USER, extra_body={"include_reasoning": False}
        )
    content = (
        "Hello." if tools else "Hello. <tool_call> is a tag."
    )  # with tools, an unclosed call (malformed)
    if tools:
        assert (
            whole.message.content == "Hello. <tool_call> is a tag.</tool_call>"
        )  # returned as text, as vLLM does
    else:
        assert whole.message.content == content
    assert (extra(whole.message)["reasoning"], extra(whole.message)["reasoning_content"]) == (
        "The user wants the weather.", "The user wants the weather.",
    )  # fmt: skip
    streamed, reasoning, fragments = stream_parts(chunks)
    assert (streamed, reasoning, fragments) == (whole.message.content, "The user wants the weather.", {})
    assert hidden.choices[0].message.content == "Hello. <tool_call> is a tag."
    assert "reasoning" not in extra(hidden.choices[0].message)


def test_template_variables_budget_and_earlier_reasoning_reach_the_engine(srv: Harness) -> None:
    srv.script = lambda request: "ok"
    history: Any = [*USER, {"role": "assistant", "content": "晴。", "reasoning": "old thoughts"},
                    {"role": "user", "content": "谢谢"}]  # fmt: skip
    with srv.sync_client() as client:
        client.chat.completions.create(model=SERVED, messages=history, extra_body={
            "chat_template_kwargs": {"enable_thinking": False}, "thinking_token_budget": 16})  # fmt: skip
        client.chat.completions.create(model=AGENT, messages=USER, extra_body={
            "chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": -1})  # fmt: skip
    passthrough, agent = srv.engine.calls
    assert passthrough.chat_template_kwargs == {"enable_thinking": False}
    assert passthrough.overrides["thinking_token_budget"] == 16
    assert passthrough.messages[1] == {
        "role": "assistant",
        "content": "晴。",
        "reasoning_content": "old thoughts",
    }
    assert agent.chat_template_kwargs == {"enable_thinking": True}
    assert agent.overrides["thinking_token_budget"] is None  # -1: no limit, over the agent file's


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "the server sets add_generation_prompt itself"),
        ({"chat_template_kwargs": {"not a name": 1}}, "not a template variable name: 'not a name'"),
        ({"thinking_token_budget": -2}, "greater than or equal to -1"),
    ],
)  # fmt: skip
def test_bad_thinking_fields_are_400s(srv: Harness, body: dict[str, Any], message: str) -> None:
    response = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": SERVED, "messages": USER, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == next(iter(body))


def test_qwen3_coder_calls_stream_their_arguments(srv: Harness) -> None:
    """vLLM #30439: XML arguments go out as the fragments of their values (once the call is known
    to be well-formed); a value quoting the closing tags stays whole (vLLM PR #45310); stream and
    non-stream agree."""
    srv.engine.tool_call_format = "qwen3_coder"
    first = tool_call_text("run_code", {"code": CODE, "times": 2}, format="qwen3_coder")
    second = tool_call_text("run_code", {"code": "pass"}, format="qwen3_coder")
    srv.script = lambda request: THOUGHT + "Running.\n" + first + "\n" + second
    with srv.sync_client() as client:
        whole = client.chat.completions.create(model=SERVED, messages=USER, tools=[CODE_TOOL]).choices[0]
        chunks = list(
            client.chat.completions.create(model=SERVED, messages=USER, tools=[CODE_TOOL], stream=True)
        )
        single = list(client.chat.completions.create(model=SERVED, messages=USER, tools=[CODE_TOOL], stream=True,
                                                     parallel_tool_calls=False))  # fmt: skip
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]  # type: ignore[union-attr]
    assert calls == [("run_code", {"code": CODE, "times": 2}), ("run_code", {"code": "pass"})]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Running."
    content, reasoning, fragments = stream_parts(chunks)
    assert (content, reasoning) == ("Running.", "The user wants the weather.")
    assert ["".join(parts) for parts in fragments.values()] == [
        c.function.arguments for c in whole.message.tool_calls or []
    ]  # type: ignore[union-attr]
    assert len(fragments[0]) > 5  # the code value's pieces as the parser read them
    headers = [t for c in chunks for t in c.choices[0].delta.tool_calls or [] if t.id]
    assert [(t.index, t.function.name if t.function else None) for t in headers] == [
        (0, "run_code"),
        (1, "run_code"),
    ]
    assert list(stream_parts(single)[2]) == [0]


def test_agent_mode_returns_the_reasoning_of_every_model_call(srv: Harness) -> None:
    srv.replies[:] = [THOUGHT + tool_call_text("get_current_weather", {"city": "深圳"}),
                      "<think>\nNow answer.\n</think>\n\n深圳多云。"] * 2  # fmt: skip
    with srv.sync_client() as client:
        whole = client.chat.completions.create(model=AGENT, messages=USER).choices[0].message
        chunks = list(client.chat.completions.create(model=AGENT, messages=USER, stream=True))
    assert whole.content == "深圳多云。"
    expected = "The user wants the weather.\n\nNow answer."
    assert (extra(whole)["reasoning"], extra(whole)["reasoning_content"]) == (expected, expected)
    assert stream_parts(chunks)[:2] == ("深圳多云。", expected)


GIVEN_TWICE = ("<tool_call>\n<function=run_code>\n<parameter=code>\nx = 1\n</parameter>\n"
               "<parameter=code>\ny = 2\n</parameter>\n</function>\n</tool_call>")  # fmt: skip
CUT = "<tool_call>\n<function=run_code>\n<parameter=code>\nprint(1)\nprint("  # max_tokens came


@pytest.mark.parametrize(
    ("answer", "calls"),
    [
        (f"Running.\n{GIVEN_TWICE}\n" + tool_call_text("run_code", {"code": "pass"}, format="qwen3_coder"),
         [("run_code", {"code": "pass"})]),
        (f"Running.\n{CUT}", []),
    ],
    ids=["parameter-given-twice-then-a-good-call", "cut-inside-a-value"],
)  # fmt: skip
def test_a_streamed_xml_call_that_ends_malformed_is_text_in_the_stream_too(
    srv: Harness, answer: str, calls: list[tuple[str, Any]]
) -> None:
    """A Qwen3-Coder call whose arguments were being written and that then turns out malformed is
    returned as text, streamed or not: the stream never sends it as a call (a client cannot take a
    call back), and the next call gets index 0."""
    srv.engine.tool_call_format = "qwen3_coder"
    srv.engine.chunk_size = 2
    srv.script = lambda request: answer
    with srv.sync_client() as client:
        whole = client.chat.completions.create(model=SERVED, messages=USER, tools=[CODE_TOOL]).choices[0]
        chunks = list(client.chat.completions.create(model=SERVED, messages=USER, tools=[CODE_TOOL], stream=True))
    got = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]  # type: ignore[union-attr]
    assert got == calls
    assert whole.message.content is not None and whole.message.content.startswith("Running.\n<tool_call>")
    content, _, fragments = stream_parts(chunks)
    headers = [t for c in chunks for t in c.choices[0].delta.tool_calls or [] if t.id] if chunks else []
    assert content == whole.message.content
    assert [(t.index, t.function.name if t.function else None) for t in headers] == [
        (index, name) for index, (name, _) in enumerate(calls)
    ]
    assert [json.loads("".join(parts)) for parts in fragments.values()] == [args for _, args in calls]
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize(
    ("template", "reasoning", "content"),
    [
        ({"enable_thinking": True}, "Let me see.", "晴。"),
        ({"enable_thinking": False}, "", "Let me see.\n</think>\n\n晴。"),
        ({}, "", "Let me see.\n</think>\n\n晴。"),
    ],
    ids=["thinking-on", "thinking-off", "thinking-unset"],
)
async def test_a_lone_close_think_from_a_remote_endpoint_ends_the_reasoning(
    srv: Harness, template: dict[str, Any], reasoning: str, content: str
) -> None:
    """``engine.kind: openai`` cannot see the endpoint's template: for an agent that thinks, text
    before a lone ``</think>`` (a Thinking-2507 template behind an endpoint without a reasoning
    parser) is reasoning, streamed or not; with ``enable_thinking`` false the template closed the
    block, and not set the text streams as it comes: both are the answer as written."""
    from qwenrun.engines.base import OutputReader, Request
    from qwenrun.engines.openai import OpenAIEngine
    from qwenrun.spec.agent_file import AgentSpec

    srv.script = lambda request: "Let me see.\n</think>\n\n晴。"
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "engine": {
        "kind": "openai", "base_url": f"{srv.url}/v1", "model": SERVED}}, source="remote.yaml")  # fmt: skip
    engine = OpenAIEngine(spec)
    await engine.start()
    try:
        for incremental in (True, False):
            reader = OutputReader()
            request = Request(messages=USER, chat_template_kwargs=template, incremental=incremental)
            async for delta in engine.generate(request):
                reader.feed(delta)
            reader.finish()
            assert (reader.result().reasoning, reader.result().content) == (reasoning, content), incremental
    finally:
        await engine.shutdown()
