"""Strict JSON: what safelora accepts from files it did not write.

Python's ``json`` takes the last of duplicate keys (so a second ``lora_B`` entry silently replaces
the first), parses 4300-digit integers until its own ValueError, accepts ``NaN`` and ``Infinity``,
returns lone UTF-16 surrogates (``"\\ud800"``) as strings that cannot be written back as UTF-8, and
recurses as deep as the stack allows. Here duplicate keys, integers outside [-2**63, 2**64),
non-finite numbers, lone surrogates and nesting deeper than ``MAX_DEPTH`` are refused, the nesting
before ``json`` sees the text: a parse that ends in RecursionError can break whatever else runs at
that depth (a finalizer, the unraisable hook), so the parser never goes past ``MAX_DEPTH`` levels.

``-0`` is read as the float ``-0.0``, as serde_json (the parser behind the safetensors library)
reads it, so that a field that must hold a non-negative integer refuses it the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

MAX_DEPTH = 64
_INT_MIN, _INT_MAX = -(2**63), 2**64
_MAX_INT_DIGITS = 20  # 2**64 has 20 digits: longer literals are refused before int() sees them
_MAX_FLOAT_CHARS = 64  # every writer's shortest round-trip form of a double is under 30
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# The escapes that can hide a quote, or the backslash before one, matched left to right as json
# reads them; any other escape (\n, \u0041) holds no quote or bracket.
_ESCAPE = re.compile(rb'\\[\\"]')
# The bytes that can matter to nesting: quotes (where strings start and end) and brackets.
_NOT_SYNTAX = bytes(sorted(set(range(256)) - set(b'"[]{}')))
# A string literal once escapes and every other byte are gone: from its quote to the closing one
# or, unterminated, to the end (so that no match restarts inside it: one linear pass).
_STRING = re.compile(rb'"[^"]*(?:"|\Z)')
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


class InvalidJSON(ValueError):
    """The document is not strict JSON; the message says why, in a few words."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidJSON(f"duplicate key {_short(key)}")
            seen.add(key)
    return out


def _int(text: str) -> int | float:
    if len(text) < 19 and text != "-0":  # the common case, always in range
        return int(text)
    if text == "-0":
        return -0.0
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise InvalidJSON(f"integer of {len(text.lstrip('-'))} digits")
    value = int(text)
    if not _INT_MIN <= value < _INT_MAX:
        raise InvalidJSON(f"integer {value} out of range")
    return value


def _float(text: str) -> float:
    if len(text) > _MAX_FLOAT_CHARS:
        raise InvalidJSON(f"number literal of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidJSON(f"number {text} overflows")
    return value


def _constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not JSON")


def _short(text: str) -> str:
    """A string for a message: quoted, escaped, and cut to a readable length."""
    return repr(text) if len(text) <= 80 else f"{text[:77]!r}…"


def _depth(raw: bytes) -> int:
    """How deep ``json.loads`` nests on ``raw`` (UTF-8), counted in a few linear passes, without recursion.

    0 when there are too few brackets to nest deeper than ``MAX_DEPTH``. Otherwise, for JSON, the
    exact depth; for anything else at least the depth ``json`` reaches before its first error, where
    it stops. Multi-byte UTF-8 sequences hold no ASCII bytes, so bytes will do.
    """
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)
    skeleton = raw.translate(None, _NOT_SYNTAX)  # quotes and brackets
    if skeleton.count(b"[") + skeleton.count(b"{") <= MAX_DEPTH:
        return 0  # cannot nest deeper: most documents end here
    # Dropping two adjacent quotes (an empty string, or the end of one string and the start of the
    # next) leaves every other byte inside or outside a string as it was, so that only the strings
    # holding brackets are left for the regex.
    skeleton = skeleton.replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = _STRING.sub(b"", skeleton)
    return max(accumulate(map(_STEP.__getitem__, skeleton)), default=0)


def _strings(doc: Any) -> Iterator[str]:
    """Every key and string value in the document."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def loads(raw: bytes | str) -> Any:
    """Parse strict JSON (UTF-8 when bytes); raises ``InvalidJSON`` with a short reason."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if _depth(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")) > MAX_DEPTH:
            raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels")
        doc = json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except InvalidJSON:
        raise
    except UnicodeDecodeError as e:
        raise InvalidJSON(f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    # A pair of surrogate escapes is one character by now, so any surrogate left is a lone one. It
    # comes from a \uXXXX escape (UTF-8 cannot carry one) or from ``raw`` given as str: strings are
    # searched only when the text holds either.
    if _SURROGATE_ESCAPE.search(text) or _SURROGATE.search(text):
        lone = next((s for s in _strings(doc) if _SURROGATE.search(s)), None)
        if lone is not None:
            raise InvalidJSON(f"lone UTF-16 surrogate in string {_short(lone)}")
    return doc
