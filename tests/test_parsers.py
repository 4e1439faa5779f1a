"""The strict parsers: JSON, safetensors headers against the safetensors library, YAML configs.

Every file safelora reads may be an attacker's, and its parsers are the first thing such a file
meets. The safetensors header parser must refuse everything the pinned ``safetensors`` library
refuses (each case below runs both on the same bytes) and a little more: duplicate names, where the
library silently keeps the last entry. The YAML reader refuses what a config never needs.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
import typer
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import Result

from safelora_cli import config
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.cli import app
from safelora_cli.errors import FormatError, SafeLoraError, UsageError
from safelora_cli.io import stfile, strict

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


# --- safetensors headers: the corpus against the safetensors library -----------------------------------


def st(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file, byte for byte: length prefix (the header's, unless given), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def t(dtype: Any, shape: Any, start: Any, end: Any, **extra: Any) -> dict[str, Any]:
    """A tensor entry, any field of any type."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end], **extra}


def f32(start: int, n: int = 1, **extra: Any) -> dict[str, Any]:
    """An F32 vector of ``n`` elements at ``start``."""
    return t("F32", [n], start, start + 4 * n, **extra)


def one(entry: dict[str, Any] | bytes, data: bytes = b"\0" * 4) -> bytes:
    """A file of one tensor ``w``, its entry given as a dict or as raw JSON text."""
    raw = entry if isinstance(entry, bytes) else json.dumps(entry).encode()
    return st(b'{"w": ' + raw + b"}", data)


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def pairs(*items: tuple[str, Any]) -> bytes:
    """A JSON object from key/value pairs, a repeated key kept: what ``json.dumps`` cannot write."""
    return b"{" + b", ".join(json.dumps(k).encode() + b": " + json.dumps(v).encode() for k, v in items) + b"}"


def with_field(value: bytes) -> bytes:
    """A file of one F32 tensor whose entry has an unknown field holding ``value`` (raw JSON)."""
    return one(b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + value + b"}")


