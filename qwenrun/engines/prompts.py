"""Prompt token ids without re-tokenizing what an earlier prompt already had (``engine.kind: vllm``).

An agent's prompts repeat themselves: every model call of every session starts with the same system
prompt and tool schemas (thousands of tokens), and each call of a conversation repeats the whole
history before its new messages. Tokenizing all of it again costs milliseconds of the event loop
per call, growing with the conversation.

Qwen's chat templates (ChatML) open every message with the special token ``<|im_start|>``. A Hugging
Face tokenizer cuts its input at its added tokens before it normalizes or splits anything, and
tokenizes each piece between them on its own. So the ids of ``A + "<|im_start|>" + B`` are the ids
of ``A``, the id of ``<|im_start|>`` and the ids of ``B``, whatever ``A`` and ``B`` are.
:class:`PromptTokenizer` cuts the rendered prompt there and keeps the ids of recent pieces (a
message each, and the system prompt with the tools); only pieces it has not seen are tokenized.
The chat template still renders every prompt whole, so what the template decides (Qwen3 dropping
the reasoning of earlier turns, ``enable_thinking``) is kept; a changed message is a new piece.

It is used only when the tokenizer is shown to cut there: the marker is one added special token
(not stripped, not normalized, not split as text), no other added token overlaps it, and a probe
text tokenizes the same both ways. Otherwise every prompt is tokenized whole.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

__all__ = ["MARKER", "PromptTokenizer"]

log = logging.getLogger("qwenrun.engines.vllm.engine")

MARKER = "<|im_start|>"
_PROBE = (
    "<|im_start|>system\nYou are Qwen.\n\n# Tools\n<tools>\n{\"a\": 1}\n</tools><|im_end|>\n"
    "<|im_start|>user\n  广州天气? \n\n<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
    "{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|im_end|>\n<|im_start|>user\n"
    "<tool_response>\n ok \n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def _added_tokens(tokenizer: Any) -> dict[int, Any]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    return dict(decoder) if isinstance(decoder, dict) else {}


def _overlaps(a: str, b: str) -> bool:
    """Whether ``a`` contains ``b`` or one ends where the other begins."""
    if b in a or a in b:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def marker_id(tokenizer: Any, marker: str = MARKER) -> int | None:
    """The id of ``marker`` if ``tokenizer`` cuts its input there (see the module), else None."""
    if getattr(tokenizer, "split_special_tokens", False):
        return None
    found = None
    for token_id, token in _added_tokens(tokenizer).items():
        content = getattr(token, "content", str(token))
        if content == marker:
            flags = ("lstrip", "rstrip", "single_word", "normalized")
            if any(getattr(token, flag, True) for flag in flags):
                return None
            found = int(token_id)
        elif _overlaps(content, marker):
            return None
    return found


class PromptTokenizer:
    """Token ids of rendered prompts, reusing the ids of the pieces between ``<|im_start|>``
    tokens it has seen recently (at most ``capacity`` pieces, least recently used dropped)."""

    def __init__(self, tokenizer: Any, *, capacity: int = 16384, marker: str = MARKER) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.marker = marker
        self.hits = self.misses = 0
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()
        self.marker_id = marker_id(tokenizer, marker)
        if self.marker_id is not None:
            try:
                whole = self._whole(_PROBE)
                ok = self.encode(_PROBE) == whole and whole.count(self.marker_id) == _PROBE.count(marker)
            except Exception:  # a tokenizer that cannot encode the probe: tokenize whole
                ok = False
            self._pieces.clear()
            if not ok:
                self.marker_id = None
        if self.marker_id is None:
            log.debug("prompts are tokenized whole: the tokenizer does not cut them at %s", marker)

    @property
    def enabled(self) -> bool:
        """Whether prompts are tokenized piece by piece (False: whole, every time)."""
        return self.marker_id is not None

    def _whole(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, equal to ``tokenizer.encode(text, add_special_tokens=False)``."""
        marker_id = self.marker_id
        if marker_id is None:
            return self._whole(text)
        pieces = self._pieces
        head, *rest = text.split(self.marker)
        ids = list(self._piece(head)) if head else []
        for piece in rest:
            ids.append(marker_id)
            if piece:
                ids.extend(self._piece(piece))
        if len(pieces) > self.capacity:
            for _ in range(len(pieces) - self.capacity):
                pieces.popitem(last=False)
        return ids

    def _piece(self, piece: str) -> list[int]:
        """The ids of one piece (the cached list itself: never change it)."""
        known = self._pieces.get(piece)
        if known is not None:
            self.hits += 1
            self._pieces.move_to_end(piece)
            return known
        self.misses += 1
        ids = self._pieces[piece] = self._whole(piece)
        return ids
