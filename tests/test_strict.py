"""strict.loads and nesting: refused before ``json`` recurses, counted exactly, in linear time.

``json.loads`` recurses once per bracket. A document nested 100 000 deep took it to the recursion
limit, and whatever else ran at that depth (a finalizer during a garbage collection, then the
unraisable hook itself) failed and printed to stderr: a one-line error grew a second line, now and
then. So nesting is counted before ``json`` sees the text, and a document nested deeper than
``MAX_DEPTH`` never reaches it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safelora_cli.io import strict
from safelora_cli.io.strict import MAX_DEPTH

DEEP = b"[" * 100_000 + b"]" * 100_000
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


def nest(depth: int, inner: str = "") -> str:
    """``inner`` inside ``depth`` levels: arrays and objects in turn, so both kinds count."""
    text = inner
    for level in range(depth):
        text = f'{{"k{level}": {text or 0}}}' if level % 2 else f"[{text}]"
    return text


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def refuses_too_deep(doc: str | bytes) -> bool:
    try:
        strict.loads(doc)
    except strict.InvalidJSON as e:
        assert str(e) == TOO_DEEP, e
        return True
    return False


# --- a document nested 100 000 deep ------------------------------------------------------------------


def test_a_document_nested_100_000_deep_is_refused_quickly_and_never_reaches_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("json.loads was called on a document nested too deep")

    monkeypatch.setattr(strict.json, "loads", never)
    for doc in (DEEP, DEEP.decode(), b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 1_000_000):
        start = time.perf_counter()
        with pytest.raises(strict.InvalidJSON, match=TOO_DEEP):
            strict.loads(doc)
        assert time.perf_counter() - start < 1.0


# --- brackets inside strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        '["' + "[" * 1000 + '"]',
        '{"' + "{[" * 1000 + '": "' + "]}" * 1000 + '"}',
        '["a\\"' + "[" * 1000 + '"]',  # an escaped quote does not end the string
        '["\\\\\\"' + "[" * 1000 + '"]',  # an escaped backslash, then an escaped quote
        '["\\"\\"\\"", "' + "{" * 1000 + '\\""]',
        '["\\u005b\\n\\t' + "[" * 1000 + '\\/"]',  # other escapes, and \u005b ([) is a string's character
        nest(MAX_DEPTH, '"' + "[" * 1000 + '"'),
        json.dumps(["[" * 1000, {"]" * 10 + '"' + "{" * 500: '\\"' * 300 + "[" * 70}]),
    ],
)
def test_brackets_inside_strings_do_not_count(doc: str) -> None:
    assert strict.loads(doc) == json.loads(doc)
    assert strict.loads(doc.encode()) == json.loads(doc)


@pytest.mark.parametrize(
    "doc",
    [
        '["\\\\", '
        + "[" * MAX_DEPTH
        + "]" * MAX_DEPTH
        + "]",  # an escaped backslash: the quote after it ends the string
        '["\\\\\\\\", ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "]",
        '["[[[", "]]]", ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "]",
        '{"\\"": ' + nest(MAX_DEPTH) + "}",
    ],
)
def test_brackets_after_a_string_count(doc: str) -> None:
    assert refuses_too_deep(doc)


# --- exactly MAX_DEPTH -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opening", "inner", "closing", "per_level"),
    [
        ("[", "", "]", 1),
        ('{"a":', "1", "}", 1),
        ('[{"a":', "1", "}]", 2),
        ('{"[":[', "", "]}", 2),  # a key that is a bracket does not count
        ('["]", ', "0", "]", 1),
    ],
)
def test_max_depth_passes_and_one_more_is_refused(opening: str, inner: str, closing: str, per_level: int) -> None:
    levels = MAX_DEPTH // per_level
    exact = opening * levels + inner + closing * levels
    assert depth(json.loads(exact)) == MAX_DEPTH
    assert depth(strict.loads(exact)) == MAX_DEPTH
    assert depth(strict.loads(exact.encode())) == MAX_DEPTH
    assert refuses_too_deep("[" + exact + "]")
    assert refuses_too_deep(b"[" + exact.encode() + b"]")
    assert refuses_too_deep('{"x": ' + exact + "}")


def test_max_depth_is_counted_at_the_deepest_point_not_in_total() -> None:
    wide = "[" + ",".join([nest(MAX_DEPTH - 1)] * 500) + "]"
    assert depth(strict.loads(wide)) == MAX_DEPTH
    assert refuses_too_deep("[" + ",".join([nest(MAX_DEPTH - 1)] * 499 + [nest(MAX_DEPTH)]) + "]")


text_with_syntax = st.text(st.sampled_from('"\\[]{}:,a\n\u00e9\U0001f600'), max_size=12) | st.text(
    st.characters(exclude_categories=["Cs"]), max_size=12
)
nested_values = st.recursive(
    st.none() | st.integers(-5, 5) | text_with_syntax,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_with_syntax, inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=500)
@given(value=nested_values, ascii_only=st.booleans())
def test_nesting_is_counted_exactly_whatever_the_strings_hold(value: Any, ascii_only: bool) -> None:
    inner = json.dumps(value, ensure_ascii=ascii_only)
    pad = MAX_DEPTH + 1  # brackets enough that the count is made, not skipped
    assert strict._depth(("[" * pad + inner + "]" * pad).encode()) == pad + depth(value)
    # wrapped to exactly MAX_DEPTH, then one level more: the count is exact, strings never count
    spare = MAX_DEPTH - depth(value)
    text = "[" * spare + inner + "]" * spare
    assert strict.loads(text) == json.loads(text)
    assert refuses_too_deep("[" + text + "]")


def test_hostile_quotes_and_backslashes_take_linear_time() -> None:
    # unterminated strings, runs of escapes and quotes: no quadratic regex, no per-byte Python loop
    docs = [
        '"\\"' * 2_000_000 + "[" * 100,
        '["' + "[" * 3_000_000,
        "\\" * 5_000_000 + "[" * 100,
        '""' * 2_500_000 + "[" * 100,
        ("[" * 5 + '"' + "]" * 5) * 500_000,
    ]
    for doc in docs:
        start = time.perf_counter()
        with pytest.raises(strict.InvalidJSON):
            strict.loads(doc)
        assert time.perf_counter() - start < 2.0, doc[:20]


# --- nothing reaches the unraisable hook -------------------------------------------------------------

# Garbage with a finalizer, collected when the parse is at its deepest: before the nesting was
# counted first, the finalizer hit the recursion limit, and so did the unraisable hook it went to
# ("Exception ignored in sys.unraisablehook" on stderr).
_FINALIZER_AT_DEPTH = textwrap.dedent(
    """
    import gc, sys
    from safelora_cli.io import strict

    calls = []
    sys.unraisablehook = lambda u: calls.append(repr(u.exc_value))

    def down(n):
        return n if n == 0 else down(n - 1)

    class Finalized:
        def __init__(self):
            self.me = self

        def __del__(self):
            down(50)

    limit = sys.getrecursionlimit()
    for threshold in range(max(1, limit - 250), limit + 100, 5):
        gc.collect()
        gc.disable()
        Finalized()
        gc.set_threshold(threshold)
        gc.enable()
        try:
            strict.loads(b"[" * 100_000 + b"]" * 100_000)
        except strict.InvalidJSON as e:
            assert str(e) == "nested deeper than 64 levels", e
        else:
            raise AssertionError("accepted")
    gc.set_threshold(700, 10, 10)
    gc.collect()
    print(len(calls))
    """
)


def test_a_refused_document_sends_nothing_to_the_unraisable_hook() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", _FINALIZER_AT_DEPTH],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip() == "0"
