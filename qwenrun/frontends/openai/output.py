"""Responses output: chat pieces in, output items and the documented server-sent events out.

:class:`ResponseBuilder` reads the pieces of :mod:`~qwenrun.frontends.openai.chat` (both modes) and
keeps the response object up to date; each call returns the SSE events of that step, so a
non-streamed response is the same builder with its events dropped and the two always agree.

* text -> a ``message`` item: ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``;
* reasoning (:class:`~qwenrun.events.Reasoning`) -> a ``reasoning`` item with
  one ``reasoning_text`` part, the same events with ``response.reasoning_text.delta`` / ``.done``;
* a pass-through tool call -> a ``function_call`` item: added, ``response.function_call_arguments.delta``
  (one per :class:`~qwenrun.events.CallDelta` while the call is written) and, with the complete
  :class:`~qwenrun.events.ParsedCall`, ``.done``, done;
* a tool the agent ran (agent mode) -> an ``mcp_call`` item, OpenAI's item for a tool the server
  runs: added, ``response.mcp_call.in_progress``, ``response.mcp_call_arguments.delta`` / ``.done``,
  then with its result ``response.mcp_call.completed`` (or ``.failed``), done;
* the end -> ``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut it),
  an error -> ``response.failed``. Every event has a ``sequence_number`` from 0.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any

from qwenrun.events import CallDelta, ParsedCall, Reasoning, TextDelta
from qwenrun.frontends.openai import chat
from qwenrun.frontends.openai.items import new_id

__all__ = ["ResponseBuilder"]

SseEvent = dict[str, Any]  # one server-sent event of the Responses API


def usage(finish: chat.Finish) -> dict[str, Any]:
    return {
        "input_tokens": finish.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }  # fmt: skip


@dataclass(slots=True)
class _Text:
    """The message or reasoning item being written."""

    index: int
    item: dict[str, Any]
    part: str  # output_text or reasoning_text
    chunks: list[str] = field(default_factory=list)


class ResponseBuilder:
    """One response: ``start()``, ``feed(piece.part)`` for each piece, or ``fail(...)``; every call
    returns the events of that step. ``response`` is the response object at every moment."""

    def __init__(self, response: dict[str, Any], server_label: str) -> None:
        self.response = response
        self.output: list[dict[str, Any]] = response["output"]
        self.server_label = server_label
        self._seq = 0
        self._text: _Text | None = None
        self._calls: dict[str, int] = {}  # agent mode: tool calls running, by call id -> output index
        self._writing: dict[str, int] = {}  # pass-through: calls being streamed, by call id -> output index

    def _event(self, kind: str, **fields: Any) -> SseEvent:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[SseEvent]:
        snapshot = copy.deepcopy(self.response)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]  # fmt: skip

    def feed(self, part: chat.Part) -> list[SseEvent]:
        """The events of one part of the answer (the Responses API has one choice)."""
        if isinstance(part, TextDelta):
            return self._write(part.text, "message")
        if isinstance(part, Reasoning):
            return self._write(part.text, "reasoning")
        if isinstance(part, CallDelta):
            return self._call_delta(part)
        if isinstance(part, ParsedCall):
            return self._function_call(part)
        if isinstance(part, chat.StepPart):
            return self._step(part.data)
        if isinstance(part, chat.Logprobs):  # the Responses API returns no token log probabilities
            return []
        return self._finish(part)

    def fail(self, code: str, message: str) -> list[SseEvent]:
        """The stream's end after an error (``response.failed``)."""
        self.response.update(status="failed", error={"code": code, "message": message})
        return [self._event("response.failed", response=self.response)]

    # -- message and reasoning items ----------------------------------------------------------

    def _add(self, item: dict[str, Any]) -> tuple[int, SseEvent]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item))

    def _write(self, text: str, kind: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        if self._text is None or self._text.item["type"] != kind:
            events += self._close_text()
            text = text.lstrip()  # an item never starts with blank text
            if not text:
                return events
            if kind == "message":
                item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}  # fmt: skip
            else:
                item = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                        "content": []}  # fmt: skip
            index, added = self._add(item)
            self._text = _Text(index, item, "output_text" if kind == "message" else "reasoning_text")
            events += [added, self._event("response.content_part.added", **self._where(),
                                          part=self._part(""))]  # fmt: skip
        self._text.chunks.append(text)
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        return [*events, self._event(delta, **self._where(), delta=text, **extra)]

    def _where(self) -> dict[str, Any]:
        assert self._text is not None
        return {"item_id": self._text.item["id"], "output_index": self._text.index, "content_index": 0}

    def _part(self, text: str) -> dict[str, Any]:
        assert self._text is not None
        if self._text.part == "output_text":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def _close_text(self) -> list[SseEvent]:
        if self._text is None:
            return []
        text = "".join(self._text.chunks)
        where, part = self._where(), self._part(text)
        message = part["type"] == "output_text"
        done = "response.output_text.done" if message else "response.reasoning_text.done"
        extra: dict[str, Any] = {"logprobs": []} if message else {}
        self._text.item.update(status="completed", content=[part])
        events = [self._event(done, **where, text=text, **extra),
                  self._event("response.content_part.done", **where, part=part),
                  self._done(where["output_index"])]  # fmt: skip
        self._text = None
        return events

    # -- tool calls ------------------------------------------------------------------------

    def _call_delta(self, piece: CallDelta) -> list[SseEvent]:
        """A piece of a call being written: the first opens its ``function_call`` item."""
        events: list[SseEvent] = []
        if piece.id not in self._writing:
            events = self._close_text()
            item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": piece.id, "name": piece.name or "", "arguments": ""}  # fmt: skip
            self._writing[piece.id], added = self._add(item)
            events.append(added)
        index = self._writing[piece.id]
        if piece.arguments:
            item = self.output[index]
            item["arguments"] += piece.arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=piece.arguments))  # fmt: skip
        return events

    def _function_call(self, call: ParsedCall) -> list[SseEvent]:
        arguments = call.arguments_json()
        if call.id in self._writing:  # its arguments were streamed: it is complete now
            index = self._writing.pop(call.id)
            item = self.output[index]
            item.update(arguments=arguments, status="completed")
            where = {"item_id": item["id"], "output_index": index}
            return [
                self._event(
                    "response.function_call_arguments.done", **where, name=item["name"], arguments=arguments
                ),
                self._done(index),
            ]
        events = self._close_text()
        item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": ""}  # fmt: skip
        index, added = self._add(item)
        where = {"item_id": item["id"], "output_index": index}
        item.update(arguments=arguments, status="completed")
        return [
            *events,
            added,
            self._event("response.function_call_arguments.delta", **where, delta=arguments),
            self._event(
                "response.function_call_arguments.done", **where, name=call.name, arguments=arguments
            ),
            self._done(index),
        ]

    def _done(self, index: int) -> SseEvent:
        item = copy.deepcopy(self.output[index])
        return self._event("response.output_item.done", output_index=index, item=item)

    def _step(self, data: dict[str, Any]) -> list[SseEvent]:
        """A server-side step of agent mode: a tool call opens an ``mcp_call``, its result ends it."""
        if data.get("type") == "tool_call":
            events = self._close_text()
            arguments = json.dumps(data.get("arguments", {}), ensure_ascii=False)
            item = {"id": f"mcp_{data['id']}", "type": "mcp_call", "status": "in_progress",
                    "server_label": self.server_label, "name": data["name"], "arguments": "",
                    "output": None, "error": None}  # fmt: skip
            index, added = self._add(item)
            self._calls[str(data["id"])] = index
            where = {"item_id": item["id"], "output_index": index}
            item["arguments"] = arguments
            return [
                *events,
                added,
                self._event("response.mcp_call.in_progress", **where),
                self._event("response.mcp_call_arguments.delta", **where, delta=arguments),
                self._event("response.mcp_call_arguments.done", **where, arguments=arguments),
            ]
        if data.get("type") == "tool_result" and str(data.get("id")) in self._calls:
            index = self._calls.pop(str(data["id"]))
            item = self.output[index]
            failed = bool(data.get("is_error"))
            item.update(output=data.get("content"), status="failed" if failed else "completed")
            if failed:
                item["error"] = {"type": "mcp_tool_execution_error", "content": data.get("content")}
            where = {"item_id": item["id"], "output_index": index}
            ended = "response.mcp_call.failed" if failed else "response.mcp_call.completed"
            return [self._event(ended, **where), self._done(index)]
        if data.get("type") == "approval_request":  # the turn waits for the client (pending.py)
            events = self._close_text()
            arguments = json.dumps(data.get("arguments", {}), ensure_ascii=False)
            item = {"id": data["id"], "type": "mcp_approval_request", "server_label": self.server_label,
                    "name": data["name"], "arguments": arguments}  # fmt: skip
            index, added = self._add(item)
            if (running := self._calls.pop(str(data.get("call_id")), None)) is not None:
                self.output[running]["status"] = "incomplete"  # it runs (or not) in the next response
                events += [self._done(running)]
            return [*events, added, self._done(index)]
        return []  # a repair step: the retried call shows as the call itself

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, finish: chat.Finish) -> list[SseEvent]:
        events = self._close_text()
        for index in [*self._calls.values(), *self._writing.values()]:  # cut short: no result, or unfinished
            self.output[index]["status"] = "incomplete"
            events.append(self._done(index))
        self._calls.clear()
        self._writing.clear()
        cut = finish.reason == "length"
        self.response.update(
            status="incomplete" if cut else "completed",
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
            usage=usage(finish),
        )
        if not cut:
            self.response["completed_at"] = int(time.time())
        terminal = "response.incomplete" if cut else "response.completed"
        return [*events, self._event(terminal, response=self.response)]
