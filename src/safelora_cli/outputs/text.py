"""Strings from files, paths, servers and users, made safe to print.

Tensor names, paths, config values, provenance and server messages are data: they are printed
as they are, never as Rich markup (``[red]`` stays literal), and with every control character
(newlines included) and every bidirectional-text override escaped, so an error stays on one line
and reads as what it is (``\\u202e`` cannot reverse the rest of the line).
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the Unicode formatting characters that reorder or hide text:
# bidi marks, embeddings, overrides and isolates, line/paragraph separators, zero-width joiners.
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    code = ord(m[0])
    return _SHORT.get(m[0]) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: object) -> str:
    """``str(value)`` with control and bidi characters written as escapes (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return _UNPRINTABLE.sub(_escape, str(value))