# Both refuse. The reference's reason is in the comment where it is not obvious.
REFUSED: dict[str, bytes] = {
    "empty file": b"",
    "shorter than the length prefix": b"\x02\0\0\0\0\0\0",
    "length beyond the file": st(b"{}", length=100),
    "length 2**63": st(b"{}", length=2**63),
    "length u64 max": st(b"{}", length=U64_MAX),
    "length one over the 100 MB limit": st(b"{}", length=100_000_001),
    "header empty": st(b""),
    "header not UTF-8": st(b'{"\xff": 1}'),
    "header a surrogate in UTF-8": st(b'{"\xed\xa0\x80": 1}'),
    "header not JSON": st(b"not json at all"),
    "header single-quoted": st(b"{'w': 1}"),
    "header a list": st(b"[]"),
    "header a number": st(b"1   "),
    "header a string": st(b'"x"'),
    "header null": st(b"null"),
    "header two documents": st(b"{}{}"),
    "header padded with NUL": st(b"{}\0\0\0\0\0\0"),
    "header with a UTF-8 BOM": st(b"\xef\xbb\xbf{}"),
    "control character in a name": st(b'{"w\x01": ' + json.dumps(f32(0)).encode() + b"}", b"\0" * 4),
    "lone surrogate in a name": st(pairs(("\ud800", f32(0))), b"\0" * 4),
    "metadata a list": st({"__metadata__": [], "w": f32(0)}, b"\0" * 4),
    "metadata a string": st({"__metadata__": "pt", "w": f32(0)}, b"\0" * 4),
    "metadata value an integer": st({"__metadata__": {"format": 1}}),
    "metadata value null": st({"__metadata__": {"format": None}}),
    "metadata value a list": st({"__metadata__": {"format": ["pt"]}}),
    "metadata given twice": st(b'{"__metadata__": {"a": "1"}, "__metadata__": {"b": "2"}}'),
    "metadata shaped like a tensor": st({"__metadata__": f32(0)}, b"\0" * 4),
    "tensor entry null": st({"w": None}),
    "tensor entry a list": st({"w": [1, 2]}),
    "tensor entry a string": st({"w": "F32"}),
    "dtype missing": one({"shape": [1], "data_offsets": [0, 4]}),
    "shape missing": one({"dtype": "F32", "data_offsets": [0, 4]}),
    "data_offsets missing": one({"dtype": "F32", "shape": [1]}),
    "dtype unknown": one(t("Q4_K", [1], 0, 4)),
    "dtype lowercase": one(t("f32", [1], 0, 4)),
    "dtype a torch name": one(t("float32", [1], 0, 4)),
    "dtype an integer": one(t(4, [1], 0, 4)),
    "dtype null": one(t(None, [1], 0, 4)),
    "shape negative": one(t("F32", [-1], 0, 4)),
    "shape a float": one(t("F32", [1.0], 0, 4)),
    "shape a bool": one(t("F32", [True], 0, 4)),
    "shape a string": one(t("F32", ["1"], 0, 4)),
    "shape nested": one(t("F32", [[1]], 0, 4)),
    "shape not a list": one(t("F32", 1, 0, 4)),
    "shape minus zero": one(b'{"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}', b""),  # serde: -0.0
    "shape 1e0": one(b'{"dtype": "F32", "shape": [1e0], "data_offsets": [0, 4]}'),
    "shape of 4300 digits": one(b'{"dtype": "U8", "shape": [' + b"9" * 4300 + b'], "data_offsets": [0, 4]}'),
    "shape beyond u64": one(t("U8", [2**64], 0, 4)),  # serde reads it as a float
    "data_offsets of one": one({"dtype": "F32", "shape": [1], "data_offsets": [0]}),
    "data_offsets of three": one({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}),
    "data_offsets negative": one(t("F32", [1], -4, 0)),
    "data_offsets floats": one(t("F32", [1], 0.0, 4.0)),
    "data_offsets minus zero": one(b'{"dtype": "F32", "shape": [1], "data_offsets": [-0, 4]}'),
    "data_offsets end before start": one(t("F32", [0], 4, 0)),
    "data_offsets beyond u64": one(t("F32", [1], 0, 2**64)),
    "data_offsets u64 max": one(t("F32", [1], 0, U64_MAX)),
    "element count overflows u64": st({"w": t("F32", [2**32, 2**32, 0], 0, 0)}),  # though the product is 0
    "element count u64 max": one(t("U8", [U64_MAX], 0, 4)),  # and its bit count overflows
    "bit count overflows u64": st({"w": t("F32", [2**62], 0, 0)}),
    "sub-byte count not whole bytes (F4)": one(t("F4", [3], 0, 1), b"\0"),
    "sub-byte count not whole bytes (F6)": one(t("F6_E3M2", [3], 0, 2), b"\0\0"),
    "byte count too small for dtype and shape": one(t("F32", [2], 0, 4)),
    "byte count too large for dtype and shape": one(t("F16", [1], 0, 4)),
    "data beyond the end of the file": st({"w": f32(0, 2)}, b"\0" * 4),
    "data not starting at byte 0": st({"w": f32(4)}, b"\0" * 8),
    "gap between two tensors": st({"a": f32(0), "b": f32(8)}, b"\0" * 12),
    "bytes after the last tensor": st({"w": f32(0)}, b"\0" * 8),
    "bytes and no tensor": st(b"{}", b"\0" * 8),
    "tensors overlapping": st({"a": f32(0, 2), "b": f32(4, 2)}, b"\0" * 12),
    "tensors on the same bytes": st({"a": f32(0), "b": f32(0)}, b"\0" * 4),
    "NaN in an unknown field": with_field(b"NaN"),
    "Infinity in an unknown field": with_field(b"Infinity"),
    "-Infinity in an unknown field": with_field(b"-Infinity"),
    "1e999 in an unknown field": with_field(b"1e999"),
    "4300 digits in an unknown field": with_field(b"9" * 4300),
    "nested 200 deep in an unknown field": with_field(deep(200)),
    "nested 100000 deep": st(deep(100_000)),
}

