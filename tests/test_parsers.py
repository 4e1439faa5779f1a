"""The strict parsers: JSON.

Every file safelora reads may be an attacker's, and its parsers are the first thing such a file
meets.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

import pytest
from typer.testing import Result

from safelora_cli import strict

Cli = Callable[..., Result]
U64_MAX = 2**64 - 1

# --- strict JSON -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": {"b": [{"c": 1, "c": 1}]}}', "duplicate key 'c'"),
        ('[{"x": null}, {"y": 1, "y": 1}]', "duplicate key 'y'"),
        ("9" * 4300, "integer of 4300 digits"),
        ("-" + "9" * 4300, "integer of 4300 digits"),
        (str(2**64), "out of range"),
        (str(-(2**63) - 1), "out of range"),
        ("NaN", "NaN is not JSON"),
        ('{"x": Infinity}', "Infinity is not JSON"),
        ("[-Infinity]", "-Infinity is not JSON"),
        ("1e999", "overflows"),
        ("-1e999", "overflows"),
        ("1." + "0" * 100, "number literal of 102 characters"),
        ("[" * 65 + "]" * 65, "nested deeper than 64 levels"),
        ('{"a":' * 65 + "1" + "}" * 65, "nested deeper than 64 levels"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
        ('"\\ud800"', "lone UTF-16 surrogate"),
        ('{"\\udc00x": 1}', "lone UTF-16 surrogate"),
        ('["\ud800"]', "lone UTF-16 surrogate"),  # given as str, the surrogate itself rather than its escape
        (b'{"a": "\xff"}', "not UTF-8 (byte 7)"),
        (b"\xed\xa0\x80", "not UTF-8"),  # a surrogate encoded in UTF-8 (CESU-8)
        (b"\xef\xbb\xbf{}", "BOM"),
        ("", "Expecting value at line 1 column 1"),
        ("{}{}", "Extra data"),
        ("{'a': 1}", "Expecting property name"),
        ('{"a": "\x01"}', "Invalid control character"),
    ],
)
def test_strict_json_refuses(doc: str | bytes, reason: str) -> None:
    with pytest.raises(strict.InvalidJSON, match=re.escape(reason)):
        strict.loads(doc)


def test_strict_json_takes_what_json_takes_at_the_edges() -> None:
    assert strict.loads(str(U64_MAX)) == U64_MAX
    assert strict.loads(str(-(2**63))) == -(2**63)
    assert strict.loads("[" * 64 + "]" * 64) is not None
    assert strict.loads("1e-999") == 0.0
    assert strict.loads('"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character
    assert strict.loads('"a\\u0000b"') == "a\x00b"
    assert strict.loads('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then text
    assert strict.loads(" \t\r\n{}\n  ") == {}
    assert issubclass(strict.InvalidJSON, ValueError)


def test_strict_json_reads_minus_zero_as_a_float_like_serde_json() -> None:
    # so that a field that must hold a non-negative integer (a shape, an offset) refuses it
    value = strict.loads("-0")
    assert type(value) is float and math.copysign(1.0, value) == -1.0
    assert type(strict.loads("0")) is int


ORDINARY = [
    {
        "alpha_pattern": {},
        "base_model_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "r": 8,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
        "layers_to_transform": None,
        "megatron_config": None,
        "revision": "✓ unicode",
    },
    {"metadata": {"total_size": 13476839424}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}},
    {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, U64_MAX]}},
    [1, -2, 3.5, -0.25, 1e300, "x", True, None, [], {}],
]


@pytest.mark.parametrize("doc", ORDINARY)
def test_strict_json_parses_ordinary_documents_as_json_does(doc: object) -> None:
    for text in (json.dumps(doc), json.dumps(doc, indent=2, ensure_ascii=False)):
        assert strict.loads(text) == json.loads(text) == doc
        assert strict.loads(text.encode()) == doc
