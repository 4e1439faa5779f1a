"""The files ``eval`` reads: prompt sets (plain text, JSON Lines or CSV), refusal markers and the
utility text. Each is read whole through ``io.safefs`` (a regular file of bounded size), decoded as
UTF-8, and named in results by its sha256, so a number can be traced to the exact file.

The project ships no third-party prompt set. AdvBench (``goal``), JailbreakBench (``Goal``) and
HarmBench (``Behavior``, with ``ContextString`` for its contextual behaviours) are read as their
users download them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalInputError
from ..io import safefs, strict

FILE_LIMIT = 64 << 20  # prompt sets are kilobytes to a few megabytes
COLUMNS = ("prompt", "goal", "Goal", "Behavior")
CONTEXT_COLUMN = "ContextString"  # HarmBench's contextual behaviours: the context comes first
CONTEXT_JOIN = "\n\n---\n\n"  # as HarmBench's own prompts join context and behaviour


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one file, in file order, with what identifies the file."""

    name: str  # harmful, benign
    path: Path
    sha256: str
    column: str | None  # the column read (None for plain text)
    prompts: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "set": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "column": self.column,
            "count": len(self.prompts),
        }


@dataclass(frozen=True)
class TextFile:
    """A file read whole: its text and its sha256."""

    path: Path
    sha256: str
    text: str


def read_text(path: Path, option: str) -> TextFile:
    """A UTF-8 file (a byte-order mark dropped), refused in one line naming ``option`` when missing,
    not a regular file, too large, not UTF-8, or empty."""
    where = f"{option} {path}"
    try:
        raw, _ = safefs.read_small(path, EvalInputError, FILE_LIMIT, where=where, fix="pass a UTF-8 text file")
    except EvalInputError as e:
        raise EvalInputError(str(e), option=option) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{where}: not UTF-8 text (byte {e.start}); save it as UTF-8", option=option) from None
    if not text.strip():
        raise EvalInputError(f"{where}: is empty; pass a file with at least one line", option=option)
    return TextFile(path, hashlib.sha256(raw).hexdigest(), text)


def _fail(where: str, problem: str, option: str) -> EvalInputError:
    return EvalInputError(f"{where}: {problem}", option=option)


def read_prompts(path: Path, name: str, option: str, column: str | None = None) -> PromptSet:
    """The prompts of ``path``: JSON Lines (``.jsonl``), CSV (``.csv``), else one prompt a line.

    For JSON Lines and CSV the prompt is ``column``, else the first of ``prompt``, ``goal``,
    ``Goal``, ``Behavior`` the file has; a non-empty ``ContextString`` is put before it. Blank
    lines are skipped; a row without the prompt, or with an empty one, is refused with its line."""
    file = read_text(path, option)
    where = f"{option} {path}"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        chosen, prompts = _jsonl(file.text, where, option, column)
    elif suffix == ".csv":
        chosen, prompts = _csv(file.text, where, option, column)
    else:
        chosen, prompts = None, [line.strip() for line in file.text.splitlines() if line.strip()]
    if not prompts:
        raise _fail(where, "holds no prompt; pass a file with at least one", option)
    return PromptSet(name, path, file.sha256, chosen, tuple(prompts))


def _pick(columns: list[str], where: str, option: str, column: str | None) -> str:
    if column is not None:
        if column not in columns:
            raise _fail(where, f"has no column {column!r} (it has {', '.join(map(repr, columns))})", option)
        return column
    for candidate in COLUMNS:
        if candidate in columns:
            return candidate
    raise _fail(
        where,
        f"has none of the prompt columns {', '.join(COLUMNS)} (it has {', '.join(map(repr, columns)) or 'none'}); "
        "name the column to read",
        option,
    )


def _with_context(row: dict[str, object], chosen: str, where: str, option: str) -> str:
    value = row.get(chosen)
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{chosen!r} is missing, empty or not text", option)
    context = row.get(CONTEXT_COLUMN)
    if isinstance(context, str) and context.strip():
        return context.strip() + CONTEXT_JOIN + value.strip()
    return value.strip()


def _jsonl(text: str, where: str, option: str, column: str | None) -> tuple[str, list[str]]:
    rows: list[tuple[int, dict[str, object]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = strict.loads(line)
        except strict.InvalidJSON as e:
            raise _fail(f"{where} line {number}", f"not JSON ({e})", option) from None
        if not isinstance(doc, dict):
            raise _fail(f"{where} line {number}", "not a JSON object; each line holds one prompt's object", option)
        rows.append((number, doc))
    if not rows:
        raise _fail(where, "holds no JSON object; pass a file with at least one prompt", option)
    chosen = _pick(list(rows[0][1]), where, option, column)
    return chosen, [_with_context(doc, chosen, f"{where} line {n}", option) for n, doc in rows]


def _csv(text: str, where: str, option: str, column: str | None) -> tuple[str, list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise _fail(where, "has no header row", option)
        if len(set(header)) != len(header):
            raise _fail(where, "names a column twice in its header; which one to read is ambiguous", option)
        chosen = _pick(header, where, option, column)
        prompts = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            row: dict[str, object] = dict(zip(header, values, strict=False))
            prompts.append(_with_context(row, chosen, f"{where} line {reader.line_num}", option))
    except csv.Error as e:
        raise _fail(f"{where} line {reader.line_num}", f"not CSV ({e})", option) from None
    return chosen, prompts