# The safetensors library opens these; safelora refuses them. A duplicate name is the attack this
# exists for: the library keeps the last entry, so a tensor read by one tool is not the one another
# tool reads, and a second lora_B silently replaced a trained one.
STRICTER: dict[str, bytes] = {
    "a tensor name twice": st(pairs(("w", f32(0)), ("w", f32(0, 2))), b"\0" * 8),
    "a tensor name twice, the first hidden as an empty tensor": st(
        pairs(("x", f32(0)), ("w", t("F32", [0], 4, 4)), ("w", f32(4))), b"\0" * 8
    ),
    "a metadata key twice": st(b'{"__metadata__": ' + pairs(("format", "pt"), ("format", "np")) + b"}"),
    "an integer beyond u64 in an unknown field": one(f32(0, x=2**64)),
    "an integer below i64 in an unknown field": one(f32(0, x=-(2**63) - 1)),
    "a number literal of 102 characters in an unknown field": with_field(b"1." + b"0" * 100),
    "nested 100 deep in an unknown field": with_field(deep(100)),
    "a duplicate key in an unknown field": with_field(pairs(("a", 1), ("a", 2))),
}

# Both accept, and read the same tensors.
ACCEPTED: dict[str, bytes] = {
    "no tensors": st(b"{}"),
    "no tensors, empty metadata": st({"__metadata__": {}}),
    # mlx's save_safetensors writes this for a file without metadata, as every mlx-lm adapter is.
    "metadata null": st({"__metadata__": None, "w": f32(0)}, b"\0" * 4),
    "padded with spaces to 8 bytes": st(pairs(("w", f32(0))) + b"     ", b"\0" * 4),
    "whitespace before and after": st(b"\n\t " + pairs(("w", f32(0))) + b"\r\n", b"\0" * 4),
    "tensors listed out of offset order": st({"b": f32(4), "a": f32(0), "c": f32(8, 2)}, bytes(range(16))),
    "empty tensors sharing an offset": st(
        {"a": t("F32", [0], 0, 0), "b": t("I8", [0, 9], 0, 0), "c": f32(0)}, b"\0" * 4
    ),
    "an empty tensor of huge dimensions": st({"w": t("F32", [0, 2**32, 2**32], 0, 0)}),
    "a scalar": st({"w": t("F64", [], 0, 8)}, b"\7" * 8),
    "unknown fields in an entry": one(f32(0, x="y", z=[1, 2.5, None, {"q": True}], m=-0.0)),
    "minus zero in an unknown field": with_field(b"-0"),
    "metadata": st({"__metadata__": {"format": "pt", "": "", "k\u00e9": "\u2713"}, "w": f32(0)}, b"\0" * 4),
    "odd names": st({"": f32(0), "a\u0000b": f32(4), "\U0001f600": f32(8), " ": f32(12)}, bytes(range(16))),
    "names as surrogate-pair escapes": st(pairs(("\U0001f600", f32(0))), b"\0" * 4),
    "sub-byte dtypes in whole bytes": st(
        {"a": t("F4", [2, 3], 0, 3), "b": t("F6_E2M3", [4], 3, 6), "c": t("F6_E3M2", [2, 4], 6, 12)}, bytes(range(12))
    ),
}


