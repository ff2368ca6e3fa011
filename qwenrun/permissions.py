"""Permission rules: the agent file's ``permissions: {deny: [...], ask: [...], allow: [...]}``.

A rule is a string ``name(key="glob", ...)`` (or a bare ``name``): ``name`` is a glob over the tool
names the model sees (``write_file``, ``mcp_*``, ``*``), each ``key="glob"`` a condition on one
argument (a JSON string literal, so ``\\"`` and ``\\u00e9`` work). It is read by a small tokenizer,
never evaluated. Every tool call (plugin, MCP, built-in toolset, sub-agent) passes
:meth:`Permissions.decide` before it runs: a matching ``deny`` rule wins over ``ask``, ``ask`` over
``allow``; when no rule matches, the tool's own ``approval`` decides (today's behaviour). A tool's
``approval: deny`` is never lifted by an ``allow`` rule.

The model writes the arguments, so a rule reads them the way an attacker would hope it does not:

* a value is matched in each of its spellings: as written; NFKC-folded with invisible format
  characters taken out; percent-decoded (up to three times); for a path argument (``path``,
  ``file``, ``dir``, ... and names ending in ``_path``/``_file``/``_dir``) also with ``\\`` as
  ``/``, ``.`` and ``..`` resolved, and as its real path (symlinks followed), both relative to the
  agent file's folder when inside it;
* ``deny`` and ``ask`` rules *restrict*: they match when **any** spelling matches, ignoring case,
  and when the argument they name is missing (or not a string or list of strings);
* ``allow`` rules *grant*: they match only when **every** spelling matches exactly (case counts),
  no spelling holds an invisible format character, no path has a ``..`` component, the ``*``
  and ``?`` of the glob never stand for a shell metacharacter (``; & | $ ` < > ( )``) or a
  control character (write one literally to allow it), and the call has no argument its tool's
  schema does not declare;
* argument keys compare after NFKC and case folding, so ``Path`` or ``ｐａｔｈ`` is ``path`` too.

In a glob, ``*`` and ``?`` stand for any characters (within one path component for path
arguments, where ``**`` crosses ``/``), ``[abc]`` for one of a set. Names match ignoring case.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from qwenrun.approval import Approval

__all__ = ["RULE_KINDS", "Permissions", "Rule", "RuleKind", "Verdict", "parse_rule"]

RuleKind = Literal["deny", "ask", "allow"]
RULE_KINDS: tuple[RuleKind, ...] = ("deny", "ask", "allow")  # strongest first
_MODE: dict[RuleKind, Approval] = {"deny": "deny", "ask": "ask", "allow": "auto"}

_PATH_KEYS = frozenset(("path", "paths", "file", "files", "filename", "filepath", "dir", "directory",
                        "folder", "cwd", "root", "src", "dst", "source", "destination", "target"))
_META = ";&|$`<>()"  # what an allow glob's wildcards never stand for (nor control characters)
_NAME = re.compile(r"[A-Za-z0-9_.*?\[\]!\-]+")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_SPACE = re.compile(r"\s*")


def parse_rule(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``name(key="glob", ...)`` -> (the name glob, the (key, glob) pairs); a ValueError names
    what was expected and the column (1-based) where it was not found."""
    pos = 0

    def fail(expected: str) -> ValueError:
        return ValueError(f"rule {text!r}: expected {expected} at column {pos + 1}")

    def skip() -> None:
        nonlocal pos
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # \s* always matches

    def take(pattern: re.Pattern[str], expected: str) -> str:
        nonlocal pos
        found = pattern.match(text, pos)
        if found is None:
            raise fail(expected)
        pos = found.end()
        return found.group()

    skip()
    name = take(_NAME, "a tool name or glob (letters, digits, _ . - * ? [ ])")
    arguments: dict[str, str] = {}
    skip()
    if pos < len(text) and text[pos] == "(":
        pos += 1
        skip()
        while pos < len(text) and text[pos] != ")":
            key_at = pos
            key = take(_KEY, "an argument name")
            if key in arguments:
                pos = key_at
                raise fail(f"a new argument name ({key!r} is given twice)")
            skip()
            if text[pos : pos + 1] != "=":
                raise fail("'='")
            pos += 1
            skip()
            arguments[key] = json.loads(take(_STRING, 'a double-quoted string ("...")'))
            skip()
            if text[pos : pos + 1] == ",":
                pos += 1
                skip()
            elif text[pos : pos + 1] != ")":
                raise fail("',' or ')'")
        if pos >= len(text):
            raise fail("')'")
        pos += 1
        skip()
    if pos != len(text):
        raise fail("the end of the rule" if "(" in text[:pos] else "'(' or the end of the rule")
    for pattern in (name, *arguments.values()):
        try:
            _glob(pattern, path=False, grant=False)  # an unbalanced [ is refused here, not at a call
        except ValueError as exc:
            raise ValueError(f"rule {text!r}: {exc}") from None
    return name, tuple(arguments.items())


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of ``permissions:``; ``where`` says where it is (``permissions.deny[0]``)."""

    kind: RuleKind
    text: str
    where: str
    name: str = field(init=False)
    arguments: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        name, arguments = parse_rule(self.text)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "arguments", arguments)

    def matches(self, name: str, arguments: Mapping[str, Any], undeclared: Sequence[str], base: Path) -> bool:
        """Whether the call ``name(arguments)`` is one this rule is about (see the module's notes)."""
        grant = self.kind == "allow"
        if not _glob(self.name, path=False, grant=False).fullmatch(_fold(name)):
            return False
        if grant and (undeclared or len({_key(key) for key in arguments}) != len(arguments)):
            return False
        for key, pattern in self.arguments:
            path = _is_path_key(key)
            glob = _glob(pattern, path=path, grant=grant)
            given = [value for got, value in arguments.items() if _key(got) == _key(key)]
            spellings = [s for value in given for s in _spellings(value, path, base)]
            if grant:
                unsafe = any(s is None or s != _visible(s) or (path and _climbs(s)) for s in spellings)
                if not spellings or unsafe or not all(glob.fullmatch(s) for s in spellings if s is not None):
                    return False
            elif (
                spellings
                and None not in spellings
                and not any(glob.fullmatch(s) for s in spellings if s is not None)
            ):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Verdict:
    """What happens to a call: its approval mode, and the rule that decided it (None: the tool's
    own ``approval``)."""

    mode: Approval
    rule: Rule | None = None

    def reason(self) -> str | None:
        """The rule as the model and the person read it: ``permissions.deny[0]: write_file(...)``."""
        return None if self.rule is None else f"{self.rule.where}: {self.rule.text}"

    def record(self) -> dict[str, Any]:
        """The decision as the session records it."""
        rule = None if self.rule is None else {"kind": self.rule.kind, "rule": self.rule.text,
                                               "where": self.rule.where}  # fmt: skip
        return {"mode": self.mode, "rule": rule}


class Permissions:
    """The rules of an agent file, strongest kind first, and the one decision every call passes."""

    def __init__(self, rules: Sequence[Rule] = (), base: Path | None = None) -> None:
        order = {kind: number for number, kind in enumerate(RULE_KINDS)}
        self.rules = sorted(rules, key=lambda rule: order[rule.kind])  # stable: file order within a kind
        self.base = base if base is not None else Path.cwd()

    def decide(
        self, name: str, arguments: Mapping[str, Any], *, default: Approval, undeclared: Sequence[str] = ()
    ) -> Verdict:
        """The verdict on ``name(arguments)``: the first matching rule of the strongest kind, else
        the tool's own ``default`` approval (``undeclared``: the keys its schema does not know)."""
        for rule in self.rules:
            if rule.matches(name, arguments, undeclared, self.base):
                if default == "deny":  # a tool's `approval: deny` is never lifted
                    return Verdict("deny", rule if rule.kind == "deny" else None)
                return Verdict(_MODE[rule.kind], rule)
        return Verdict(default)


def _fold(text: str) -> str:
    return _visible(unicodedata.normalize("NFKC", text)).casefold()


def _key(key: str) -> str:
    return _fold(key).replace("-", "_")


def _visible(text: str) -> str:
    return "".join(char for char in text if unicodedata.category(char) != "Cf")


def _is_path_key(key: str) -> bool:
    key = _key(key)
    return key in _PATH_KEYS or key.endswith(("_path", "_file", "_dir", "_folder"))


def _spellings(value: Any, path: bool, base: Path) -> list[str | None]:
    """Every spelling of one argument value; None for a value no glob can judge (a mapping, a
    number inside a list, ...): restricting rules then match, granting ones do not."""
    if isinstance(value, list):
        return [
            s for item in value for s in (_spellings(item, path, base) if isinstance(item, str) else [None])
        ]
    if not isinstance(value, str):
        return [None]
    forms = {value, _visible(unicodedata.normalize("NFKC", value))}
    for form in list(forms):
        for _ in range(3):
            decoded = unquote(form)
            if decoded == form:
                break
            forms.add(form := _visible(unicodedata.normalize("NFKC", decoded)))
    if path:
        forms |= {spelling for form in forms for spelling in _path_forms(form, base)}
    return [form for form in sorted(forms)]


def _path_forms(value: str, base: Path) -> list[str]:
    """The lexical and the real spelling of a path, relative to ``base`` when inside it."""
    if "\x00" in value:
        return []
    lexical = posixpath.normpath(value.replace("\\", "/")) if value else value
    root = os.path.realpath(base)
    joined = os.path.join(root, lexical)
    forms = [_relative(os.path.normpath(joined), root) if os.path.isabs(lexical) else lexical]
    with contextlib.suppress(OSError, ValueError):  # a loop of symlinks, an over-long name
        forms.append(_relative(os.path.realpath(joined), root))
    return forms


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root) if path == root or path.startswith(root.rstrip("/") + "/") else path


