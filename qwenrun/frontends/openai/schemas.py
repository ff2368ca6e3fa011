"""The wire format of the OpenAI-compatible server: request models (pydantic) and the error body.

Every request body is validated here before anything reaches the agent or the engine. Fields it
does not know at all (``user``, ``metadata``, ...) are ignored, as vLLM does; what a mode cannot
honour (``n > 1`` or ``logprobs`` in agent mode) is refused in
:mod:`qwenrun.frontends.openai.chat` with a message naming the field. :class:`APIError` carries an HTTP status
and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from qwenrun.sampling import SamplingKnobs, knob_field
from qwenrun.spec.output import OutputSchema

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "UserMessage",
    "invalid_request",
    "text_of",
]


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)


class TextPart(_Model):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


def text_of(content: Content | None) -> str:
    """Message content as plain text (text parts joined)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: Content
    name: str | None = None


class FunctionCall(_Model):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCallItem(_Model):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallItem] | None = None
    name: str | None = None
    reasoning: str | None = None  # vLLM's name of an earlier answer's reasoning
    reasoning_content: str | None = None  # the older name (DeepSeek, vLLM < 0.10)

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Model):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1)


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


MAX_SCHEMA_DEPTH = 32  # nesting levels of a tool's parameters; the checker and the grammar recurse


def _depth(node: Any) -> int:
    """How deeply ``node`` nests dicts and lists (counted without recursion, up to one past the limit)."""
    depth, level = 0, [node]
    while level and depth <= MAX_SCHEMA_DEPTH:
        depth += 1
        level = [child for item in level if isinstance(item, dict | list)
                 for child in (item.values() if isinstance(item, dict) else item)]  # fmt: skip
    return depth


def _check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Any valid JSON Schema, nested at most ``MAX_SCHEMA_DEPTH`` levels. A client sends the same
    tool schemas with every request of a conversation: the verdict on each one is kept (by its
    canonical JSON), since checking it against the meta-schema was most of a pass-through
    request's CPU time (issue 32: 20 tools, py-spy)."""
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - parsed from JSON, so always encodable
        key = None
    problem = _schema_problem(key) if key is not None else _problem_of(schema)
    if problem is not None:
        raise ValueError(problem)
    return schema


@functools.lru_cache(maxsize=4096)
def _schema_problem(text: str) -> str | None:
    return _problem_of(json.loads(text))


def _problem_of(schema: dict[str, Any]) -> str | None:
    """What is wrong with ``schema`` as a JSON Schema (None: nothing)."""
    try:
        from jsonschema import Draft202012Validator, exceptions, validators  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - without jsonschema only the depth is checked
        return None
    try:
        validators.validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = ".".join(str(part) for part in exc.absolute_path)
        return f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}"
    return None


def _check_parameters(schema: dict[str, Any]) -> dict[str, Any]:
    """A function's ``parameters`` must be a valid JSON Schema of an object."""
    if schema.get("type", "object") != "object":
        raise ValueError("must be a JSON Schema of type 'object'")
    return _check_schema(schema)


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return value if value is None else _check_parameters(value)


class ToolDefinition(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class JSONSchemaSpec(_Model):
    """``response_format.json_schema``: the answer must be JSON of ``schema``."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_schema(value)


class ResponseFormat(_Model):
    """``response_format``: free text, any JSON object, or JSON of a schema (structured outputs)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema: {name, schema}")
        return self


class ToolName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: ToolName


class StreamOptions(_Model):
    include_usage: bool = False


class StructuredOutputs(_Model):
    """vLLM's ``structured_outputs`` (``extra_body``): exactly one constraint on the answer."""

    regex: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="json")
    grammar: str | None = None
    choice: list[str] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("regex", "json", "grammar", "choice") if self.get(name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of regex, json, grammar, choice (got {', '.join(given) or 'none'})"
            )
        return self

    def get(self, name: str) -> Any:
        return self.json_schema if name == "json" else getattr(self, name)


# chat template variables a request may not set: the server sets them itself
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
     "chat_template", "return_dict", "return_assistant_tokens_mask", "conversation", "tool_choice"}
)  # fmt: skip


