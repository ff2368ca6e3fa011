"""The wire format of ``POST /v1/responses``: the request model, and items to chat messages.

:class:`ResponsesRequest` validates a body as OpenAI's Responses API defines it (``input`` as text or
items, ``instructions``, function ``tools``, ``tool_choice``, ``text.format``, ``store``,
``previous_response_id``, ...). Fields qwenrun cannot honour (hosted tools, images, ``background``,
``conversation``, ``prompt``, logprobs) are refused with a message naming them; unknown fields are
ignored, as in :mod:`~qwenrun.frontends.openai.schemas`.

Items are kept as plain dicts in OpenAI's shape (:func:`normalize` gives every input item an id):
a conversation is the list of its items, and :func:`to_messages` turns it into the chat messages
the engine renders — an assistant message with its ``function_call`` (or server-run ``mcp_call``)
items as ``tool_calls``, each ``function_call_output`` as a ``tool`` message.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from qwenrun.frontends.openai.schemas import FunctionDefinition
from qwenrun.sampling import knob_field

__all__ = ["FIELDS", "ResponsesRequest", "new_id", "normalize", "to_messages"]

TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    """An item or response id as OpenAI writes them (``msg_…``, ``fc_…``, ``resp_…``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    """A text part of a message (``input_text``, ``output_text`` or ``refusal``); nothing else."""

    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type in TEXT_PARTS and self.text is None:
            raise ValueError(f"a {self.type!r} part needs `text`")
        if self.type == "refusal" and self.refusal is None:
            raise ValueError("a 'refusal' part needs `refusal`")
        if self.type not in (*TEXT_PARTS, "refusal"):
            raise ValueError(f"{self.type!r} content is not supported; only input_text and output_text")
        return self

    def plain(self) -> str:
        return self.text if self.text is not None else self.refusal or ""


def _text_or_list(value: Any) -> str:
    return "string" if isinstance(value, str) else "list"


# A string or a list, told apart first so that an error names only the branch that was meant.
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("list")], Discriminator(_text_or_list)
]


def _plain(content: Content) -> str:
    return content if isinstance(content, str) else "".join(part.plain() for part in content)


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Content
    id: str | None = None


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None


class McpCallItem(_Model):
    """A tool the server ran in agent mode (what agent mode returns); replayed as history."""

    type: Literal["mcp_call"]
    id: str | None = None
    name: str = Field(min_length=1)
    arguments: str
    output: str | None = None
    server_label: str | None = None
    error: Any = None


class McpApprovalRequestItem(_Model):
    """A call that waits for the client's approval (what agent mode returns); replayed, it is skipped."""

    type: Literal["mcp_approval_request"]
    id: str | None = None
    name: str = Field(min_length=1)
    arguments: str
    server_label: str | None = None


class McpApprovalResponseItem(_Model):
    """The client's answer to an ``mcp_approval_request``: the waiting turn goes on."""

    type: Literal["mcp_approval_response"]
    id: str | None = None
    approval_request_id: str = Field(min_length=1)
    approve: bool
    reason: str | None = None


ITEM_TYPES = (
    "message", "function_call", "function_call_output", "reasoning", "mcp_call", "mcp_approval_request",
    "mcp_approval_response",
)  # fmt: skip


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type") or ("message" if "role" in value else None)
        return kind if kind in ITEM_TYPES else None
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[McpCallItem, Tag("mcp_call")]
    | Annotated[McpApprovalRequestItem, Tag("mcp_approval_request")]
    | Annotated[McpApprovalResponseItem, Tag("mcp_approval_response")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message=f"unsupported item; the item types served are {', '.join(ITEM_TYPES)}",
    ),
]


