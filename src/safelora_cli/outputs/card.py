"""The model card: a "Safe LoRA" section in the adapter's README.md, and the ``safelora`` tag.

The section sits between two marker lines, ``<!-- safelora:begin … -->`` and
``<!-- safelora:end -->``; a rerun replaces it where it is, so it is never duplicated, and every
byte outside it is kept. Markers count only as whole lines outside fenced code blocks (a card that
documents safelora may show them in an example); a card with more than one section, or a marker
without its pair, is refused rather than guessed at. The tag is added to the front matter's
``tags`` by editing the text (a block list, a one-line flow list, a missing ``tags`` key, or no
front matter at all), never by a YAML round trip that would rewrite the rest. The begin marker
records what safelora added (``added=…``), so ``without_section`` takes out exactly that and a
``safelora`` tag the author put there survives.

README.md is the adapter author's file, so it is read and written like the adapter's other files:
through the directory's descriptor, never through a link, only when it is a regular file of sane
size, and replaced atomically only if it is still the file that was read.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .._version import __version__
from ..errors import AdapterError
from ..io import atomic, ranges, safefs
from ..results import Report
from .markdown import code, counts_text, md, settings_text, similarity_text, source_text

CARD_FILE = "README.md"
CARD_LIMIT = 4 << 20  # model cards are kilobytes; a larger README.md is not one
TAG = "safelora"
END = "<!-- safelora:end -->"

# What safelora added besides the section, as the begin marker records it:
#   file          README.md itself (front matter, tag and section)
#   front-matter  the whole front matter block (the card had none)
#   tags-key      a ``tags:`` key holding the tag
#   tag-item      a ``- safelora`` item at the end of a block list
#   tag-flow      ``safelora`` at the end of a one-line flow list
_ADDED = ("file", "front-matter", "tags-key", "tag-item", "tag-flow")
_BEGIN = re.compile(r"<!-- safelora:begin(?: added=(?P<added>[a-z-]+))?(?: digest=(?P<digest>[0-9a-f]{1,128}))? -->")
_FENCE = re.compile(r" {0,3}(?P<run>`{3,}|~{3,})(?P<info>.*)")
_TAGS_KEY = re.compile(r"""(?:tags|"tags"|'tags')[ \t]*:(?P<rest>.*)""")
_ITEM = re.compile(r"(?P<indent>[ \t]*)-(?:[ \t]+(?P<value>.*))?")
_FLOW = re.compile(r"[ \t]*\[(?P<inner>[^\[\]{}\n]*)\][ \t]*(?:#.*)?")


def begin_marker(added: str | None = None, digest: str | None = None) -> str:
    fields = "".join(f" {k}={v}" for k, v in (("added", added), ("digest", digest)) if v is not None)
    return f"<!-- safelora:begin{fields} -->"


def card_section(report: Report, digest: str | None = None) -> str:
    """The card's "Safe LoRA" section for a run, markers included: the tool version, the pair, the
    settings, the counts and the projected modules; with ``digest``, the begin marker names the
    stamp digest of the adapter it describes, so a section left beside other weights is known to
    be stale."""
    lines = [
        begin_marker(None, digest),
        "",
        "## Safe LoRA",
        "",
        f"Checked with safelora {md(__version__)} (Safe LoRA, Hsu et al., NeurIPS 2024): the lora_B of each "
        "module whose update looks unlike the alignment update V = W_aligned − W_base was projected onto "
        "the subspace of V.",
        "",
        f"- **Base:** {source_text(report.base)}",
        f"- **Aligned:** {source_text(report.aligned)}",
        f"- **Settings:** {settings_text(report)}",
        f"- **Result:** {counts_text(report)}" + (" (dry run: the adapter was not changed)" if report.dry_run else ""),
        "",
    ]
    projected = [layer for layer in report.layers if layer.projected]
    if projected:
        lines += ["| projected module | layer | similarity | ‖CB‖/‖B‖ |", "| --- | ---: | ---: | ---: |"]
        for layer in projected:
            ratio = "—" if layer.norm_ratio is None else f"{layer.norm_ratio:.4f}"
            cell = "" if layer.layer is None else str(layer.layer)
            lines.append(f"| {code(layer.module)} | {cell} | {similarity_text(layer)} | {ratio} |")
    else:
        lines.append("No module was projected: every update was kept as trained.")
    lines += ["", END, ""]
    return "\n".join(lines)


def _split(text: str) -> list[str]:
    """Lines with their ends; only ``\\n`` ends a line (``str.splitlines`` would also split on
    form feeds and U+2028, which Markdown does not)."""
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _bare(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def _eol(text: str) -> str:
    first = text.find("\n")
    return "\r\n" if first > 0 and text[first - 1] == "\r" else "\n"


@dataclass(frozen=True)
class _Front:
    """The front matter's opening and closing ``---`` lines."""

    open: int
    close: int