def reference(blob: bytes, path: Path) -> dict[str, tuple[str, list[int], bytes]] | None:
    """What the safetensors library reads from ``blob``: {name: (dtype, shape, bytes)}, or None when it refuses.

    It is asked twice, through ``safe_open`` on a file and ``deserialize`` on the bytes; the two must agree.
    """
    path.write_bytes(blob)
    try:
        with safe_open(path, "pt") as f:
            opened: list[str] | None = sorted(f.keys())
            f.metadata()
    except Exception:
        opened = None
    try:
        tensors = {k: (v["dtype"], list(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(blob)}
    except Exception:
        assert opened is None, "deserialize refuses what safe_open opens"
        return None
    assert opened == sorted(tensors), "safe_open refuses what deserialize reads"
    return tensors


def ours(blob: bytes) -> stfile.Header:
    return stfile.header_of(io.BytesIO(blob), "x.safetensors", len(blob))


def as_read(header: stfile.Header, blob: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    return {n: (e.dtype, list(e.shape), blob[e.start : e.end]) for n, e in header.tensors.items()}


@pytest.mark.parametrize("name", REFUSED)
def test_what_the_safetensors_library_refuses_is_refused(name: str, tmp_path: Path) -> None:
    blob = REFUSED[name]
    assert reference(blob, tmp_path / "x.safetensors") is None, "the library accepts this case: move it"
    with pytest.raises(FormatError, match=r"^x\.safetensors: "):
        ours(blob)


@pytest.mark.parametrize("name", STRICTER)
def test_what_only_safelora_refuses(name: str, tmp_path: Path) -> None:
    blob = STRICTER[name]
    assert reference(blob, tmp_path / "x.safetensors") is not None, "the library refuses this case: move it"
    with pytest.raises(FormatError, match=r"^x\.safetensors: "):
        ours(blob)


@pytest.mark.parametrize("name", ACCEPTED)
def test_what_both_accept_reads_the_same(name: str, tmp_path: Path) -> None:
    blob = ACCEPTED[name]
    expected = reference(blob, tmp_path / "x.safetensors")
    assert expected is not None
    header = ours(blob)
    assert as_read(header, blob) == expected
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert dict(header.metadata) == (f.metadata() or {})


def test_the_duplicate_name_attack_is_refused_naming_the_tensor() -> None:
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    trained, zeros = f32(0, 4), t("F32", [4, 1], 16, 32)
    blob = st(pairs((b, trained), (b, zeros)), b"\1" * 16 + b"\0" * 16)
    with pytest.raises(FormatError, match=re.escape(f"duplicate key {b!r}")):
        ours(blob)


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (REFUSED["gap between two tensors"], "tensor 'b' starts at byte"),
        (REFUSED["data not starting at byte 0"], "4 bytes before it that no tensor holds"),
        (REFUSED["bytes after the last tensor"], "4 bytes after the last tensor"),
        (REFUSED["element count overflows u64"], "element count overflows"),
        (REFUSED["bit count overflows u64"], "size overflows"),
        (REFUSED["sub-byte count not whole bytes (F4)"], "12 bits, not a whole number of bytes"),
        (REFUSED["metadata value an integer"], "__metadata__ must map strings to strings"),
        (REFUSED["length one over the 100 MB limit"], "over the 100000000 bytes safetensors allows"),
        (REFUSED["data beyond the end of the file"], "beyond the end of the file; the file is truncated"),
        (REFUSED["dtype unknown"], "unsupported dtype 'Q4_K'"),
    ],
)
def test_refusals_say_what_is_wrong(blob: bytes, needle: str) -> None:
    with pytest.raises(FormatError, match=re.escape(needle)):
        ours(blob)


def test_a_hostile_value_in_a_message_is_cut_short() -> None:
    with pytest.raises(FormatError) as refused:
        ours(one(t("F32", [1] * 1_000_000 + [-1], 0, 4)))
    assert len(str(refused.value)) < 300
    with pytest.raises(FormatError) as refused:
        ours(st({"x" * 100_000: None}))
    assert len(str(refused.value)) < 500


def test_the_header_size_limit_is_the_librarys(tmp_path: Path) -> None:
    # Neither reads a header over the limit: the library says so before it looks at the file's size,
    # so a short file tells its limit from ours without writing 100 MB.
    limit = stfile.MAX_HEADER_BYTES
    with pytest.raises(safetensors.SafetensorError, match="invalid header length"):
        safetensors.deserialize(st(b"{}", length=limit))
    with pytest.raises(safetensors.SafetensorError, match="header too large"):
        safetensors.deserialize(st(b"{}", length=limit + 1))
    assert stfile.header_length(struct.pack("<Q", limit), "x", 8 + limit) == limit
    with pytest.raises(FormatError, match="header length"):
        stfile.header_length(struct.pack("<Q", limit + 1), "x", 8 + limit + 1)


# --- dtypes ------------------------------------------------------------------------------------------------


def test_every_dtype_the_library_knows_is_known_with_its_size(tmp_path: Path) -> None:
    with pytest.raises(safetensors.SafetensorError) as refused:
        safetensors.deserialize(one(t("NOPE", [1], 0, 4)))
    listed = re.findall(r"`(\w+)`", str(refused.value).split("expected one of", 1)[1])
    assert listed and set(listed) == set(stfile.DTYPE_BITS)
    for dtype, bits in stfile.DTYPE_BITS.items():
        blob = one(t(dtype, [2, 4], 0, bits), bytes(range(bits)))  # 8 elements: ``bits`` bytes
        assert reference(blob, tmp_path / "x.safetensors") == as_read(ours(blob), blob)
        wrong = one(t(dtype, [2, 4], 0, bits + 1), bytes(bits + 1))
        assert reference(wrong, tmp_path / "x.safetensors") is None
        with pytest.raises(FormatError):
            ours(wrong)


def test_compute_dtypes_are_the_floating_point_ones_safe_lora_runs_on() -> None:
    assert {"F16", "BF16", "F32", "F64"} == stfile.COMPUTE_DTYPES
    assert all(stfile.DTYPES[d].is_floating_point for d in stfile.COMPUTE_DTYPES)
    # float8, complex, integer and sub-byte types parse, and only pass through
    assert {"F8_E4M3", "F8_E8M0", "C64", "U32", "I64", "BOOL", "F4", "F6_E2M3"} <= set(stfile.DTYPE_BITS)
    assert not {"F8_E4M3", "F8_E8M0", "C64", "U32", "I64", "BOOL", "F4", "F6_E2M3"} & stfile.COMPUTE_DTYPES


def test_a_dtype_torch_cannot_hold_is_a_one_line_error_when_read() -> None:
    header = ours(ACCEPTED["sub-byte dtypes in whole bytes"])
    for name in ("a", "b", "c"):
        with pytest.raises(FormatError, match=rf"^tensor '{name}' is F[46]\w*, which torch .* cannot read"):
            header.tensors[name].torch_dtype  # noqa: B018 (the property is what is tested)
    assert ours(one(t("U32", [1], 0, 4))).tensors["w"].torch_dtype == torch.uint32


def storage_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())


