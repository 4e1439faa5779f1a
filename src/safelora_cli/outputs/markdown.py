"""Markdown for attacker-controlled text, and the phrases the step summary and the model card share.

Module names, paths, source labels, notes and error messages are attacker-controlled: in Markdown
they are written as text with every ASCII character that Markdown, GFM tables or HTML give a
meaning to (``|``, backticks, ``<``, ``&``, brackets, ``*``, ``\\``…) replaced by a character
reference, after control and bidi characters are made visible (``text.printable``). So a name can
change neither a table's columns, nor the fence, nor the HTML around it, and it never contains the
text ``-->``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from ..results import LayerResult, Report, SourceInfo, finite
from .text import printable

_MD_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,/:@=+-")
# ``_`` between letters or digits can neither open nor close emphasis: it stays, so that
# ``self_attn.q_proj`` reads as itself in the Markdown source too.
_INTRAWORD = re.compile(r"(?<=[A-Za-z0-9])_+(?=[A-Za-z0-9])")
_CLIP = 200  # characters of a name or message shown; the JSON report has them whole


def clip(text: str, limit: int = _CLIP) -> str:
    """``text`` when short; else its start and end around ``…``, so a hostile name cannot bloat a summary."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return text[:half] + "…" + text[-half:]


def md(value: object) -> str:
    """``value`` as inert Markdown text: printable, clipped, with every ASCII character outside
    ``[A-Za-z0-9 .,/:@=+-]`` (and ``_`` inside a word) written as a numeric character reference
    (``|`` → ``&#124;``)."""
    text = clip(printable(value))
    keep = {i for m in _INTRAWORD.finditer(text) for i in range(m.start(), m.end())}
    return "".join(c if c in _MD_PLAIN or ord(c) > 0x7F or i in keep else f"&#{ord(c)};" for i, c in enumerate(text))


def code(value: object) -> str:
    """``value`` escaped by ``md`` and shown monospaced (an HTML ``<code>`` element)."""
    return f"<code>{md(value)}</code>"


def number(x: float) -> str:
    """A finite float in positional notation, digit for digit its shortest repr (1e-05 → 0.00001):
    Mermaid takes no exponents, and ``float(number(x)) == x``."""
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {x}")
    return format(Decimal(repr(x)), "f")


def similarity_text(layer: LayerResult) -> str:
    """The similarity as the table shows it: 5 decimals (the precision decisions use), or why it is undefined."""
    sim = finite(layer.similarity)
    if sim is None:
        return "— (" + md(layer.reason) + ")" if layer.reason else "—"
    return f"{sim:.5f}"


def source_text(info: SourceInfo) -> str:
    """A checkpoint as the summary and the card name it, with nothing of this machine: a Hub repo and
    its commit, or a local directory's base name and its content digest (no path, no file stat)."""
    name = info.name or info.source
    if info.revision:
        return f"{code(name)} at commit {code(info.revision)}"
    if info.content:
        return f"{code(name)}, content {code('blake3:' + info.content[:16])}"
    return code(name)


def settings_text(report: Report) -> str:
    """Mode and τ (or k and the τ_k it implied), as one line of Markdown."""
    tau = finite(report.threshold)
    tau_text = "—" if tau is None else number(tau)
    if report.mode == "number":
        return f"number mode: the {report.num_layers} least similar modules, τ_k = {tau_text}"
    return f"threshold mode: similarity ≤ τ = {tau_text} is projected"


def counts_text(report: Report) -> str:
    """How many modules were projected and kept, and how many had no similarity, in Markdown."""
    defined = sum(1 for layer in report.layers if finite(layer.similarity) is not None)
    kept = defined - report.projected_count
    undefined = len(report.layers) - defined
    text = f"**{report.projected_count} of {len(report.layers)}** modules projected, {kept} kept"
    if undefined:
        text += f", {undefined} with an undefined similarity (never projected)"
    ratio = finite(report.median_norm_ratio)
    if ratio is not None:
        text += f"; median ‖CB‖/‖B‖ of the projected modules {ratio:.4f}"
    return text
