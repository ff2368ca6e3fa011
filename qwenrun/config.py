"""The agent spec: pydantic models of the whole YAML file, and the one ladder that loads it.

``AgentSpec.from_file -> from_text -> from_dict``. Every error is a :class:`ConfigError` whose
message names the file, the path in the document and the problem, e.g.
``agents/weather.yaml: engine.max_num_seqs: Input should be greater than 0``.
Reading the YAML, ``${ENV}``, ``--set`` and the error messages live in :mod:`qwenrun.loading`.
This module must not import vLLM or torch: ``qwenrun validate`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from qwenrun.errors import ConfigError
from qwenrun.loading import (
    apply_overrides,
    describe_yaml_error,
    format_validation_error,
    interpolate,
    safe_load,
)

__all__ = [
    "AgentSettings",
    "AgentSpec",
    "ChainlitFrontend",
    "CliFrontend",
    "EngineSpec",
    "ModelSpec",
    "OpenAIFrontend",
    "SamplingSpec",
    "SessionsSpec",
    "ToolSpec",
    "apply_overrides",
    "format_validation_error",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Strict):
    """Which weights to load."""

    path: str = Field(description="Hugging Face name or local directory of the model.")
    tokenizer: str | None = Field(None, description="Tokenizer name or path (default: the model's).")
    revision: str | None = Field(None, description="Model revision (branch, tag or commit).")
    served_model_name: str | None = Field(None, description="Model name reported by the OpenAI server.")
    trust_remote_code: bool = False


class EngineSpec(_Strict):
    """vLLM engine parameters; passed to ``vllm.AsyncEngineArgs`` unchanged."""

    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    data_parallel_size: PositiveInt = 1
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: PositiveInt = 256
    max_model_len: PositiveInt | None = None
    enforce_eager: bool = False
    swap_space: float = Field(16, ge=0, description="GiB of CPU swap (ignored by vLLM versions without it).")
    seed: int | None = 0
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    load_format: str = Field("auto", description="'auto', 'safetensors', 'dummy' (random weights) ...")
    available_devices: PositiveInt | None = Field(
        None, description="GPUs this deployment may use; checked against TP x PP x DP when given."
    )
    gpus_per_node: PositiveInt | None = Field(
        None, description="GPUs of one node; an engine larger than that must use Ray (not a vLLM argument)."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set before vLLM is imported."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM EngineArgs field, passed as is (false booleans included).",
    )

    def layout_problem(self) -> str | None:
        """How TP x PP x DP, the executor backend and the GPU counts contradict vLLM, if they do."""
        tp, pp, dp = self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size
        backend, node = self.distributed_executor_backend, self.gpus_per_node
        replica = f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp}"
        sizes = f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = {tp} x {pp} x {dp}"
        if self.available_devices is not None and tp * pp * dp > self.available_devices:
            return f"{sizes} = {tp * pp * dp} GPUs, but available_devices is {self.available_devices}"
        if backend == "uni" and tp * pp > 1:
            return f"distributed_executor_backend 'uni' runs 1 worker, but {replica} workers are needed"
        if backend == "external_launcher" and dp > 1:
            return (
                f"data_parallel_size {dp} needs distributed_executor_backend 'mp' or 'ray': with "
                "'external_launcher' every torchrun process is a data-parallel rank of its own and vLLM "
                "does not balance requests between them"
            )
        if node is not None and tp * pp > node and backend != "ray":
            return (
                f"{replica} GPUs exceed gpus_per_node {node}: a model replica spanning nodes needs "
                f"distributed_executor_backend: ray (it is {repr(backend) if backend else 'unset'})"
            )
        ray_dp = self.extra.get("data_parallel_backend") == "ray"
        if node is not None and tp * pp <= node < tp * pp * dp and not ray_dp:
            return (
                f"{sizes} = {tp * pp * dp} GPUs exceed gpus_per_node {node}: data-parallel ranks on several "
                "nodes need engine.extra.data_parallel_backend: ray (or a lower data_parallel_size and "
                "more replicas)"
            )
        return None


class SamplingSpec(_Strict):
    """vLLM ``SamplingParams`` of every model call."""

    temperature: float = Field(0.45, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, description="-1 or None disables top-k.")
    max_tokens: PositiveInt = 8192
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Other SamplingParams fields.")


ToolChoice = Annotated[
    str,
    Field(description="'auto', 'none', 'required', or the name of one tool the model must call."),
]


class AgentSettings(_Strict):
    """The agent loop and its system prompt."""

    name: str = Field("qwenrun-agent", pattern=r"^[A-Za-z0-9_.:\-]+$")
    description: str = ""
    system_prompt: str = Field(
        "You are a helpful assistant.", description="jinja2 template, rendered with `variables`."
    )
    variables: dict[str, Any] = Field(default_factory=dict)
    max_iterations: PositiveInt = Field(8, description="Model calls per user turn, at most.")
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    timeout_s: float = Field(30, gt=0, description="Default time limit of one tool call.")
    max_tool_output_chars: PositiveInt = Field(16_000, description="Longer tool results are truncated.")
    repair_malformed_calls: bool = Field(True, description="Retry once with a grammar-forced call.")
    lenient_tool_calls: bool = Field(
        True,
        description='Also read a call written as bare JSON ({"name": <a tool>, "arguments": {...}}, '
        "a list of them, or one in a ```json fence) when that is the whole answer, as small models "
        "write them; in the agent loop and the OpenAI server's pass-through mode.",
    )


class ToolSpec(_Strict):
    """One tool: the name of an entry point in group ``qwenrun.tools``, and its settings."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
    settings: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0)