def _front_matter(lines: list[str]) -> _Front | None:
    """Where the front matter is, as the Hub finds it: ``---`` as the first line that is not blank or
    whitespace only, up to the next ``---`` line. None when there is none."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or _bare(lines[first]).strip() != "---" or not lines[first].endswith("\n"):
        return None
    close = next((i for i in range(first + 1, len(lines)) if _bare(lines[i]).rstrip() == "---"), None)
    return None if close is None else _Front(first, close)


@dataclass(frozen=True)
class _Found:
    """The one section of a card: its begin and end lines, what safelora added, the digest it names."""

    begin: int
    end: int
    added: str | None
    digest: str | None


def markers(
    lines: list[str], begin: re.Pattern[str], end: str, start: int = 0
) -> tuple[list[tuple[int, re.Match[str]]], list[int], str | None]:
    """A section's markers in a card from line ``start`` on, outside code blocks (a marker shown as
    code in a card is no marker): each begin marker ``begin`` matches (line, match), the lines that
    are the ``end`` marker, and the fence of a code block left open at the end (None if none)."""
    begins: list[tuple[int, re.Match[str]]] = []
    ends: list[int] = []
    fence: str | None = None
    for i in range(start, len(lines)):
        bare = _bare(lines[i])
        m = _FENCE.fullmatch(bare)
        if fence is not None:
            if m and m["run"][0] == fence[0] and len(m["run"]) >= len(fence) and not m["info"].strip():
                fence = None
            continue
        if m and not (m["run"][0] == "`" and "`" in m["info"]):
            fence = m["run"]
            continue
        b = begin.fullmatch(bare.rstrip())
        if b:
            begins.append((i, b))
        elif bare.rstrip() == end:
            ends.append(i)
    return begins, ends, fence


def _section(lines: list[str], start: int, where: object, *, appending: bool = False) -> _Found | None:
    """The one section after ``start``; None if none.

    ``appending``: a section is about to be appended, which a code block left open at the end of
    the card would swallow (it would render as code, and a rerun would not find it): refused.
    """
    found, ends, fence = markers(lines, _BEGIN, END, start)
    begins = [(i, b["added"] if b["added"] in _ADDED else None, b["digest"]) for i, b in found]
    if fence is not None and appending and not begins and not ends:
        raise AdapterError(f"{where}: ends inside an unclosed {fence} code block; close it and run again")
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0][0]:
        raise AdapterError(
            f"{where}: {len(begins)} '<!-- safelora:begin -->' and {len(ends)} '{END}' markers, not one "
            "section; keep one pair (or none) and run again"
        )
    return _Found(begins[0][0], ends[0], begins[0][1], begins[0][2])


@dataclass(frozen=True)
class _Tags:
    """The front matter's top-level ``tags``: its form (``block``, ``flow`` or ``other``), its line,
    and for a block list the lines of its items and the last line that belongs to it."""

    form: str
    line: int
    items: list[int]
    last: int


def _tags(lines: list[str], front: _Front) -> _Tags | None:
    close = front.close
    for i in range(front.open + 1, close):
        m = _TAGS_KEY.fullmatch(_bare(lines[i]))
        if m is None:
            continue
        rest = m["rest"].strip()
        if _FLOW.fullmatch(m["rest"]):
            return _Tags("flow", i, [], i)
        if rest and not rest.startswith("#"):
            return _Tags("other", i, [], i)
        items: list[int] = []
        last = i
        indent: str | None = None
        for j in range(i + 1, close):
            bare = _bare(lines[j])
            if not bare.strip() or bare.lstrip().startswith("#"):
                continue
            item = _ITEM.fullmatch(bare)
            if indent is None:
                if item is None:
                    break
                indent = item["indent"]
            if item is not None and item["indent"] == indent:
                items.append(j)
            elif len(bare) - len(bare.lstrip()) <= len(indent):
                break  # the next key: the list ended
            last = j  # an item, or a more indented continuation of one
        return _Tags("block", i, items, last)
    return None


def _item_value(line: str) -> str | None:
    item = _ITEM.fullmatch(_bare(line))
    return None if item is None else _unquote(item["value"] or "")


def _unquote(value: str) -> str:
    value = re.sub(r"[ \t]+#.*", "", value).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _flow_parts(line: str) -> tuple[str, int, int] | None:
    """A one-line flow list's key line: (line without its end, index of ``[``, index of ``]``)."""
    bare = _bare(line)
    key = _TAGS_KEY.fullmatch(bare)
    if key is None or _FLOW.fullmatch(key["rest"]) is None:
        return None
    open_ = bare.index("[", key.start("rest"))
    return bare, open_, bare.index("]", open_)