class ChatCompletionRequest(_Model, SamplingKnobs):
    """The body of ``POST /v1/chat/completions``: its own fields and the sampling knobs."""

    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # the sampling knobs are those of SamplingKnobs (OpenAI's and vLLM's ``extra_body`` ones alike)
    max_completion_tokens: int | None = knob_field("max_tokens")  # OPENAI_NAMES["chat"]
    structured_outputs: StructuredOutputs | None = None
    # thinking, as vLLM takes it: template variables (enable_thinking), a budget, reasoning in the answer
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=-1, description="-1: no limit")
    include_reasoning: bool = True
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI's bound, and vLLM's default max_logprobs
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def wanted_logprobs(self) -> int | None:
        """How many alternatives per token the engine must score (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_schema(self) -> OutputSchema | None:
        """The output schema of an agent-mode request: its JSON ``response_format`` (``json_object``:
        any object), which the turn's answer must match instead of ``agent.output_schema``."""
        form = self.response_format
        if form is None or form.type == "text":
            return None
        if form.json_schema is None:
            return OutputSchema.from_json_schema({"type": "object"})
        try:
            return OutputSchema.from_json_schema(form.json_schema.json_schema, form.json_schema.name)
        except ValueError as exc:
            where = "response_format.json_schema.schema"
            raise APIError(400, f"{where}: {exc}", param="response_format") from None

    def json_format(self) -> bool:
        """Whether ``response_format`` asks for JSON (``json_object`` or ``json_schema``)."""
        return self.response_format is not None and self.response_format.type != "text"

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(value or {}))
        if reserved:
            raise ValueError(f"the server sets {', '.join(reserved)} itself")
        bad = sorted(key for key in value or {} if not key.isidentifier())
        if bad:
            raise ValueError(f"not a template variable name: {', '.join(map(repr, bad))}")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in value or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tool names must be unique; declared twice: {', '.join(twice)}")
        return value

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The client's tools as plain OpenAI dicts (what the chat template renders)."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []]

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def engine_message(message: SystemMessage | UserMessage | AssistantMessage | ToolMessage) -> dict[str, Any]:
    """A validated message as the engine takes it (``developer`` becomes ``system``; an assistant's
    ``reasoning`` becomes ``reasoning_content``, what Qwen3's chat template reads)."""
    data = message.model_dump(exclude_none=True)
    if data["role"] == "developer":
        data["role"] = "system"
    reasoning = data.pop("reasoning", None)
    if reasoning is not None:
        data.setdefault("reasoning_content", reasoning)
    return data


# -- validation errors -> one 400 ----------------------------------------------------------------

_MODELS: Sequence[type[BaseModel]] = (
    ChatCompletionRequest, SystemMessage, UserMessage, AssistantMessage, ToolMessage, TextPart,
    ToolCallItem, FunctionCall, ToolDefinition, FunctionDefinition, NamedToolChoice, ToolName, StreamOptions,
    StructuredOutputs, ResponseFormat, JSONSchemaSpec,
)  # fmt: skip
_FIELDS = frozenset(
    name
    for model in _MODELS
    for field, info in model.model_fields.items()
    for name in (field, info.alias)
    if name
)


def _param(loc: Sequence[str | int], fields: frozenset[str] = _FIELDS) -> str | None:
    """``('messages', 0, 'tool', 'tool_call_id')`` -> ``messages[0].tool_call_id``: union tags and
    member labels (``str``, ``list[TextPart]``) are dropped, only field names and indexes kept."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in fields:
            text += f".{part}" if text else part
    return text or None


def invalid_request(exc: ValidationError, fields: frozenset[str] = _FIELDS) -> APIError:
    """One 400 ``invalid_request_error`` naming every problem; ``param`` is the first one's field
    (``fields``: the field names of the request's models, chat completions' by default)."""
    problems: list[str] = []
    params: list[str | None] = []
    for error in exc.errors(include_url=False):
        param = _param(error["loc"], fields)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx") or {}
            message = f"unknown role {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        line = f"{param}: {message}" if param else message
        if line not in problems:
            problems.append(line)
            params.append(param)
    return APIError(400, "; ".join(problems), param=params[0] if params else None)
