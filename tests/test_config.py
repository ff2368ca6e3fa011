"""The agent spec: valid files, every class of bad file with its exact message, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenrun.errors import ConfigError
from qwenrun.spec.agent_file import AgentSpec

AGENTS = sorted((Path(__file__).parent.parent / "agents").glob("*.yaml"))

MINIMAL = "model: {path: Qwen/Qwen2.5-7B-Instruct}\n"


def load(text: str, **kwargs: object) -> AgentSpec:
    return AgentSpec.from_text(text, source="agent.yaml", **kwargs)  # type: ignore[arg-type]


def error_of(text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("path", AGENTS, ids=[p.name for p in AGENTS])
def test_every_shipped_agent_is_valid(path: Path) -> None:
    spec = AgentSpec.from_file(path)
    assert spec.source == str(path)
    assert spec.system_prompt()


def test_defaults_are_the_seed_values() -> None:
    spec = load(MINIMAL)
    assert spec.engine.gpu_memory_utilization == 0.9
    assert spec.engine.max_num_seqs == 256
    assert spec.engine.swap_space == 16
    assert spec.sampling.temperature == 0.45
    assert spec.sampling.top_p == 0.9
    assert spec.sampling.max_tokens == 8192
    assert spec.frontend.kind == "cli"
    assert spec.agent.tool_choice == "auto"


def test_weather_agent_mirrors_the_seed() -> None:
    spec = AgentSpec.from_file(Path(__file__).parent.parent / "agents" / "weather.yaml")
    assert spec.model.path == "Qwen/Qwen2.5-7B-Instruct"
    assert [tool.name for tool in spec.tools] == ["get_current_weather"]
    assert spec.engine.dtype == "auto"  # the seed's bfloat16 on a GPU; float32 on a CPU without native bf16
    assert spec.frontend.kind == "cli"


@pytest.mark.parametrize("path", AGENTS, ids=[p.name for p in AGENTS])
def test_no_shipped_agent_asks_for_bfloat16(path: Path) -> None:
    """vLLM emulates bfloat16 on CPUs without AVX512-BF16 or AMX, about 3x slower than float32:
    a shipped file says auto (qwenrun picks float32 there) or float32."""
    engine = AgentSpec.from_file(path).engine
    assert getattr(engine, "dtype", "auto") in ("auto", "float32")


RULES = MINIMAL + """tools: [get_current_weather, calculate]
agent:
  tool_choice: auto
  tool_choice_rules:
    - {when: '天气|weather|气温', tool_choice: get_current_weather}
    - {when: '^\\s*(你好|hello|thanks)\\W*$', tool_choice: none}
    - {when: '\\d\\s*[-+*/]\\s*\\d', tool_choice: required}