def _has_tag(lines: list[str], tags: _Tags) -> bool:
    if tags.form == "flow":
        parts = _flow_parts(lines[tags.line])
        return parts is not None and TAG in (_unquote(v) for v in parts[0][parts[1] + 1 : parts[2]].split(","))
    return any(_item_value(lines[j]) == TAG for j in tags.items)


def _add_tag(lines: list[str], front: _Front, eol: str) -> str | None:
    """Add the tag to the front matter in ``lines``; what was added, or None when the tag is there
    already or ``tags`` has a form this does not edit (a multi-line flow list, a scalar, an anchor)."""
    tags = _tags(lines, front)
    if tags is None:
        lines[front.close : front.close] = [f"tags:{eol}", f"- {TAG}{eol}"]
        return "tags-key"
    if tags.form == "other" or _has_tag(lines, tags):
        return None
    parts = _flow_parts(lines[tags.line])
    if parts is not None:
        bare, open_, shut = parts
        inner = bare[open_ + 1 : shut]
        at = open_ + 1 + len(inner.rstrip())
        end = lines[tags.line][len(bare) :]
        lines[tags.line] = bare[:at] + (f", {TAG}" if inner.strip() else TAG) + bare[at:] + end
        return "tag-flow"
    first = _ITEM.fullmatch(_bare(lines[tags.items[0]])) if tags.items else None
    indent = first["indent"] if first is not None else ""
    lines.insert(tags.last + 1, f"{indent}- {TAG}{eol}")
    return "tag-item"


