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

from qwenrun.agent import Agent
from qwenrun.config import AgentSpec
from qwenrun.engine import Delta
from qwenrun.errors import ConfigError, EngineError
from qwenrun.server import create_app
from qwenrun.testing import ModelRequest, ScriptedEngine, tool_call_text

ROOT = Path(__file__).resolve().parent.parent
AGENT_FILES = sorted((ROOT / "agents").glob("*.yaml"))
SOURCES = {path.name: path.read_text(encoding="utf-8") for path in AGENT_FILES}
PARSED = {name: yaml.safe_load(text) for name, text in SOURCES.items()}
SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


class Counter:
    """Counts the examples that ran to the end (hypothesis may discard some it generates)."""

    def __init__(self) -> None:
        self.count = 0

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


yaml_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=16),
        st.sampled_from(["${QR_FUZZ_UNSET}", "${QR_FUZZ_UNSET:-7}", "$${x}", "{{ nope }}", "{% for %}",
                         "auto", "required", "openai", "chainlit", "cli", "get_current_weather", ""]),
    ),  # fmt: skip
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


YAML_TEXT = Counter()


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
    assert ran == figure("yaml_text_mutations")


YAML_DATA = Counter()


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
    assert ran == figure("yaml_structure_mutations")


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


YAML_BYTES = Counter()


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
    assert ran == figure("yaml_random_bytes")
