"""The ``todo`` toolset: a to-do list per session, which the model writes whole and reads back.

``todo_write`` replaces the list (each item a text and a status), ``todo_read`` shows it. There is
one list per session (:data:`qwenrun.context.SESSION_ID`; calls outside a session share one list).
With a session store (the agent's), a list is kept there, as the memory toolset's facts are (namespace
``<agent name>/todo``, the session's scope, key ``list``): it survives a restart, a resumed session
finds it and replicas on one database share it. Without one, lists are kept in memory for as long
as the agent lives (the most recent :data:`MAX_SESSIONS` sessions keep theirs).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwenrun.context import SESSION_ID
from qwenrun.errors import ToolError
from qwenrun.sessions.store import MemoryStore
from qwenrun.toolsets.spec import TodoToolset

__all__ = ["TodoLists"]

MAX_SESSIONS = 1024
_MARKS = {"pending": "[ ]", "in_progress": "[~]", "done": "[x]"}


class TodoItem(BaseModel):
    """One item of the list."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=500, description="What to do.")
    status: Literal["pending", "in_progress", "done"] = "pending"


class TodoLists:
    """The lists of one ``todo`` entry, by session id; its two tools are bound methods."""

    def __init__(self, settings: TodoToolset, agent: str = "agent", store: MemoryStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.namespace = f"{agent}/todo"  # no agent name or memory namespace holds a "/"
        self._lists: OrderedDict[str, list[TodoItem]] = OrderedDict()
        self._lock = threading.Lock()  # sync tools run on threads of their own

    def todo_write(self, items: Annotated[list[TodoItem], Field(max_length=1000)]) -> str:
        """Replace your to-do list with these items (the whole list, in order).

        Keep it up to date as you work: mark an item in_progress when you start it, done when it is done.

        Args:
            items: Every item of the list, each a text and a status (pending, in_progress or done).
        """
        if len(items) > self.settings.max_items:
            raise ToolError(f"at most {self.settings.max_items} items; got {len(items)}")
        key = SESSION_ID.get() or ""
        if self.store is not None:
            value = json.dumps([item.model_dump() for item in items], ensure_ascii=False)
            self.store.put_fact(self.namespace, key, "list", value)
            return self._show(items)
        with self._lock:
            self._lists[key] = list(items)
            self._lists.move_to_end(key)
            while len(self._lists) > MAX_SESSIONS:
                self._lists.popitem(last=False)
        return self._show(items)

    def todo_read(self) -> str:
        """Show your to-do list."""
        if self.store is not None:
            facts = self.store.facts(self.namespace, SESSION_ID.get() or "")
            kept: list[Any] = next((json.loads(fact.value) for fact in facts if fact.key == "list"), [])
            return self._show([TodoItem.model_validate(item) for item in kept])
        with self._lock:
            items = list(self._lists.get(SESSION_ID.get() or "", []))
        return self._show(items)

    @staticmethod
    def _show(items: list[TodoItem]) -> str:
        if not items:
            return "The to-do list is empty."
        done = sum(item.status == "done" for item in items)
        lines = [f"{number}. {_MARKS[item.status]} {item.text}" for number, item in enumerate(items, 1)]
        return "\n".join([f"To-do ({done} of {len(items)} done):", *lines])