def test_files_saved_by_safetensors_torch_read_as_the_library_reads_them(tmp_path: Path) -> None:
    """Every torch dtype safetensors saves, empty tensors and scalars, with metadata."""
    tensors = {}
    for i, dtype in enumerate(stfile.DTYPE_NAMES):
        raw = (torch.arange(i, i + 6 * dtype.itemsize) % (2 if dtype == torch.bool else 256)).to(torch.uint8)
        tensors[f"t.{dtype}"] = raw.view(dtype).reshape(2, 3)
        tensors[f"empty.{dtype}"] = torch.empty(0, 3, dtype=dtype)
        tensors[f"scalar.{dtype}"] = raw[: dtype.itemsize].clone().view(dtype).reshape(())
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    blob = path.read_bytes()
    header = ours(blob)
    assert dict(header.metadata) == {"format": "pt", "note": "x"}
    with safe_open(path, "pt") as f:
        assert sorted(header.tensors) == sorted(f.keys())
        for name, entry in header.tensors.items():
            loaded = f.get_tensor(name)
            assert (entry.dtype, list(entry.shape)) == (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape())
            assert entry.torch_dtype == loaded.dtype
            assert blob[entry.start : entry.end] == storage_bytes(loaded)
    assert reference(blob, path) == as_read(header, blob)