def _climbs(path: str) -> bool:
    return ".." in path.replace("\\", "/").split("/")


_CACHE: dict[tuple[str, bool, bool], re.Pattern[str]] = {}


def _glob(pattern: str, *, path: bool, grant: bool) -> re.Pattern[str]:
    """The regex of a glob: see the module's notes for ``*``, ``**``, ``?`` and ``[...]``."""
    key = (pattern, path, grant)
    if key in _CACHE:
        return _CACHE[key]
    banned = ("/" if path else "") + (re.escape(_META) + r"\x00-\x1f\x7f" if grant else "")
    one = f"[^{banned}]" if banned else "."
    cross = "[^" + (re.escape(_META) + r"\x00-\x1f\x7f") + "]" if grant else "."
    out, i = [], 0
    pattern = unicodedata.normalize("NFKC", pattern)
    while i < len(pattern):
        char = pattern[i]
        if char == "*" and pattern[i : i + 2] == "**":
            i += 2
            if path and pattern[i : i + 1] == "/":
                out.append(f"(?:{cross}*/)?")
                i += 1
            else:
                out.append(f"{cross}*")
            continue
        if char == "*":
            out.append(f"{one}*")
        elif char == "?":
            out.append(one)
        elif char == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "^", "]") else i + 1)
            if end < 0:
                raise ValueError(f"glob {pattern!r}: '[' at column {i + 1} has no ']'")
            body = pattern[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = re.sub(r"([\\\]\[^])", r"\\\1", body[1:] if negate else body)
            out.append(f"[{'^' if negate else ''}{banned if negate else ''}{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    flags = re.DOTALL | (0 if grant else re.IGNORECASE)
    compiled = _CACHE[key] = re.compile("".join(out), flags)
    return compiled