"""


def test_tool_choice_rules_choose_a_turns_tool_choice_from_its_message() -> None:
    agent = load(RULES).agent
    assert [(rule.when, rule.tool_choice) for rule in agent.tool_choice_rules] == [
        ("天气|weather|气温", "get_current_weather"),
        ("^\\s*(你好|hello|thanks)\\W*$", "none"),
        ("\\d\\s*[-+*/]\\s*\\d", "required"),
    ]
    choices = {message: agent.turn_tool_choice(message) for message in (
        "广州天气情况如何？", "What's the WEATHER in Paris?", "你好", "Hello!", "hello, what is 2 + 3?",
        "2*3 天气", "写一首诗", "",
    )}  # fmt: skip
    assert choices == {
        "广州天气情况如何？": "get_current_weather",
        "What's the WEATHER in Paris?": "get_current_weather",  # case-insensitive
        "你好": "none",
        "Hello!": "none",
        "hello, what is 2 + 3?": "required",
        "2*3 天气": "get_current_weather",  # the first rule that matches
        "写一首诗": "auto",  # no rule: agent.tool_choice
        "": "auto",
    }
    assert load(MINIMAL).agent.turn_tool_choice("天气") == "auto"


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("[{when: '(天气', tool_choice: auto}]",
         "agent.yaml: agent.tool_choice_rules[0].when: Value error, not a regular expression: missing ), unterminated "
         "subpattern at position 0"),
        ("[{when: '', tool_choice: auto}]",
         "agent.yaml: agent.tool_choice_rules[0].when: String should have at least 1 character"),
        ("[{tool_choice: auto}]", "agent.yaml: agent.tool_choice_rules[0].when: required key is missing"),
        ("[{when: x, tool_choice: auto, then: none}]",
         "agent.yaml: agent.tool_choice_rules[0].then: unknown key 'then'; did you mean 'when'? (valid keys: when, tool_choice)"),
        ("[{when: x, tool_choice: auto}, {when: y, tool_choice: get_weather}]",
         "agent.yaml: agent.tool_choice_rules[1].tool_choice: 'get_weather' is not 'auto', 'none', "
         "'required' or a tool of this agent (none declared)"),
        ("[{when: x, tool_choice: required}]",
         "agent.yaml: agent.tool_choice_rules[0].tool_choice: 'required' but the agent has no tools"),
    ],
    ids=["bad-regex", "empty", "no-when", "unknown-key", "unknown-tool", "required-without-tools"],
)  # fmt: skip
def test_bad_tool_choice_rules_say_which_and_why(rules: str, message: str) -> None:
    assert error_of(MINIMAL + f"agent: {{tool_choice_rules: {rules}}}\n") == message


def test_the_small_weather_agent_calls_its_tool_every_turn_but_greetings_and_thanks() -> None:
    agent = AgentSpec.from_file(Path(__file__).parent.parent / "agents" / "weather-small.yaml").agent
    for asked in ("广州天气情况如何？", "广州天气情况如何?", "那北京呢？", "And in Rome?", "weather in tokyo", "hello there"):
        assert agent.turn_tool_choice(asked) == "get_current_weather", asked
    for said in ("你好", "谢谢！", "谢谢你！", "Thanks!", "thank you.", " Hello ", "再见"):
        assert agent.turn_tool_choice(said) == "none", said


def test_tools_may_be_names_or_mappings() -> None:
    spec = load(MINIMAL + "tools: [a, {name: b, settings: {x: 1}, timeout_s: 2}]\n")
    assert [(t.name, t.settings, t.timeout_s) for t in spec.tools] == [("a", {}, None), ("b", {"x": 1}, 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model: {path: x\n",
            "agent.yaml: YAML syntax error at line 2, column 1: expected ',' or '}', but got '<stream end>'",
        ),
        ("", "agent.yaml: the file is empty"),
        ("- a\n- b\n", "agent.yaml: expected a mapping at the top level, got list"),
        ("engine: {}\n", "agent.yaml: model: required key is missing"),
        (
            MINIMAL + "engine: {max_num_seqs: 0}\n",
            "agent.yaml: engine.max_num_seqs: Input should be greater than 0",
        ),
        (
            MINIMAL + "engine: {max_num_seqs: many}\n",
            "agent.yaml: engine.max_num_seqs: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            MINIMAL + "engine: {dtype: fp7}\n",
            "agent.yaml: engine.dtype: Input should be 'auto', 'half', 'float16', 'bfloat16', 'float' or 'float32'",
        ),
        (
            MINIMAL + "sampling: {top_p: 1.5}\n",
            "agent.yaml: sampling.top_p: Input should be less than or equal to 1",
        ),
        (
            MINIMAL + "frontend: {kind: tui}\n",
            "agent.yaml: frontend.kind: unknown kind 'tui' (valid: cli, openai, chainlit, a2a, mcp)",
        ),
        (MINIMAL + "tools: [{settings: {}}]\n", "agent.yaml: tools[0].name: required key is missing"),
        (
            MINIMAL + "agent: {tool_choice: get_weather}\n",
            "agent.yaml: agent.tool_choice: 'get_weather' is not 'auto', 'none', 'required' or a tool of this "
            "agent (none declared)",
        ),
        (
            MINIMAL + "agent: {tool_choice: required}\n",
            "agent.yaml: agent.tool_choice: 'required' but the agent has no tools",
        ),
        (MINIMAL + "tools: [a, a]\n", "agent.yaml: tools: declared twice: a"),
        (
            MINIMAL + "agent: {system_prompt: 'Hi {{ user }}'}\n",
            "agent.yaml: agent.system_prompt: 'user' is undefined",
        ),
        (
            MINIMAL + "agent: {system_prompt: 'Hi {{ user'}\n",
            "agent.yaml: agent.system_prompt: unexpected end of template, expected 'end of print statement'. "
            "(template line 1)",
        ),
        (
            MINIMAL + "engine: {tensor_parallel_size: 4, pipeline_parallel_size: 2, available_devices: 4}\n",
            "agent.yaml: engine: tensor_parallel_size x pipeline_parallel_size x data_parallel_size = 4 x 2 x 1 "
            "= 8 GPUs, but available_devices is 4",
        ),
    ],
)
def test_bad_files_have_exact_messages(text: str, message: str) -> None:
    assert error_of(text) == message


def test_unknown_keys_suggest_the_closest_valid_key() -> None:
    message = error_of(
        MINIMAL + "engine: {gpu_memory_utilisation: 0.5}\nfrontend: {kind: openai, portt: 1}\n"
    )
    lines = message.splitlines()
    assert lines[0].startswith(
        "agent.yaml: engine.gpu_memory_utilisation: unknown key 'gpu_memory_utilisation'; "
        "did you mean 'gpu_memory_utilization'? (valid keys: kind, dtype, "
    )
    assert lines[1].startswith("agent.yaml: frontend.portt: unknown key 'portt'; did you mean 'port'? ")
    assert "api_key_env" in lines[1]
    assert error_of("modle: {path: x}\nmodel: {path: x}\n").startswith(
        "agent.yaml: modle: unknown key 'modle'; did you mean 'model'?"
    )


def test_env_interpolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QR_MODEL", "/models/qwen")
    monkeypatch.delenv("QR_MISSING", raising=False)
    spec = load(
        "model: {path: '${QR_MODEL}', tokenizer: '${QR_MISSING:-tok}'}\n"
        "agent: {description: 'cost $${NOT_A_VAR} and ${QR_MODEL}/x'}\n"
    )
    assert spec.model.path == "/models/qwen"
    assert spec.model.tokenizer == "tok"
    assert spec.agent.description == "cost ${NOT_A_VAR} and /models/qwen/x"


def test_missing_env_var_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QR_MISSING", raising=False)
    assert error_of("model: {path: x}\ntools: [{name: a, settings: {key: '${QR_MISSING}'}}]\n") == (
        "agent.yaml: tools[0].settings.key: environment variable QR_MISSING is not set "
        "(write ${QR_MISSING:-default} to give a default)"
    )


def test_template_sandbox_blocks_attribute_escapes() -> None:
    message = error_of(MINIMAL + "agent: {system_prompt: \"{{ ''.__class__.__mro__ }}\"}\n")
    assert (
        message
        == "agent.yaml: agent.system_prompt: access to attribute '__class__' of 'str' object is unsafe."
    )


def test_template_renders_variables() -> None:
    spec = load(
        MINIMAL + "agent: {system_prompt: 'Hi {{ who }} from {{ agent }}', name: w, variables: {who: 广州}}\n"
    )
    assert spec.system_prompt() == "Hi 广州 from w"


def test_yaml_never_constructs_python_objects() -> None:
    assert error_of("model: !!python/object/apply:os.system ['echo hacked']\n").startswith(
        "agent.yaml: YAML syntax error"
    )


def test_overrides_are_parsed_as_yaml() -> None:
    spec = load(
        MINIMAL,
        overrides=[
            "engine.max_num_seqs=8",
            "frontend.kind=openai",
            "frontend.port=9001",
            "sampling.stop=[a, b]",
            "engine.extra.enable_prefix_caching=false",
        ],
    )
    assert spec.engine.max_num_seqs == 8
    assert spec.frontend.kind == "openai"
    assert spec.frontend.port == 9001
    assert spec.sampling.stop == ["a", "b"]
    assert spec.engine.extra == {"enable_prefix_caching": False}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "engine.max_num_seqs",
            "--set 'engine.max_num_seqs': expected KEY.PATH=VALUE, e.g. engine.max_num_seqs=8",
        ),
        ("model.path.x=1", "agent.yaml: --set model.path.x: model.path is not a mapping"),
        (
            "engine.max_num_seqs=-1",
            "agent.yaml: --set engine.max_num_seqs=-1: engine.max_num_seqs: Input should be greater than 0",
        ),
        (
            "engine={max_num_seqs: 0}",
            "agent.yaml: --set engine={max_num_seqs: 0}: engine.max_num_seqs: Input should be greater than 0",
        ),
        (
            "engine.env.VLLM_CPU_KVCACHE_SPACE=1",
            "agent.yaml: --set engine.env.VLLM_CPU_KVCACHE_SPACE=1: engine.env.VLLM_CPU_KVCACHE_SPACE: "
            "Input should be a valid string (1 reads as a number: quote it to make it a string, "
            """--set 'engine.env.VLLM_CPU_KVCACHE_SPACE="1"')""",
        ),
        (
            "frontend.kind=opnai",
            "agent.yaml: --set frontend.kind=opnai: frontend.kind: unknown kind 'opnai'; did you mean 'openai'? "
            "(valid: cli, openai, chainlit, a2a, mcp)",
        ),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    assert error_of(MINIMAL, overrides=[override]) == message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read file: No such file or directory"):
        AgentSpec.from_file(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not UTF-8 text"):
        AgentSpec.from_file(binary)


def test_tool_call_format_and_thinking_keys() -> None:
    spec = AgentSpec.from_text(
        "model: {path: Qwen/Qwen3-Coder-30B-A3B-Instruct, tool_call_format: qwen3_coder}\n"
        "agent: {enable_thinking: true, thinking_budget: 512}\n",
        source="agent.yaml",
    )
    assert (spec.model.tool_call_format, spec.agent.enable_thinking, spec.agent.thinking_budget) == (
        "qwen3_coder", True, 512,
    )  # fmt: skip
    default = AgentSpec.from_dict({"model": {"path": "m"}})
    assert (default.model.tool_call_format, default.agent.enable_thinking, default.agent.thinking_budget) == (
        "auto", None, None,
    )  # fmt: skip
    with pytest.raises(ConfigError) as bad_format:
        AgentSpec.from_text("model: {path: m, tool_call_format: xml}\n", source="agent.yaml")
    assert str(bad_format.value) == (
        "agent.yaml: model.tool_call_format: Input should be 'auto', 'hermes' or 'qwen3_coder'"
    )
    with pytest.raises(ConfigError) as contradiction:
        AgentSpec.from_text("model: {path: m}\nagent: {enable_thinking: false, thinking_budget: 64}\n", source="a.yaml")
    assert str(contradiction.value) == (
        "a.yaml: agent.thinking_budget: 64 is set, but agent.enable_thinking is false (there is no thinking to limit)"
    )
    with pytest.raises(ConfigError, match=r"agent\.thinking_budget: Input should be greater than or equal to 0"):
        AgentSpec.from_text("model: {path: m}\nagent: {thinking_budget: -1}\n", source="a.yaml")


def test_a_misspelled_frontend_kind_gets_a_suggestion() -> None:
    assert error_of(MINIMAL + "frontend: {kind: chainlt}\n") == (
        "agent.yaml: frontend.kind: unknown kind 'chainlt'; did you mean 'chainlit'? (valid: cli, openai, chainlit, a2a, mcp)"
    )


def test_a_number_where_a_string_belongs_says_to_quote_it() -> None:
    assert error_of(MINIMAL + "engine: {env: {OMP_NUM_THREADS: 4, DEBUG: true}}\n").splitlines() == [
        "agent.yaml: engine.env.OMP_NUM_THREADS: Input should be a valid string "
        '(4 reads as a number: quote it to make it a string, "4")',
        "agent.yaml: engine.env.DEBUG: Input should be a valid string "
        '(true reads as a boolean: quote it to make it a string, "true")',
    ]


DUPLICATE_AGENT = """\
model: {path: x}
agent:
  name: first
  system_prompt: You are the first.
sampling: {temperature: 0}
agent:
  name: second
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            DUPLICATE_AGENT,
            "agent.yaml: YAML syntax error at line 6, column 1: duplicate key 'agent' (first at line 2): "
            "write it once",
        ),
        (
            "model: {path: x, path: y}\n",
            "agent.yaml: YAML syntax error at line 1, column 18: duplicate key 'path' (first at line 1): "
            "write it once",
        ),
        (
            MINIMAL + "tools:\n  - name: a\n    settings: {}\n    name: b\n",
            "agent.yaml: YAML syntax error at line 5, column 5: duplicate key 'name' (first at line 3): "
            "write it once",
        ),
    ],
)
def test_duplicate_keys_are_errors_naming_both_lines(text: str, message: str) -> None:
    assert error_of(text) == message


def test_keys_merged_with_an_alias_may_be_overridden() -> None:
    spec = load(MINIMAL + "sampling:\n  <<: {temperature: 0.1, top_p: 0.5}\n  temperature: 0.2\n")
    assert (spec.sampling.temperature, spec.sampling.top_p) == (0.2, 0.5)