def test_what_peft_and_transformers_write_reads_as_the_library_reads_it(
    llama_adapter: Path, llama_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    files = [llama_adapter / ADAPTER_FILE, *llama_pair[0].glob("*.safetensors"), *llama_pair[1].glob("*.safetensors")]
    assert len(files) > 3
    for path in files:
        blob = path.read_bytes()
        assert reference(blob, tmp_path / "copy.safetensors") == as_read(ours(blob), blob)


def test_tensors_of_every_other_dtype_pass_through_a_projection_bit_for_bit(
    cli: Cli, adapter_dir: Path, llama_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """An adapter may carry tensors Safe LoRA does not compute on (a uint32 index, packed F4/F6
    weights, complex buffers): they parse, and are copied through byte for byte."""
    file = adapter_dir / ADAPTER_FILE
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    extra = {
        "extra.u32": ("U32", [3], bytes(range(12))),
        "extra.f6": ("F6_E2M3", [4], b"\xaa\xbb\xcc"),
        "extra.f4": ("F4", [2], b"\x5a"),
        "extra.c64": ("C64", [1], bytes(range(8))),
        "extra.e8m0": ("F8_E8M0", [2], b"\x7f\x80"),
    }
    for name, (dtype, shape, raw) in extra.items():
        header[name] = t(dtype, shape, len(body), len(body) + len(raw))
        body += raw
    file.write_bytes(st(header, body))
    base, aligned = llama_pair
    out = tmp_path / "out"
    result = cli("project", "--adapter", adapter_dir, "--base", base, "--aligned", aligned, "--output", out, "--quiet")
    assert result.exit_code == 0, result.output
    written = (out / ADAPTER_FILE).read_bytes()
    entries = ours(written).tensors
    assert {k: (entries[k].dtype, written[entries[k].start : entries[k].end]) for k in extra} == {
        k: (dtype, raw) for k, (dtype, _, raw) in extra.items()
    }


# --- YAML configs ------------------------------------------------------------------------------------------

KNOWN = ["adapter", "base", "aligned", "threshold", "num_layers", "force", "as_json", "json", "dry_run"]


def load(text: str) -> dict[str, Any]:
    return config.load_options(text, "sanitize.yaml", KNOWN)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threshold: 0.3\nbase: x\nthreshold: 0.4\n", "sanitize.yaml:3: duplicate key 'threshold' (first on line 1)"),
        ("num-layers: 1\nnum_layers: 2\n", "sanitize.yaml:2: num_layers repeats an option given above"),
        ("base: {a: 1, a: 2}\n", "sanitize.yaml:1: duplicate key 'a'"),
        ("base: &b x\naligned: *b\n", "sanitize.yaml:1: anchor &b: a config holds no anchors or aliases"),
        ("base: *b\n", "sanitize.yaml:1: alias *b"),
        ("threshold: !!float 0.5\n", "sanitize.yaml:1: tag !!float: a config holds plain values"),
        ("base: !!binary aGVsbG8=\n", "tag !!binary"),
        ("base: !!python/object:os.system x\n", "tag !!python/object:os.system"),
        ("adapter: !!set {a, b}\n", "tag !!set"),
        ("base: ! x\n", "tag !"),
        ("\n\n<<: {threshold: 0.5}\n", "sanitize.yaml:3: merge key <<"),
        ("base: " + "[" * 9 + "]" * 9, "sanitize.yaml:1: nested deeper than 8 levels"),
        ("base: " + "[" * 100_000, "nested deeper than 8 levels"),
        ("num_layers: " + "9" * 4300, "sanitize.yaml:1: integer of 4300 characters"),
        ("num_layers: 18446744073709551616\n", "integer 18446744073709551616 out of range"),
        ("num_layers: -9223372036854775809\n", "out of range"),
        ("num_layers: 0x1_0000_0000_0000_0000\n", "out of range"),
        ("num_layers: 0b_\n", "sanitize.yaml:1: 0b_ is not an integer"),
        ("threshold: .nan\n", "sanitize.yaml:1: .nan: an option value must be a finite number"),
        ("threshold: .inf\n", ".inf: an option value must be a finite number"),
        ("threshold: -.Inf\n", "-.Inf: an option value must be a finite number"),
        ("threshold: 1.0e+999\n", "1.0e+999: an option value must be a finite number"),
        ("threshold: 0.5\n\nbase: [unclosed\n", "sanitize.yaml:4: not valid YAML"),
        ("threshold: 0.5\nbase: 'x\n", "sanitize.yaml:3: not valid YAML"),
        ("threshold: 0.5\nbase: a\x00b\n", "sanitize.yaml:2: not valid YAML (unacceptable character #x0000"),
        ("threshold: 0.5\n---\nbase: x\n", "sanitize.yaml:2: not valid YAML (but found another document)"),
        ("? [a]\n: 1\n", "sanitize.yaml:1: a key must be an option name"),
        ("- threshold\n", "sanitize.yaml: expected a mapping of option names to values"),
        ("1: 2\n", "expected a mapping of option names to values"),
        ("num_layer: 3\n", "sanitize.yaml:1: unknown key num_layer (did you mean num_layers?)"),
        ("num-layer: 3\n", "unknown key num-layer (did you mean num-layers?)"),
        ("threshold: 1\nthresold: 1\nzzz: 2\n", "sanitize.yaml:2: unknown key thresold (did you mean threshold?); "
         "sanitize.yaml:3: unknown key zzz; known keys: adapter, aligned"),
    ],
)  # fmt: skip
def test_config_refusals_name_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        load(text)
    assert "\n" not in str(refused.value)