class CliFrontend(_Strict):
    kind: Literal["cli"] = "cli"
    show_tool_calls: bool = True


class OpenAIFrontend(_Strict):
    kind: Literal["openai"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    max_request_bytes: PositiveInt = 1_000_000
    max_tokens_cap: PositiveInt | None = Field(None, description="Upper bound on a request's max_tokens.")


class Starter(_Strict):
    label: str
    message: str


class ChainlitFrontend(_Strict):
    kind: Literal["chainlit"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    title: str | None = None
    watch: bool = False
    welcome: str | None = None
    starters: list[Starter] = Field(default_factory=list)
    password_env: str | None = Field(None, description="Env variable with the password; enables login.")
    username: str = "admin"


Frontend = Annotated[CliFrontend | OpenAIFrontend | ChainlitFrontend, Field(discriminator="kind")]


class SessionsSpec(_Strict):
    """Where every front end records its sessions (``qwenrun sessions`` reads them back)."""

    enabled: bool = Field(True, description="Record every turn; false: sessions live in memory only.")
    store: Literal["sqlite"] = "sqlite"
    path: str | None = Field(
        None,
        min_length=1,
        description="SQLite file (relative: to the agent file) or ':memory:'. Default: "
        "$QWENRUN_SESSIONS_DB, else $XDG_DATA_HOME/qwenrun/sessions.db, else "
        "~/.local/share/qwenrun/sessions.db.",
    )


class AgentSpec(_Strict):
    """The whole agent file."""

    model: ModelSpec
    engine: EngineSpec = Field(default_factory=lambda: EngineSpec())
    sampling: SamplingSpec = Field(default_factory=lambda: SamplingSpec())
    agent: AgentSettings = Field(default_factory=lambda: AgentSettings())
    tools: list[ToolSpec] = Field(default_factory=list)
    frontend: Frontend = Field(default_factory=lambda: CliFrontend())
    sessions: SessionsSpec = Field(default_factory=lambda: SessionsSpec())

    _source: str = PrivateAttr("<dict>")

    @property
    def source(self) -> str:
        """Where the spec came from (a file name, ``<string>`` or ``<dict>``), for error messages."""
        return self._source

    @field_validator("tools", mode="before")
    @classmethod
    def _names_as_tools(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

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
        data = interpolate(data, (), source)
        try:
            spec = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source, cls, overrides)) from None
        spec._source = source
        spec._check()
        return spec

    # -- cross-field checks ------------------------------------------------------------------

    def _check(self) -> None:
        choice = self.agent.tool_choice
        names = [tool.name for tool in self.tools]
        if choice not in ("auto", "none", "required") and choice not in names:
            raise ConfigError(
                f"{self.source}: agent.tool_choice: {choice!r} is not 'auto', 'none', 'required' "
                f"or a tool of this agent ({', '.join(names) or 'none declared'})"
            )
        if choice == "required" and not names:
            raise ConfigError(f"{self.source}: agent.tool_choice: 'required' but the agent has no tools")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"{self.source}: tools: declared twice: {', '.join(duplicates)}")
        problem = self.engine.layout_problem()
        if problem:
            raise ConfigError(f"{self.source}: engine: {problem}")
        self.system_prompt()  # a bad template fails validation, not the first turn

    def system_prompt(self, **extra: Any) -> str:
        """Render ``agent.system_prompt`` in a jinja2 sandbox with ``agent.variables``."""
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        context = {**self.agent.variables, "agent": self.agent.name, "tools": [t.name for t in self.tools]}
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
        return next((tool for tool in self.tools if tool.name == name), None)
