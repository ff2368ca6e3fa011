"""The agent spec: pydantic models of the whole YAML file, and the one ladder that loads it.

``AgentSpec.from_file -> from_text -> from_dict``. Every error is a :class:`ConfigError` whose
message names the file, the path in the document and the problem, e.g.
``agents/weather.yaml: engine.max_num_seqs: Input should be greater than 0``.
Reading the YAML, ``${ENV}``, ``--set`` and the error messages live in :mod:`qwenrun.spec.loading`.
This module must not import vLLM or torch: ``qwenrun validate`` stays fast.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from qwenrun.approval import Approval
from qwenrun.engines.settings import EngineSpec, VLLMEngineSpec
from qwenrun.errors import ConfigError
from qwenrun.frontends.settings import CliFrontend, Frontend
from qwenrun.mcp.spec import McpToolsSpec
from qwenrun.permissions import RULE_KINDS, Rule, RuleKind
from qwenrun.sampling import SamplingSpec
from qwenrun.spec.base import Settings
from qwenrun.spec.loading import (
    apply_overrides,
    describe_yaml_error,
    format_validation_error,
    interpolate,
    safe_load,
    upgrade,
)
from qwenrun.spec.output import answer_schema
from qwenrun.spec.sessions import SessionsSpec
from qwenrun.spec.team import MEMBER_NAME, TeamSpec, check_graph, load_file, tool_names
from qwenrun.toolsets.spec import ToolsetBase, ToolsetSpec

__all__ = [
    "AgentSpec",
    "ToolChoiceRule",
    "ToolSpec",
]

CURRENT_VERSION = 1
"""The format version of agent files this qwenrun writes and reads (``version:``, optional)."""


ToolCallFormat = Literal["auto", "hermes", "qwen3_coder"]
"""``model.tool_call_format``: ``auto`` or a name of :data:`qwenrun.toolcalls.PARSERS`."""


class ModelSpec(Settings):
    """Which weights to load."""

    path: str = Field(description="Hugging Face name or local directory of the model.")
    tokenizer: str | None = Field(None, description="Tokenizer name or path (default: the model's).")
    revision: str | None = Field(None, description="Model revision (branch, tag or commit).")
    served_model_name: str | None = Field(None, description="Model name reported by the OpenAI server.")
    trust_remote_code: bool = False
    tool_call_format: ToolCallFormat = Field(
        "auto",
        description="How the model writes tool calls: 'hermes' (<tool_call>{json}</tool_call>: Qwen2.5, "
        "Qwen3), 'qwen3_coder' (<function=...>/<parameter=...> XML: Qwen3-Coder), or 'auto': the "
        "format the model's chat template teaches (a remote endpoint's model: hermes).",
    )


ToolChoice = Annotated[
    str,
    Field(description="'auto', 'none', 'required', or the name of one tool the model must call."),
]


class ToolChoiceRule(Settings):
    """One rule of ``agent.tool_choice_rules``: the ``tool_choice`` of a turn whose user message
    matches ``when``."""

    when: str = Field(
        min_length=1,
        description="A Python regular expression, searched (case-insensitively) in the user's message.",
    )
    tool_choice: ToolChoice

    @field_validator("when")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    def matches(self, message: str) -> bool:
        return re.search(self.when, message, re.IGNORECASE) is not None  # re caches the compiled pattern


class AgentSettings(Settings):
    """The agent loop and its system prompt."""

    name: str = Field("qwenrun-agent", pattern=r"^[A-Za-z0-9_.:\-]+$")
    description: str = ""
    system_prompt: str = Field(
        "You are a helpful assistant.", description="jinja2 template, rendered with `variables`."
    )
    variables: dict[str, Any] = Field(default_factory=dict)
    max_iterations: PositiveInt = Field(8, description="Model calls per user turn, at most.")
    tool_choice: ToolChoice = Field(
        "auto",
        description="The first model call of every turn: 'auto' (the model decides), 'none' (no tools "
        "in this turn), 'required' or a tool's name (a call is forced; the later calls of the turn are "
        "'auto', so that the model can answer from the result).",
    )
    tool_choice_rules: list[ToolChoiceRule] = Field(
        default_factory=list,
        description="Per-turn tool_choice: the first rule whose `when` matches the user's message "
        "gives the turn's tool_choice; a turn no rule matches gets agent.tool_choice.",
    )
    parallel_tool_calls: bool = True
    timeout_s: float = Field(30, gt=0, description="Default time limit of one tool call.")
    max_tool_output_chars: PositiveInt = Field(16_000, description="Longer tool results are truncated.")
    repair_malformed_calls: bool = Field(True, description="Retry once with a grammar-forced call.")
    enable_thinking: bool | None = Field(
        None,
        description="Qwen3 thinking: true or false is passed to the chat template as enable_thinking "
        "(false: no <think> block); null leaves the template's default (Qwen3: on).",
    )
    thinking_budget: NonNegativeInt | None = Field(
        None,
        description="At most this many tokens of thinking per model call, then vLLM closes the "
        "<think> block (vLLM's thinking_token_budget; the in-process engine turns on vLLM's qwen3 "
        "reasoning parser for it, a vllm serve endpoint needs --reasoning-parser).",
    )
    lenient_tool_calls: bool = Field(
        True,
        description='Also read a call written as bare JSON ({"name": <a tool>, "arguments": {...}}, '
        "a list of them, or one in a ```json fence) when that is the whole answer, as small models "
        "write them; in the agent loop and the OpenAI server's pass-through mode.",
    )
    calls_in_thinking: Literal["run", "ignore"] = Field(
        "run",
        description="A model call whose answer after </think> is empty but whose thinking holds "
        "complete calls of the agent's tools (vLLM #39056): run: those calls run, marked "
        "from_thinking in the events and the session; ignore: they stay reasoning. In the agent "
        "loop and the OpenAI server's pass-through mode.",
    )

    extra_arguments: Literal["drop", "reject"] = Field(
        "drop",
        description="Arguments of a call that the tool's schema does not declare (small models echo "
        "schema keys such as 'required'): 'drop' removes them before the arguments are checked, with a "
        "notice event (shown with -v, kept in the session); 'reject' leaves them, and the tool refuses "
        "the call. A tool that accepts any key (additionalProperties, **kwargs) gets them either way.",
    )
    delegate_to: list[str] = Field(
        default_factory=list,
        description="Agents of `agents:` this one may ask (a tool ask_<name>(task) each): the other "
        "agent works on the task in a conversation of its own, and its answer is the tool's result.",
    )
    handoffs: list[str] = Field(
        default_factory=list,
        description="Agents of `agents:` this one may hand the conversation to (a tool "
        "transfer_to_<name> each): the other agent answers the user until it calls transfer_back.",
    )
    stop_repeated_calls: bool = Field(
        True,
        description="Stop a model call as soon as its output holds a complete call equal (name and "
        "arguments) to one already run in this turn, then ask for the answer with the tools off "
        "(false: let the model write on until it ends or reaches max_tokens, then do the same).",
    )
    output_schema: dict[str, Any] | str | None = Field(None, description="A JSON Schema or 'module:Class' "
        "(a pydantic model): each turn's final answer is generated under it with vLLM structured outputs "
        "and validated (docs/structured-output.md).")  # fmt: skip

    def turn_tool_choice(self, message: str) -> str:
        """The ``tool_choice`` of a turn's first model call for the user's ``message``: the first
        of :attr:`tool_choice_rules` that matches it, else :attr:`tool_choice`."""
        rule = next((rule for rule in self.tool_choice_rules if rule.matches(message)), None)
        return self.tool_choice if rule is None else rule.tool_choice


class ToolSpec(Settings):
    """One tool: the name of an entry point in group ``qwenrun.tools``, and its settings."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
    settings: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0)
    approval: Approval = Field("auto", description="auto | ask (a person approves each call) | deny.")