def test_an_alias_bomb_is_refused_at_its_first_anchor() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    with pytest.raises(UsageError, match=r"sanitize\.yaml:1: anchor &a0"):
        load("\n".join(lines))


def test_config_values_are_plain_values() -> None:
    assert load("") == {} and load("# only a comment\n") == {}
    assert load("base: 2024-01-31\naligned: 2001-13-45 25:61:00\n") == {
        "base": "2024-01-31",
        "aligned": "2001-13-45 25:61:00",
    }
    assert load("num_layers: 18446744073709551615\nthreshold: -1.0e-3\n") == {
        "num_layers": 2**64 - 1,
        "threshold": -0.001,
    }
    assert load("num-layers: 0x10\nforce: yes\ndry_run: ~\n") == {"num_layers": 16, "force": True, "dry_run": None}
    assert load("adapter: [a, 'b c']\nbase: '=' \naligned: <<\n") == {
        "adapter": ["a", "b c"],
        "base": "=",
        "aligned": "<<",
    }
    assert load("\ufeffbase: x\n") == {"base": "x"}
    assert load("adapter: [[[[[[x]]]]]]\n") == {"adapter": [[[[[["x"]]]]]]}  # 8 levels with the mapping
    # a wrong type is no parse error: the option's own parsing refuses it
    assert load("threshold: [1, 2]\nbase: {a: 1}\n") == {"threshold": [1, 2], "base": {"a": 1}}


def test_unknown_keys_far_from_any_known_one_get_no_suggestion() -> None:
    with pytest.raises(UsageError) as refused:
        load("zzz: 1\n")
    assert "did you mean" not in str(refused.value)


def test_a_config_file_is_read_as_a_small_regular_utf8_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("num-layers: 3\n")
    assert config.located_file(good, KNOWN) == ({"num_layers": 3}, {"num_layers": 1})
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"threshold: 0.5\nbase: caf\xe9\n")
    with pytest.raises(UsageError, match=re.escape(f"{bad}:2: not UTF-8 (byte 24)")):
        config.located_file(bad, KNOWN)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * config.MAX_BYTES + b"\n")
    # a file that cannot be read as a config is an input error (exit 1), not a usage one
    for path, message in ((big, "more than the 1048576"), (tmp_path, "is a directory"), (tmp_path / "x", "No such")):
        with pytest.raises(SafeLoraError, match=message) as refused:
            config.located_file(path, KNOWN)
        assert refused.value.exit_code == 1


