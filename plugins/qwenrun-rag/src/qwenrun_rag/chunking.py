"""Chunking for qwenrun-rag: split a text into paragraph-aligned chunks with line numbers."""

import bisect
import re

__all__ = ["chunk_text"]

# Where a window over a long paragraph may be cut (after the character) or an overlap begin.
_BREAKS = (" ", "\n", "\t", "。", "！", "？", "；", "，", ".", "!", "?", ";", ",")


def chunk_text(text: str, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Split ``text`` into (start, end, first line, last line) chunks of at most ``size`` chars.

    Paragraphs (separated by blank lines) are packed together while they fit; a paragraph
    longer than ``size`` is cut into windows, at a space or punctuation where possible, each
    starting ``overlap`` characters before the previous one ended.
    """
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for start, end in _paragraphs(text):
        if end - start > size:
            if current:
                spans.append(current)
                current = None
            spans.extend(_windows(text, start, end, size, overlap))
        elif current and end - current[0] <= size:
            current = (current[0], end)
        else:
            if current:
                spans.append(current)
            current = (start, end)
    if current:
        spans.append(current)
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [
        (start, end, bisect.bisect_left(newlines, start) + 1, bisect.bisect_left(newlines, end - 1) + 1)
        for start, end in spans
    ]


def _paragraphs(text: str) -> list[tuple[int, int]]:
    bounds = [0, *(i for m in re.finditer(r"\n\s*\n", text) for i in m.span()), len(text)]
    spans = (_trim(text, a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True))
    return [span for span in spans if span]


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _windows(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    while True:
        stop = min(start + size, end)
        if stop < end:  # cut after the last break in the second half of the window, if any
            cut = max(text.rfind(b, start + size // 2, stop) for b in _BREAKS)
            stop = cut + 1 if cut > 0 else stop
        span = _trim(text, start, stop)
        if span:
            windows.append(span)
        if stop >= end:
            return windows
        start = max(stop - overlap, start + (size - overlap) // 2)
        breaks = [i for i in (text.find(b, start, stop - 1) for b in _BREAKS) if i != -1]
        if breaks:  # begin the overlap at a word (or clause), not in the middle of one
            start = min(breaks) + 1