def _remove_tag(lines: list[str], added: str) -> None:
    """Take out the tag (and the key or front matter) that the section's marker says safelora added."""
    front = _front_matter(lines)
    tags = None if front is None else _tags(lines, front)
    if front is None or tags is None:
        return
    parts = _flow_parts(lines[tags.line]) if tags.form == "flow" else None
    if parts is not None:
        bare = parts[0]
        new = re.sub(rf", {TAG}(?=[ \t]*\])", "", bare, count=1)
        if new == bare:
            new = re.sub(rf"(?<=\[)([ \t]*){TAG}(?=[ \t]*\])", r"\1", bare, count=1)
        lines[tags.line] = new + lines[tags.line][len(bare) :]
        return
    ours = [j for j in tags.items if _bare(lines[j]).strip() == f"- {TAG}"]
    if not ours:
        return
    del lines[ours[-1]]
    if added in ("tags-key", "front-matter", "file") and len(tags.items) == 1 and _bare(lines[tags.line]) == "tags:":
        del lines[tags.line]
        if added in ("front-matter", "file") and tags.line == front.open + 1 and _bare(lines[tags.line]) == "---":
            del lines[front.open : front.open + 2]


def with_section(text: str | None, section: str, *, where: object = CARD_FILE) -> str:
    """``text`` (a card, or None when there is none) with ``section`` in it and the ``safelora`` tag.

    An existing section is replaced where it is; otherwise the section is appended after a line
    break. A card without front matter gets ``---``/``tags:``/``- safelora``/``---`` in front, as
    Hugging Face model cards have it. Line ends follow the card's (CRLF stays CRLF). Everything
    else is kept byte for byte. Raises ``AdapterError`` (naming ``where``) for a card with more
    than one section or a marker without its pair.
    """
    body = _split(section)
    first = _BEGIN.fullmatch(_bare(body[0])) if body else None
    if first is None or first["added"] is not None or _bare(body[-1]) != END:
        raise ValueError("section must come from card_section")
    digest = first["digest"]
    if text is None:
        return f"---\ntags:\n- {TAG}\n---\n\n" + section.replace(body[0], begin_marker("file", digest) + "\n", 1)
    eol = _eol(text)
    lines = _split(text)
    front = _front_matter(lines)
    found = _section(lines, 0 if front is None else front.close + 1, where, appending=True)
    section_lines = [line.removesuffix("\n") + eol for line in body]
    # The section first: the front matter edits below only insert lines above it.
    if found is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += eol
        else:
            lines.append(eol)
        at, previous = len(lines), None
        lines += section_lines
    else:
        at, previous = found.begin, found.added
        lines[at : found.end + 1] = section_lines
    before = len(lines)
    added: str | None
    if front is None:
        lines[0:0] = ["---" + eol, "tags:" + eol, f"- {TAG}" + eol, "---" + eol]
        added = "front-matter"
    else:
        tags = _tags(lines, front)
        if tags is not None and tags.form != "other" and _has_tag(lines, tags):
            added = previous  # a tag this section's marker says safelora added stays safelora's
        else:
            added = _add_tag(lines, front, eol)
    lines[at + len(lines) - before] = begin_marker(added, digest) + eol
    return "".join(lines)


def without_section(text: str, *, where: object = CARD_FILE) -> str | None:
    """``text`` without the section and without what the section's marker says safelora added.

    For a card safelora edited and nobody touched since, this gives back the original bytes; for
    one it created, None (there was no card). A card without a section comes back as it is.
    """
    lines = _split(text)
    front = _front_matter(lines)
    found = _section(lines, 0 if front is None else front.close + 1, where)
    if found is None:
        return text
    begin, end, added = found.begin, found.end, found.added
    at_end = end == len(lines) - 1
    del lines[begin : end + 1]
    if at_end and begin > 0:
        eol = "\r\n" if lines[begin - 1].endswith("\r\n") else "\n"
        lines[begin - 1] = lines[begin - 1].removesuffix(eol)
        if not lines[begin - 1]:
            del lines[begin - 1]
    if added is not None:
        _remove_tag(lines, added)
    result = "".join(lines)
    return None if added == "file" and not result else result


def section_digest(text: str, *, where: object = CARD_FILE) -> tuple[bool, str | None]:
    """Whether ``text`` has a section, and the stamp digest it names (None for one that names none)."""
    lines = _split(text)
    front = _front_matter(lines)
    found = _section(lines, 0 if front is None else front.close + 1, where)
    return found is not None, None if found is None else found.digest