def _tool_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mcp" if "mcp" in value else "toolset" if "toolset" in value else "plugin"
    if isinstance(value, ToolsetBase):
        return "toolset"
    return "mcp" if isinstance(value, McpToolsSpec) else "plugin"


ToolEntrySpec = Annotated[
    Annotated[ToolSpec, Tag("plugin")]
    | Annotated[McpToolsSpec, Tag("mcp")]
    | Annotated[ToolsetSpec, Tag("toolset")],
    Discriminator(_tool_kind),
]
"""One entry of ``tools:``: an entry-point tool (a name), the tools of an MCP server (``mcp:``), or
a built-in toolset (``toolset:``, :mod:`qwenrun.toolsets`)."""


def _names_as_tools(value: Any) -> Any:
    if isinstance(value, list):
        return [{"name": item} if isinstance(item, str) else item for item in value]
    return value


class MemberSpec(Settings):
    """One agent of ``agents:``: another agent file (``file:``), or the keys of one written here
    (what it leaves out is the team file's: model, engine, sampling; its tools are its own)."""

    file: str | None = Field(None, min_length=1, description="An agent file (relative: to this file), alone.")
    model: ModelSpec | None = Field(None, description="Another model (another engine); default: the file's.")
    engine: EngineSpec | None = Field(None, description="Another engine (kind: openai); default: the file's.")
    sampling: SamplingSpec | None = Field(None, description="The knobs it sets override the file's sampling.")
    agent: AgentSettings | None = Field(None, description="Its prompt, loop settings, the agents it names.")
    tools: list[ToolEntrySpec] = Field(default_factory=list)

    _tools_by_name = field_validator("tools", mode="before")(_names_as_tools)

    @model_validator(mode="after")
    def _file_alone(self) -> MemberSpec:
        given = sorted(self.model_fields_set - {"file"})
        if self.file is not None and given:
            raise ValueError(f"file: is a whole agent file; drop {', '.join(given)} or write them in it")
        return self


