"""Fuzzing with hypothesis: the agent-file loader and the HTTP server's request bodies.

* ``AgentSpec.from_text`` / ``from_file`` over the shipped ``agents/*.yaml`` mutated as text (lines
  dropped, duplicated, re-indented, YAML tokens, tags, anchors, deep nesting, alias bombs spliced
  in), as data (values of any type, keys renamed or dropped, then dumped again) and as bytes: the
  result is a valid spec or a :class:`ConfigError` whose message starts with the source name and
  names where (a path of the document, or the YAML line and column); never another exception.
* ``POST /v1/chat/completions`` through the ASGI app (Starlette's TestClient, so the lifespan
  runs) on a scripted engine that sometimes fails: random JSON, mutated valid requests and random
  bytes. The status is 200, 400, 404, 413, or 503 when (and only when) the engine failed; error
  bodies have OpenAI's shape; after every example ``/health`` and a valid request still work.

How many examples each target runs is a figure of docs/reliability.md (see test_reliability_doc).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from test_reliability_doc import figure, record
from weather import weather_tool

from qwenrun.agent import Agent
from qwenrun.engines.base import Delta, Request
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, EngineError
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILES = sorted((ROOT / "agents").glob("*.yaml"))
SOURCES = {path.name: path.read_text(encoding="utf-8") for path in AGENT_FILES}
PARSED = {name: yaml.safe_load(text) for name, text in SOURCES.items()}
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


class Examples:
    """Counts the examples that ran to the end, and the HTTP statuses they saw."""

    def __init__(self) -> None:
        self.count = 0
        self.statuses: collections.Counter[str] = collections.Counter()

    def run(self, prop: Callable[[], None]) -> int:
        self.count = 0
        prop()
        return self.count


# == the agent-file loader ========================================================================

TOP_KEYS = set(AgentSpec.model_fields)
WHOLE_DOCUMENT = re.compile(
    r"(YAML syntax error at line \d+, column \d+: .+"
    r"|YAML syntax error: the document is nested too deeply.*"
    r"|the file is empty|expected a mapping at the top level, got \w+"
    r"|not UTF-8 text: .+ at byte \d+)$"
)

YAML_TOKENS = [
    ":", ": ", "- ", "-", "{", "}", "[", "]", ",", "? ", "|", ">", "'", '"', "#", "\\", "`", "@", "%",
    "&a ", "*a", "&a [*a]", "<<: ", "<<: *a", "!!python/object:os.system ", "!!python/object/apply:os.system [id]",
    "!!python/name:os.system", "!!binary ", "!!int ", "!!str ", "!!float ", "!!map ", "!!seq ", "!!set ",
    "!!timestamp ", "!custom ", "%YAML 1.1\n", "%TAG ! tag:x,2024:\n", "---\n", "...\n", "\t", "\x00",
    "\x85", "\ufeff", "\u2028", "${", "}", "${QR_FUZZ_UNSET}", "${QR_FUZZ_UNSET:-x}", "$${", "${HOME}",
    "{{", "}}", "{{ x }}", "{% if %}", "{{ ''.__class__ }}", "~", "null", "true", "no", "0x1F", "0o17",
    "1e309", ".nan", "-.inf", "2020-01-01", "12:30:00", "=", "广州", "😀", "\n", "  ", "    ",
]  # fmt: skip
SCALARS = st.one_of(
    st.sampled_from(YAML_TOKENS),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),
    st.text(max_size=12),
    st.sampled_from(["auto", "openai", "cli", "chainlit", "required", "none", "mp", "float32", "0", "-1"]),
)


@st.composite
def mutated_text(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped agent file with one to four line- or character-level mutations."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    lines = SOURCES[name].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        op = draw(st.sampled_from(["drop", "dup", "swap", "indent", "dedent", "tab", "token", "value",
                                   "key", "truncate", "text", "deep", "bomb"]))  # fmt: skip
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, line)
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(1, 6)) + line
        elif op == "dedent":
            lines[i] = line.lstrip(" ")
        elif op == "tab":
            lines[i] = "\t" + line.lstrip(" ")
        elif op in ("token", "text"):
            at = draw(st.integers(0, len(line)))
            piece = draw(st.sampled_from(YAML_TOKENS) if op == "token" else st.text(max_size=8))
            lines[i] = line[:at] + piece + line[at:]
        elif op in ("value", "key", "deep", "bomb"):
            key, sep, value = line.partition(":")
            if not sep:
                lines[i] = draw(SCALARS) + "\n"
            elif op == "key":
                lines[i] = key[: len(key) - len(key.lstrip())] + draw(SCALARS) + sep + value
            elif op == "value":
                lines[i] = key + sep + " " + draw(SCALARS) + "\n"
            elif op == "deep":
                depth = draw(st.integers(10, 250))  # deeper ones take PyYAML ~1 s: see test_security
                lines[i] = key + sep + " " + "[" * depth + "x" + "]" * depth + "\n"
            else:  # billion laughs: each level refers to the previous one nine times
                levels = draw(st.integers(2, 12))
                bomb = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [
                    f"&l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)
                ]
                lines[i] = key + sep + " {" + ", ".join(f"k{n}: {b}" for n, b in enumerate(bomb)) + "}\n"
        elif op == "truncate":
            lines[i] = line[: draw(st.integers(0, len(line)))]
    return name, "".join(lines)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


YAML_ODD_VALUES = ["${QR_FUZZ_UNSET}", "${QR_FUZZ_UNSET:-7}", "$${x}", "{{ nope }}", "{% for %}", "auto",
                   "required", "openai", "chainlit", "cli", "get_current_weather", ""]  # fmt: skip
yaml_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=16),
        st.sampled_from(YAML_ODD_VALUES),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_data(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped agent file loaded, changed as data (any value anywhere, keys renamed, dropped,
    added, wrapped), then dumped back to YAML."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    document = copy.deepcopy(PARSED[name])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(document))))
        if not path:
            continue
        parent: Any = document
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        op = draw(st.sampled_from(["set", "drop", "rename", "add", "wrap"]))
        if op == "set":
            parent[last] = draw(yaml_values)
        elif op == "drop":
            del parent[last]
        elif op == "wrap":
            parent[last] = draw(st.sampled_from([[parent[last]], {"x": parent[last]}]))
        elif isinstance(parent, dict) and op == "rename":
            parent[draw(st.text(max_size=10) | st.sampled_from(sorted(TOP_KEYS)))] = parent.pop(last)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(yaml_values)
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=draw(st.booleans()))
    return name, text


def check_loader_outcome(source: str, load: Callable[[], AgentSpec], text: str | None) -> None:
    """``load()`` gives a spec, or a ConfigError naming the source and where; nothing else."""
    try:
        spec = load()
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{source}: "), message
        document: Any = None
        with contextlib.suppress(Exception):
            document = yaml.safe_load(text) if text is not None else None
        keys = {str(key) for key in document} if isinstance(document, dict) else set()
        roots = {*TOP_KEYS, "<top level>", *keys, *(f"[{key!r}]" for key in keys)}
        for line in message.splitlines():
            if not line.startswith(f"{source}: "):
                continue  # the rest of a multi-line problem (a value with a newline in it)
            where = line[len(source) + 2 :]
            if WHOLE_DOCUMENT.match(where):
                continue
            assert any(re.match(re.escape(root) + r"(\.|\[|: )", where) for root in roots), message
        return
    assert isinstance(spec, AgentSpec) and spec.source == source


YAML_TEXT = Examples()


@settings(max_examples=figure("yaml_text_mutations"), **SETTINGS)
@given(mutated_text())
def _yaml_text_property(case: tuple[str, str]) -> None:
    name, text = case
    source = f"agents/{name}"
    check_loader_outcome(source, lambda: AgentSpec.from_text(text, source=source), text)
    YAML_TEXT.count += 1


def test_loader_survives_text_mutations(tmp_path_factory: pytest.TempPathFactory) -> None:
    ran = YAML_TEXT.run(_yaml_text_property)
    record(tmp_path_factory, yaml_text_mutations=ran)
    assert ran == figure("yaml_text_mutations"), f"{ran} examples ran"


YAML_DATA = Examples()


@settings(max_examples=figure("yaml_structure_mutations"), **SETTINGS)
@given(mutated_data())
def _yaml_data_property(case: tuple[str, str]) -> None:
    name, text = case
    source = f"agents/{name}"
    check_loader_outcome(source, lambda: AgentSpec.from_text(text, source=source), text)
    YAML_DATA.count += 1


def test_loader_survives_data_mutations(tmp_path_factory: pytest.TempPathFactory) -> None:
    ran = YAML_DATA.run(_yaml_data_property)
    record(tmp_path_factory, yaml_structure_mutations=ran)
    assert ran == figure("yaml_structure_mutations"), f"{ran} examples ran"


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a shipped file with random bytes spliced in, or re-encoded."""
    kind = draw(st.sampled_from(["random", "splice", "encoding"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    original = SOURCES[draw(st.sampled_from(sorted(SOURCES)))]
    if kind == "encoding":
        return original.encode(draw(st.sampled_from(["utf-16", "utf-32", "gb18030", "latin-1", "utf-8-sig"])),
                               errors="replace")  # fmt: skip
    data = bytearray(original.encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


YAML_BYTES = Examples()


def test_loader_survives_random_bytes(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "agent.yaml"

    @settings(max_examples=figure("yaml_random_bytes"), **SETTINGS)
    @given(mutated_bytes())
    def prop(data: bytes) -> None:
        path.write_bytes(data)
        text = data.decode("utf-8", errors="replace")
        check_loader_outcome(str(path), lambda: AgentSpec.from_file(path), text)
        YAML_BYTES.count += 1

    ran = YAML_BYTES.run(prop)
    record(tmp_path_factory, yaml_random_bytes=ran)
    assert ran == figure("yaml_random_bytes"), f"{ran} examples ran"


# == the HTTP server ==============================================================================

SERVED, AGENT_NAME = "fuzz-model", "fuzz-agent"
CANARY = "canary question"
WEATHER_TOOL = weather_tool()
REQUEST_KEYS = [
    "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "stream", "stream_options",
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty",
    "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "n", "logprobs", "top_logprobs", "response_format", "user", "metadata",
    "role", "content", "type", "function", "name", "arguments", "tool_call_id", "tool_calls", "id",
    "parameters", "include_usage", "text",
]  # fmt: skip
ODD_STRINGS = ["", " ", "\x00", "\ud800", "a\udfffb", "\ufeff", "😀", "<tool_call>", "</tool_call>", "{}",
               "x" * 3000, "auto", "none", "required", "function", "text", "user", "assistant", "system",
               "developer", "tool", SERVED, AGENT_NAME, "get_current_weather", "call_1", "chat.completion"]  # fmt: skip
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, math.nan,
    math.inf, -math.inf, [], {}, [None], {"type": "text", "text": "hi"}, [{"type": "text", "text": "hi"}],
    {"type": "function", "function": {"name": "get_current_weather"}}, *ODD_STRINGS,
]  # fmt: skip

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.sampled_from(ODD_VALUES)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(REQUEST_KEYS) | st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
texts = st.text(max_size=30) | st.sampled_from(ODD_STRINGS)
contents = texts | st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), min_size=1, max_size=2)
user_messages = st.builds(lambda c: {"role": "user", "content": c}, contents)
call_items = st.builds(
    lambda city: [{"id": "call_1", "type": "function",
                   "function": {"name": "get_current_weather", "arguments": json.dumps({"city": city})}}],
    texts,
)  # fmt: skip
other_messages = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["system", "developer"]), contents),
    st.builds(lambda c: {"role": "assistant", "content": c}, contents),
    st.builds(lambda calls: {"role": "assistant", "content": None, "tool_calls": calls}, call_items),
    st.builds(lambda c: {"role": "tool", "tool_call_id": "call_1", "content": c}, contents),
    user_messages,
)
OPTIONAL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream": st.booleans(),
    "stream_options": st.builds(lambda b: {"include_usage": b}, st.booleans()),
    "max_tokens": st.integers(1, 10**6),
    "max_completion_tokens": st.integers(1, 10**6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "stop": texts | st.lists(texts, max_size=3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.01, 2),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "user": texts,
    "response_format": st.just({"type": "text"}),
    "tools": st.just([WEATHER_TOOL]),
    "tool_choice": st.sampled_from(
        ["auto", "none", "required", {"type": "function", "function": {"name": "get_current_weather"}}]
    ),
    "parallel_tool_calls": st.booleans(),
}


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from([SERVED, AGENT_NAME, SERVED, AGENT_NAME, "gpt-4o"]))
    messages = [*draw(st.lists(other_messages, max_size=4)), draw(user_messages)]
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": draw(st.booleans())}
    for key in draw(st.lists(st.sampled_from(sorted(OPTIONAL_FIELDS)), max_size=6, unique=True)):
        if model == AGENT_NAME and key == "tools":
            continue
        body[key] = draw(OPTIONAL_FIELDS[key])
    return body


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with zero to three values replaced, deleted, renamed or wrapped."""
    body = copy.deepcopy(draw(valid_requests()))  # the strategies share their values: never mutate them
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(body))))
        if not path:
            continue
        parent: Any = body
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["odd", "random", "drop", "rename", "wrap"]))
        if op == "odd":
            parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
        elif op == "random":
            parent[path[-1]] = draw(json_values)
        elif op == "drop":
            del parent[path[-1]]
        elif op == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(REQUEST_KEYS) | st.text(max_size=6))] = parent.pop(path[-1])
    return body


def _dumps(body: Any) -> bytes:
    """JSON as a client sends it: NaN and Infinity as Python writes them, and unpaired surrogates
    as ``\\udXXX`` escapes (valid JSON text that decodes to invalid Unicode)."""
    return json.dumps(body).encode()


class FuzzEngine(ScriptedEngine):
    """Answers by a hash of the conversation: text, a tool call, a malformed call, an empty answer,
    an echo of the question; one conversation in ten is refused and two in ten fail midway. Like
    a real tokenizer it cannot encode text that is not valid Unicode (an unpaired surrogate)."""

    def __init__(self) -> None:
        super().__init__(self.reply, chunk_size=5)
        self.failures = 0

    def reply(self, request: ModelRequest) -> str:
        last = str(request.messages[-1].get("content"))
        if last == CANARY:
            return "canary answer"
        tools = request.tools or []
        name = tools[0]["function"]["name"] if tools else "get_current_weather"
        if request.prefill:
            return request.prefill + json.dumps({"name": name, "arguments": {"city": "深圳"}})
        options = [
            "Plain answer.",
            tool_call_text(name, {"city": "广州"}),
            '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": 广州}\n</tool_call>',
            "",
            f"You said: {last[:40]}",
            "  spaced  \n\n",
        ]
        return options[_digest(request.messages) % len(options)]

    async def generate(self, request: Request) -> AsyncIterator[Delta]:  # type: ignore[override]
        messages = list(request.messages)
        json.dumps(messages, ensure_ascii=False).encode("utf-8")  # what a tokenizer needs
        mode = _digest(messages) % 10 if str(messages[-1].get("content")) != CANARY else 9
        if mode == 0:
            self.failures += 1
            raise EngineError("the fuzz engine refuses this request")
        sent = 0
        async for delta in super().generate(request):
            if mode in (1, 2) and sent == 2:
                self.failures += 1
                raise EngineError("the fuzz engine died mid-answer")
            sent += 1
            yield delta


def _digest(messages: list[dict[str, Any]]) -> int:
    return zlib.crc32(json.dumps(messages, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))


def weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 深圳.
    """
    return f"{city}: 晴, 25℃"


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[TestClient, FuzzEngine]]:
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "/models/fuzz", "served_model_name": SERVED},
            "agent": {"name": AGENT_NAME, "max_iterations": 3, "timeout_s": 5},
            "frontend": {"kind": "openai", "max_request_bytes": 20_000, "max_tokens_cap": 256},
        },
        source="tests/fuzz.yaml",
    )
    engine = FuzzEngine()
    app = create_app(Agent(spec, engine, tools=[weather]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, engine


def check_reply(response: Any, sent: Any, failed: bool) -> str:
    """What any answer of POST /v1/chat/completions must look like; returns the outcome's name."""
    status = response.status_code
    assert status in (200, 400, 404, 413, 503), (status, response.text[:500])
    assert (status == 503) <= failed, "503 without an engine failure"
    if status != 200:
        body = response.json()
        assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "param", "type"], body
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        if status == 503:
            assert (error["type"], error["code"]) == ("server_error", "engine_unavailable")
        else:
            assert error["type"] in ("invalid_request_error", "not_found_error")
        return str(status)
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events, response.text[:500]
        for event in events[:-1]:
            assert json.loads(event)["object"] == "chat.completion.chunk"
        if events[-1] != "[DONE]":  # the engine failed after the 200 headers: an error event ends it
            assert failed and json.loads(events[-1])["error"]["code"] == "engine_unavailable", events[-1]
            return "200 stream, error event"
        return "200 stream"
    assert not failed, "the engine failed but the answer is a 200"
    body = response.json()
    assert body["object"] == "chat.completion" and isinstance(sent, dict) and body["model"] == sent["model"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    return "200"


def post_and_check(client: TestClient, engine: FuzzEngine, content: bytes, sent: Any, seen: Examples) -> None:
    before = engine.failures
    response = client.post(
        "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    seen.statuses[check_reply(response, sent, engine.failures > before)] += 1
    # the server keeps answering: health, and a valid request in each mode
    assert client.get("/health").json() == {"status": "ok"}
    canary = client.post(
        "/v1/chat/completions",
        json={"model": SERVED, "messages": [{"role": "user", "content": CANARY}]},
    )
    assert canary.status_code == 200 and canary.json()["choices"][0]["message"]["content"] == "canary answer"
    assert engine.active == 0


HTTP_JSON = Examples()
HTTP_MUTATED = Examples()
HTTP_BYTES = Examples()


def test_server_survives_random_json(
    fuzz_server: tuple[TestClient, FuzzEngine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, engine = fuzz_server

    @settings(max_examples=figure("http_random_json"), **SETTINGS)
    @given(json_values | st.dictionaries(st.sampled_from(REQUEST_KEYS), json_values, max_size=6))
    def prop(body: Any) -> None:
        post_and_check(client, engine, _dumps(body), body, HTTP_JSON)
        HTTP_JSON.count += 1

    ran = HTTP_JSON.run(prop)
    record(tmp_path_factory, http_random_json=ran, http_random_json_outcomes=json.dumps(HTTP_JSON.statuses))
    assert "400" in HTTP_JSON.statuses  # random bodies are mostly invalid requests
    assert ran == figure("http_random_json"), f"{ran} examples ran"


def test_server_survives_mutated_requests(
    fuzz_server: tuple[TestClient, FuzzEngine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, engine = fuzz_server

    @settings(max_examples=figure("http_mutated_requests"), **SETTINGS)
    @given(mutated_requests())
    def prop(body: dict[str, Any]) -> None:
        post_and_check(client, engine, _dumps(body), body, HTTP_MUTATED)
        HTTP_MUTATED.count += 1

    ran = HTTP_MUTATED.run(prop)
    record(tmp_path_factory, http_mutated_requests=ran, http_mutated_outcomes=json.dumps(HTTP_MUTATED.statuses))
    # the fuzzing reached every outcome: answers, streams, bad requests, unknown models, engine failures
    assert {"200", "200 stream", "200 stream, error event", "400", "404", "503"} <= set(HTTP_MUTATED.statuses)
    assert ran == figure("http_mutated_requests"), f"{ran} examples ran"


def test_server_survives_random_bytes(
    fuzz_server: tuple[TestClient, FuzzEngine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, engine = fuzz_server
    valid = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}).encode()

    @settings(max_examples=figure("http_random_bytes"), **SETTINGS)
    @given(st.binary(max_size=300) | st.builds(lambda n, junk: valid[:n] + junk, st.integers(0, len(valid)),
                                               st.binary(max_size=8)))  # fmt: skip
    def prop(content: bytes) -> None:
        sent = None
        with contextlib.suppress(ValueError):
            sent = json.loads(content)
        post_and_check(client, engine, content, sent, HTTP_BYTES)
        HTTP_BYTES.count += 1

    ran = HTTP_BYTES.run(prop)
    record(tmp_path_factory, http_random_bytes=ran, http_random_bytes_outcomes=json.dumps(HTTP_BYTES.statuses))
    assert "400" in HTTP_BYTES.statuses
    assert ran == figure("http_random_bytes"), f"{ran} examples ran"


def test_no_request_was_a_server_error(
    fuzz_server: tuple[TestClient, FuzzEngine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Across every fuzz example above: the metrics count no 5xx but the engine's 503s."""
    client, _ = fuzz_server
    text = client.get("/metrics").text
    errors = sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("qwenrun_requests_total{") and re.search(r'status="5(?!03)\d\d"', line)
    )
    record(tmp_path_factory, http_server_errors=int(errors))
    assert errors == figure("http_server_errors")


# == what the fuzzing found, kept as exact regressions ==========================================

BOMB = "model: {path: x}\nengine:\n  extra: {" + ", ".join(
    ["k0: &l0 [x, x, x, x, x, x, x, x, x]"]
    + [f"k{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 10)]
) + "}\n"  # fmt: skip


@pytest.mark.timeout(60)  # a hang guard: each case takes milliseconds
@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a recursive alias, deep nesting and an alias bomb were a RecursionError or took forever
        ("model: {path: x}\nengine: {extra: {a: &a [*a]}}\n",
         r"engine\.extra\.a\[0\]: a YAML alias refers to a node containing it"),
        ("&top\nmodel: {path: x}\nengine: {extra: *top}\n",
         r"engine\.extra\.engine: a YAML alias refers to a node containing it"),
        (BOMB, r"engine\.extra\.k\d(\[\d\])+: more than 100,000 values once YAML aliases are expanded"),
        ("model: {path: x}\nengine: {extra: {a: " + "[" * 150 + "]" * 150 + "}}\n",
         r"engine\.extra\.a\[0\]\[0\]\[0\]\[0\]\[0\]\.\.\.: nested more than 100 levels deep"),
        ("model: {path: x}\nengine: {extra: {a: " + "[" * 1200 + "]" * 1200 + "}}\n",
         r"YAML syntax error: the document is nested too deeply"),
        # PyYAML's constructors crashed (IndexError, KeyError, ...) on some tagged scalars
        ("model: {path: !!int ''}\n", r"YAML syntax error at line 1, column 15: cannot read '' as tag:yaml\.org,2002:int \(IndexError\)"),
        ("model: {path: !!float ''}\n", r"YAML syntax error at line 1, column 15: cannot read '' as tag:yaml\.org,2002:float \(IndexError\)"),
        ("model: {path: !!bool ''}\n", r"YAML syntax error at line 1, column 15: cannot read '' as tag:yaml\.org,2002:bool \(KeyError\)"),
        ("model: {path: !!timestamp x}\n",
         r"YAML syntax error at line 1, column 15: cannot read 'x' as tag:yaml\.org,2002:timestamp \(AttributeError\)"),
        ("model: {path: !!int 12a}\n", r"YAML syntax error at line 1, column 15: cannot read '12a' as tag:yaml\.org,2002:int \(ValueError\)"),
        # a control character: the message had no line and a second, unprefixed line
        ("model: {path: x}\n# \x1f\n", r"YAML syntax error at line 2, column 3: unacceptable character #x001f: special characters are not allowed"),
        # a key named like a front end was dropped from the path (an IndexError at the top level)
        ("model: {path: x}\nopenai: 1\n", r"openai: unknown key 'openai' \(valid keys: version, model, .*\)"),
        ("model: {path: x, cli: 1}\n", r"model\.cli: unknown key 'cli' \(valid keys: path, tokenizer, revision, served_model_name, trust_remote_code, tool_call_format\)"),
        # keys that are not plain names, and keys that are not strings
        ("model: {path: x}\n\"\\r\": 1\n", r"\['\\r'\]: unknown key '\\r' \(valid keys: .*\)"),
        ("model: {path: x}\n2024-01-01: 1\n", r"<top level>: key datetime\.date\(2024, 1, 1\) is not a string \(quote it\)"),
        ("model: {path: x}\nengine: {extra: {1: 2}}\n", r"engine\.extra: key 1: Input should be a valid string"),
    ],
)  # fmt: skip
def test_loader_problems_found_by_fuzzing(text: str, message: str) -> None:
    # the error names the limit that stopped the loader (aliases, values, depth); unstopped, the
    # alias bomb's 9**10 values would outlast the hang guard by hours
    with pytest.raises(ConfigError) as info:
        AgentSpec.from_text(text, source="agent.yaml")
    assert re.fullmatch(re.escape("agent.yaml: ") + message, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        # an unpaired surrogate reached the tokenizer: a TypeError there, a 500
        (b'{"model": "fuzz-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}', None,
         "the body is not valid JSON: a \\u escape is an unpaired UTF-16 surrogate, which is not text "
         "(the tokenizer cannot encode it)"),
        (b'{"model": "fuzz-model", "messages": [{"role": "user", "content": "ok \\ud83d\\ude00"}]}', None, None),
        # NaN and Infinity are not JSON
        (b'{"model": "fuzz-model", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None,
         "the body is not valid JSON: NaN is not a JSON value"),
        # a deeply nested tool schema: a RecursionError in the schema check, a 500
        (json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "x"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": json.loads(
                '{"type": "object", "properties": {"a": ' * 40 + "{}" + "}}" * 40)}}]}).encode(),
         "tools[0].function.parameters", "tools[0].function.parameters: nested more than 32 levels deep"),
        # a seed vLLM cannot serialize: a 503 as if the engine were down
        (json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "x"}], "seed": 2**64}).encode(),
         "seed", "seed: Input should be less than 9223372036854775808"),
    ],
)  # fmt: skip
def test_request_problems_found_by_fuzzing(
    fuzz_server: tuple[TestClient, FuzzEngine], body: bytes, param: str | None, message: str | None
) -> None:
    client, _ = fuzz_server
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    if message is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param, "code": None}