class FunctionTool(FunctionDefinition):
    """A Responses function tool: ``{"type": "function", "name", "description", "parameters"}``."""

    type: Literal["function"] = "function"

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type", "function") != "function":
            raise ValueError(f"only function tools are supported, not {value.get('type')!r}")
        return value

    def chat_tool(self) -> dict[str, Any]:
        """The tool as chat completions (and the chat template) take it."""
        function = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": function}


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Model):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a 'json_schema' format needs `schema`")
        return self


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Model):
    """The body of ``POST /v1/responses``."""

    model: str
    input: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[InputItem], Field(min_length=1), Tag("list")],
        Discriminator(_text_or_list),
    ]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    store: bool = True
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    # sampling knobs of OpenAI's Responses API (vLLM's others come from the body: responses.py)
    max_output_tokens: int | None = knob_field("max_tokens")  # OPENAI_NAMES["responses"]
    temperature: float | None = knob_field("temperature")
    top_p: float | None = knob_field("top_p")
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _served_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError("only 'auto', 'none', 'required' or {'type': 'function', 'name': ...} work here")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [tool.name for tool in value or []]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"tool names must be unique; declared twice: {', '.join(twice)}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> ResponsesRequest:
        refused = {
            "background": "background responses are not supported; send the request and wait",
            "conversation": "conversations are not supported; continue with previous_response_id",
            "prompt": "prompt templates are not supported; send instructions and input",
            "top_logprobs": "logprobs are not supported",
            "max_tool_calls": "max_tool_calls is not supported (agent mode has the file's max_iterations)",
        }
        given = [field for field in refused if getattr(self, field)]
        if given:
            raise ValueError("; ".join(f"{field}: {refused[field]}" for field in given))
        return self

    def items(self) -> list[InputItem]:
        """``input`` as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return self.input


_MODELS: tuple[type[BaseModel], ...] = (
    ResponsesRequest, MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem, McpCallItem,
    McpApprovalRequestItem, McpApprovalResponseItem, ContentPart, FunctionTool, FunctionChoice, TextFormat,
    TextConfig,
)  # fmt: skip
FIELDS = frozenset(name for model in _MODELS for name in model.model_fields)
"""Every field name of the request (what an error's ``param`` may name)."""


def normalize(item: InputItem) -> dict[str, Any]:
    """An input item as a plain dict in OpenAI's shape, with an id (kept in the conversation)."""
    if isinstance(item, MessageItem):
        kind = "output_text" if item.role == "assistant" else "input_text"
        return {"type": "message", "id": item.id or new_id("msg"), "role": item.role,
                "content": [{"type": kind, "text": _plain(item.content)}]}  # fmt: skip
    if isinstance(item, FunctionCallItem):
        return {"type": "function_call", "id": item.id or new_id("fc"), "call_id": item.call_id,
                "name": item.name, "arguments": item.arguments, "status": "completed"}  # fmt: skip
    if isinstance(item, FunctionCallOutputItem):
        return {"type": "function_call_output", "id": item.id or new_id("fco"), "call_id": item.call_id,
                "output": _plain(item.output), "status": "completed"}  # fmt: skip
    data = item.model_dump(exclude_none=True, by_alias=True)
    data["id"] = item.id or new_id("rs" if isinstance(item, ReasoningItem) else "mcp")
    return data


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text") or part.get("refusal") or "") for part in content or [])


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation's items as chat messages (OpenAI format, what the engine renders).

    An assistant message and the calls after it become one assistant message with ``tool_calls``;
    a server-run ``mcp_call`` also adds its ``tool`` message. A ``reasoning`` item goes to the
    next assistant message as ``reasoning_content`` (templates that render thinking use it).
    """
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant message being assembled
    results: list[dict[str, Any]] = []  # the tool messages of its server-run calls
    reasoning = ""

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            messages.append(turn)
            messages.extend(results)
        turn = None
        results.clear()

    def assistant() -> dict[str, Any]:
        nonlocal turn, reasoning
        if turn is None:
            turn = {"role": "assistant", "content": None}
            if reasoning:
                turn["reasoning_content"], reasoning = reasoning, ""
        return turn

    for item in items:
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") == "assistant":
            if turn is not None and (turn.get("tool_calls") or turn["content"] is not None):
                flush()
            assistant()["content"] = _text(item.get("content"))
        elif kind == "message":
            flush()
            role = "user" if item.get("role") == "user" else "system"
            messages.append({"role": role, "content": _text(item.get("content"))})
        elif kind in ("function_call", "mcp_call"):
            call_id = item["call_id"] if kind == "function_call" else item["id"]
            function = {"name": item["name"], "arguments": item["arguments"]}
            call = {"id": call_id, "type": "function", "function": function}
            assistant().setdefault("tool_calls", []).append(call)
            if kind == "mcp_call":
                results.append({"role": "tool", "tool_call_id": call_id, "content": _mcp_output(item)})
        elif kind == "function_call_output":
            flush()
            output = _text(item["output"])
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            flush()
            reasoning = "".join(str(part.get("text", "")) for part in item.get("content") or [])
    flush()
    return messages


def _mcp_output(item: dict[str, Any]) -> str:
    if item.get("output") is not None:
        return str(item["output"])
    error = item.get("error")
    if isinstance(error, dict):
        return f"Error: {error.get('message') or error.get('content') or error}"
    return f"Error: {error}" if error else ""