def _check_rule(text: str) -> str:
    Rule("deny", text, "")  # parses it: a ValueError names the column where it went wrong
    return text


_RuleText = Annotated[str, Field(min_length=1), AfterValidator(_check_rule)]


class PermissionsSpec(Settings):
    """``permissions:``: rules that match a tool's name and argument globs, applied to every tool
    call before it runs (deny > ask > allow; no match: the tool's own ``approval``); see
    docs/permissions.md."""

    deny: list[_RuleText] = Field(
        default_factory=list, description='Calls that never run, e.g. `write_file(path="/etc/**")`.'
    )
    ask: list[_RuleText] = Field(
        default_factory=list, description="Calls a person approves first, e.g. `mcp_*`."
    )
    allow: list[_RuleText] = Field(
        default_factory=list, description='Calls that run without asking, e.g. `shell(command="git *")`.'
    )

    def rules(self) -> list[Rule]:
        """The parsed rules, strongest kind first, each knowing where it is in the file."""
        kinds: dict[RuleKind, list[str]] = {"deny": self.deny, "ask": self.ask, "allow": self.allow}
        return [Rule(kind, text, f"permissions.{kind}[{index}]")
                for kind in RULE_KINDS for index, text in enumerate(kinds[kind])]  # fmt: skip


class AgentSpec(Settings):
    """The whole agent file."""

    version: int = Field(
        CURRENT_VERSION, ge=1, le=CURRENT_VERSION, description="The format version of this file."
    )
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=lambda: VLLMEngineSpec())
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec())
    agent: AgentSettings = Field(default_factory=lambda: AgentSettings())
    tools: list[ToolEntrySpec] = Field(default_factory=list)
    frontend: Frontend = Field(default_factory=lambda: CliFrontend())
    sessions: SessionsSpec = Field(default_factory=lambda: SessionsSpec())
    agents: dict[Annotated[str, StringConstraints(pattern=MEMBER_NAME)], MemberSpec] = Field(
        default_factory=dict,
        description="The other agents of a team (docs/teams.md), by name: agent.delegate_to and "
        "agent.handoffs name them.",
    )
    team: TeamSpec = Field(default_factory=lambda: TeamSpec())
    permissions: PermissionsSpec = Field(default_factory=lambda: PermissionsSpec())

    _source: str = PrivateAttr("<dict>")
    _members: dict[str, AgentSpec] = PrivateAttr(default_factory=dict)

    @property
    def members(self) -> dict[str, AgentSpec]:
        """The agents of ``agents:``, each a whole spec (a ``file:``'s, or this file's with its keys)."""
        return self._members

    @property
    def source(self) -> str:
        """Where the spec came from (a file name, ``<string>`` or ``<dict>``), for error messages."""
        return self._source

    _tools_by_name = field_validator("tools", mode="before")(_names_as_tools)

    @property
    def plugin_tools(self) -> list[tuple[int, ToolSpec]]:
        """The entry-point tools of ``tools:``, with their index in it."""
        return [(index, tool) for index, tool in enumerate(self.tools) if isinstance(tool, ToolSpec)]

    @property
    def toolsets(self) -> list[tuple[int, ToolsetBase]]:
        """The built-in toolset entries of ``tools:``, with their index in it."""
        return [(index, tool) for index, tool in enumerate(self.tools) if isinstance(tool, ToolsetBase)]

    def known_tool_names(self) -> list[str]:
        """The tool names the file declares (entry-point tools, then toolsets' tools); an MCP
        server's are known when it starts."""
        names = [tool.name for _, tool in self.plugin_tools]
        names += [name for _, toolset in self.toolsets for name in toolset.tool_names()]
        return names + tool_names(self.agent.delegate_to, self.agent.handoffs)

    @property
    def mcp_servers(self) -> list[tuple[int, McpToolsSpec]]:
        """The MCP server entries of ``tools:``, with their index in it."""
        return [(index, tool) for index, tool in enumerate(self.tools) if isinstance(tool, McpToolsSpec)]

    # -- the loading ladder ------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> AgentSpec:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        return cls.from_text(text, source=source, overrides=overrides)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>", overrides: Sequence[str] = ()) -> AgentSpec:
        try:
            data = safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {describe_yaml_error(exc, text)}") from None
        except RecursionError:  # PyYAML's parser recurses once per nesting level
            raise ConfigError(f"{source}: YAML syntax error: the document is nested too deeply") from None
        if data is None:
            raise ConfigError(f"{source}: the file is empty")
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data, source=source, overrides=overrides)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>", overrides: Sequence[str] = ()
    ) -> AgentSpec:
        data = apply_overrides(dict(data), overrides, source)
        data = upgrade(interpolate(data, (), source), CURRENT_VERSION, source)
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source, cls, overrides)) from None
        spec._source = source
        spec._check()
        spec._load_members()
        return spec

    def _load_members(self) -> None:
        """Build :attr:`members` and check the names the team's agents give (unknown, cycles)."""
        edges = {"": ("agent", self.agent.delegate_to, self.agent.handoffs)}
        for name, member in self.agents.items():
            where = f"agents.{name}"
            if member.file is not None:
                self._members[name] = load_file(self.source, where, member.file, AgentSpec.from_file)
                edges[name] = (where, [], [])  # its own agents are its own team's
                continue
            agent = member.agent or AgentSettings(name=name)
            if "name" not in agent.model_fields_set:
                agent = agent.model_copy(update={"name": name})
            update: dict[str, Any] = {
                "model": member.model or self.model, "engine": member.engine or self.engine,
                "agent": agent, "tools": member.tools, "agents": {},
                "sampling": self.sampling.model_copy(update=member.sampling.model_dump(exclude_unset=True))
                if member.sampling else self.sampling,
            }  # fmt: skip
            spec = self.model_copy(update=update)
            spec._source, spec._members = f"{self.source}: {where}", {}
            spec._check()
            self._members[name] = spec
            edges[name] = (f"{where}.agent", agent.delegate_to, agent.handoffs)
        check_graph(self.source, edges)

    def tool_choices(self) -> list[tuple[str, str]]:
        """Every ``tool_choice`` of the file, with where it is: ``agent.tool_choice`` and those of
        ``agent.tool_choice_rules``."""
        rules = self.agent.tool_choice_rules
        return [("agent.tool_choice", self.agent.tool_choice)] + [
            (f"agent.tool_choice_rules[{index}].tool_choice", rule.tool_choice)
            for index, rule in enumerate(rules)
        ]

    # -- cross-field checks ------------------------------------------------------------------

    def _check(self) -> None:
        names = self.known_tool_names()
        servers = self.mcp_servers
        for where, choice in self.tool_choices():
            # an MCP server's tool names are known when it starts (Agent.start checks tool_choice then)
            if choice not in ("auto", "none", "required") and choice not in names and not servers:
                raise ConfigError(
                    f"{self.source}: {where}: {choice!r} is not 'auto', 'none', 'required' "
                    f"or a tool of this agent ({', '.join(names) or 'none declared'})"
                )
            if choice == "required" and not self.tools:
                raise ConfigError(f"{self.source}: {where}: 'required' but the agent has no tools")
        if self.agent.thinking_budget is not None and self.agent.enable_thinking is False:
            raise ConfigError(
                f"{self.source}: agent.thinking_budget: {self.agent.thinking_budget} is set, but "
                "agent.enable_thinking is false (there is no thinking to limit)"
            )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            hint = " (a toolset's `prefix:` tells two of its kind apart)" if self.toolsets else ""
            raise ConfigError(f"{self.source}: tools: declared twice: {', '.join(duplicates)}{hint}")
        self._check_mcp_names()
        problem = self.engine.layout_problem() if isinstance(self.engine, VLLMEngineSpec) else None
        if problem:
            raise ConfigError(f"{self.source}: engine: {problem}")
        self.system_prompt()  # a bad template fails validation, not the first turn
        answer_schema(self)  # a schema or model that cannot be used fails validation too

    def _check_mcp_names(self) -> None:
        """Server names are unique, and the tools that ``allow`` lists clash with no other tool
        (the full lists are known only when the servers start: ``Agent.start`` checks them)."""
        seen: dict[str, int] = {}
        for index, entry in self.mcp_servers:
            if entry.name in seen:
                raise ConfigError(
                    f"{self.source}: tools[{index}].mcp.name: {entry.name!r} is also the name of "
                    f"tools[{seen[entry.name]}]"
                )
            seen[entry.name] = index
        owners = {tool.name: f"tools[{index}] (an entry-point tool)" for index, tool in self.plugin_tools}
        for index, toolset in self.toolsets:
            owners.update({name: f"tools[{index}] (toolset {toolset.kind})" for name in toolset.tool_names()})
        for index, entry in self.mcp_servers:
            for name in entry.allow or ():
                full = entry.prefix + name
                here = f"tools[{index}] (MCP server {entry.name!r})"
                if full in owners and owners[full] != here:
                    raise ConfigError(
                        f"{self.source}: tools[{index}].allow: tool {full!r} of {here} clashes with "
                        f"{full!r} of {owners[full]}; set `prefix:` on the server or leave it out"
                    )
                owners[full] = here

    def system_prompt(self, **extra: Any) -> str:
        """Render ``agent.system_prompt`` in a jinja2 sandbox with ``agent.variables``."""
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        tools = self.known_tool_names()
        context = {**self.agent.variables, "agent": self.agent.name, "tools": tools}
        try:
            return env.from_string(self.agent.system_prompt).render(**context, **extra)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (template line {line})" if line else ""
            raise ConfigError(f"{self.source}: agent.system_prompt: {exc.message or exc}{where}") from None
        except Exception as exc:  # sandbox SecurityError and errors raised inside the template
            raise ConfigError(f"{self.source}: agent.system_prompt: {type(exc).__name__}: {exc}") from None

    @property
    def served_model_name(self) -> str:
        return self.model.served_model_name or self.model.path

    def tool(self, name: str) -> ToolSpec | None:
        return next((tool for _, tool in self.plugin_tools if tool.name == name), None)