def refresh_card(directory: safefs.Directory, report: Report, digest: str, *, asked: bool) -> None:
    """Keep ``README.md`` in ``directory`` describing the adapter there, whose stamp digest is ``digest``.

    ``asked`` (``model_card``): the card is created or updated with the run's section and the tag
    (a report with no modules, from a no-op whose stamp predates the record of its modules, leaves
    it as it is). Otherwise a section that names another digest (or none) is refreshed from
    ``report`` when the adapter has projected modules, and taken out (with what safelora added) when
    it has none or the report cannot say; a card without a section, or with this adapter's, is left
    as it is, and so is one that is not a card safelora could have written (a link, not a regular
    file, not UTF-8 text, too large). Raises ``AdapterError``.
    """
    where = directory.path / CARD_FILE
    if not asked:
        try:
            _read(directory)
        except AdapterError:
            return

    def change(text: str | None) -> str | None:
        if asked and report.layers:
            return with_section(text, card_section(report, digest), where=where)
        if text is None:
            return None
        found, named = section_digest(text, where=where)
        if not found or named == digest:
            return text
        if report.projected_count:
            return with_section(text, card_section(report, digest), where=where)
        return without_section(text, where=where)

    _edit(directory, change)


def remove_card_section(directory: safefs.Directory) -> None:
    """Take the section, and what safelora added with it, out of ``README.md`` in ``directory``;
    the card goes away if safelora created it. No card, or no section: nothing changes."""
    _edit(directory, lambda text: None if text is None else without_section(text, where=directory.path / CARD_FILE))


def _edit(directory: safefs.Directory, change: Callable[[str | None], str | None]) -> None:
    where = directory.path / CARD_FILE
    atomic.clean_stale(directory, prefix=f".{CARD_FILE}{atomic.TMP_MARK}")
    text, st = _read(directory)
    new = change(text)
    if new == text:
        return
    if new is not None:
        if st is None and directory.lstat(CARD_FILE) is not None:
            raise AdapterError(f"{where}: appeared while safelora was running; nothing was written. Run again")
        mode = 0o644 if st is None else stat.S_IMODE(st.st_mode)
        atomic.replace(directory, CARD_FILE, [new.encode()], mode, expect=st)
        return
    now = directory.lstat(CARD_FILE)
    if st is None or now is None or not atomic.same_file(now, st):
        raise AdapterError(f"{where}: changed on disk while safelora was running; nothing was removed. Run again")
    try:
        os.unlink(CARD_FILE, dir_fd=directory.fd)
        ranges.fsync(directory.fd)
    except OSError as e:
        raise AdapterError(safefs.os_error(where, e)) from None


_CARD_FIX = "replace it with a regular file, or write the adapter to another output directory"


def _read(directory: safefs.Directory) -> tuple[str | None, os.stat_result | None]:
    """The card's text and the stat of the file read; (None, None) when there is no card."""
    where = directory.path / CARD_FILE
    st = directory.lstat(CARD_FILE)
    if st is None:
        return None, None
    if stat.S_ISLNK(st.st_mode):
        raise AdapterError(f"{where}: is a symbolic link, and safelora never writes through one; {_CARD_FIX}")
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{where}: is {safefs.kind(st.st_mode)}, not a regular file; {_CARD_FIX}")
    data, st = directory.read_small(CARD_FILE, CARD_LIMIT, fix=_CARD_FIX, follow=False)
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError as e:
        raise AdapterError(f"{where}: not UTF-8 text (byte {e.start}); save the card as UTF-8") from None


def edit_card(directory: safefs.Directory, change: Callable[[str | None], str | None]) -> None:
    """Replace the card in ``directory`` with ``change(text)`` (``text`` None: no card; a result of
    None removes it), by the rules above: never through a link, atomically, only if unchanged since read."""
    _edit(directory, change)
