"""Strict JSON: what safelora accepts from files it did not write.

Python's ``json`` takes the last of duplicate keys (so a second ``lora_B`` entry silently replaces
the first), parses 4300-digit integers until its own ValueError, accepts ``NaN`` and ``Infinity``
and recurses as deep as the stack allows. Here duplicate keys, integers outside
[-2**63, 2**64), non-finite numbers and nesting deeper than ``MAX_DEPTH`` are refused.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64
_INT_MIN, _INT_MAX = -(2**63), 2**64
_MAX_INT_DIGITS = 20  # 2**64 has 20 digits: longer literals are refused before int() sees them


class InvalidJSON(ValueError):
    """The document is not strict JSON; the message says why, in a few words."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSON(f"duplicate key {key!r}")
        out[key] = value
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise InvalidJSON(f"integer of {len(text)} digits")
    value = int(text)
    if not _INT_MIN <= value < _INT_MAX:
        raise InvalidJSON(f"integer {value} out of range")
    return value


def _float(text: str) -> float:
    if len(text) > 64:
        raise InvalidJSON(f"number literal of {len(text)} characters")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidJSON(f"number {text} overflows")
    return value


def _constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not JSON")


def _depth(doc: Any) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def loads(raw: bytes | str) -> Any:
    """Parse strict JSON (UTF-8 when bytes); raises ``InvalidJSON`` with a short reason."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        doc = json.loads(text, object_pairs_hook=_pairs, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except InvalidJSON:
        raise
    except UnicodeDecodeError:
        raise InvalidJSON("not UTF-8") from None
    except RecursionError:
        raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise InvalidJSON(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise InvalidJSON(str(e).splitlines()[0][:120]) from None
    if _depth(doc) > MAX_DEPTH:
        raise InvalidJSON(f"nested deeper than {MAX_DEPTH} levels")
    return doc