# --- a bad value names the file, the line and the key ------------------------------------------------------


def project_value_check() -> config.ValueCheck:
    """What ``--config`` can pass as ``check``: each value through the option's own parsing."""
    project = typer.main.get_command(app).commands["project"]  # type: ignore[attr-defined]
    ctx = typer.Context(project)
    params = {opt[2:].replace("-", "_"): p for p in project.params for opt in p.opts if opt.startswith("--")}

    def check(key: str, value: Any) -> str | None:
        param = params[key]
        try:
            param.process_value(ctx, [value] if param.multiple and not isinstance(value, list) else value)
        except typer.BadParameter as e:
            return str(e.message)
        return None

    return check


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: x\nnum_layers: abc\n", "sanitize.yaml:2: num_layers: Input should be a valid integer"),
        ("threshold: 3\n", "sanitize.yaml:1: threshold: Input should be less than or equal to 1"),
        ("base: x\n\nnum-layers: [1, 2]\n", "sanitize.yaml:3: num_layers: Input should be a valid integer"),
        ("dry-run: maybe\n", "sanitize.yaml:1: dry_run: Input should be a valid boolean"),
    ],
)
def test_a_bad_value_names_the_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        config.load_options(text, "sanitize.yaml", KNOWN, project_value_check())
    assert config.load_options("num_layers: 3\nthreshold: 0.5\n", "c.yaml", KNOWN, project_value_check())


# --- the CLI: exit 2, one line, no traceback ---------------------------------------------------------------


def refused_config(cli: Cli, tmp_path: Path, text: str) -> str:
    path = tmp_path / "sanitize.yaml"
    path.write_text(text)
    result = cli("project", "--config", path, "--adapter", tmp_path / "none")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("num_layer: 3\n", ":1: unknown key num_layer (did you mean num_layers?)"),
        ("threshold: 0.5\nthreshold: 0.6\n", ":2: duplicate key 'threshold'"),
        ("base: &x a\naligned: *x\n", ":1: anchor &x"),
        ("threshold: .nan\n", ":1: .nan"),
        ("num_layers: " + "1" * 4300 + "\n", ":1: integer of 4300 characters"),
        ("base: x\nthreshold: [unclosed\n", ":3: not valid YAML"),
    ],
)
def test_config_errors_are_one_line_usage_errors(cli: Cli, tmp_path: Path, text: str, needle: str) -> None:
    assert f"sanitize.yaml{needle}" in refused_config(cli, tmp_path, text)


WEIRD = ["[1, 2]", "{a: 1}", "~", "yes", "1.5", "-3", "''", "[[1]]", "[{a: 1}]", "2024-01-31", "abc", "0x10"]


@pytest.mark.parametrize("value", WEIRD)
def test_a_wrong_type_for_any_option_never_crashes(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "" and relative names resolve here
    keys = {opt[2:].replace("-", "_") for opt in _project_options()}
    for key in sorted(keys - {"config", "preset"}):
        path = tmp_path / "c.yaml"
        path.write_text(f"{key}: {value}\n")
        given = {"adapter": tmp_path / "none", "base": tmp_path / "base", "aligned": tmp_path / "aligned"}
        args = [a for k, v in given.items() if k != key for a in (f"--{k}", v)]
        result = cli("project", "--config", path, *args, "--dry-run")  # an exception here fails the test
        assert result.exit_code in (1, 2), (key, value, result.output)
        assert "Traceback" not in result.output


def _project_options() -> list[str]:
    project = typer.main.get_command(app).commands["project"]  # type: ignore[attr-defined]
    return [opt for p in project.params for opt in p.opts if opt.startswith("--")]


def test_a_fifo_as_config_is_one_line_and_no_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "safelora_cli", "project", "--config", str(fifo), "--adapter", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {fifo}: is a FIFO, not a regular file; give --config a YAML file of option names and values"
    ]
