"""The ``think`` toolset: one tool that records a thought and changes nothing.

It gives a model room to reason between tool calls (after a result, before the next call), as
Anthropic's "think" tool does; the thought is in the call's arguments, so it stays in the history
and the session record, and the model reads back a short acknowledgement.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["think"]


def think(thought: Annotated[str, Field(min_length=1, max_length=20_000)]) -> str:
    """Think: write down your reasoning, a plan, or what a result means.

    It changes nothing and fetches nothing; use it between tool calls when you need to reason first.

    Args:
        thought: Your thought.
    """
    return f"(thought noted: {len(thought)} characters)"
