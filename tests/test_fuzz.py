"""Fuzzing the parsers that read what users and other tools wrote: only the tool's own errors escape.

Strict JSON, the safetensors header parser, the adapter config and key parser (through
``adapter.opened``) and the YAML option loader get arbitrary and almost-valid input from hypothesis.
Whatever they are given, they return a result or raise a ``SafeLoraError`` (``InvalidJSON`` for
strict JSON), which the CLI turns into one line and exit 1 or 2. Almost-valid safetensors files
are also read by the safetensors library: both refuse the same ones and read the rest alike.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

from safelora_cli import config
from safelora_cli.adapters import opened
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import FormatError, SafeLoraError
from safelora_cli.io import stfile, strict

FUZZ = settings(max_examples=200, deadline=None)


@contextmanager
def only_our_errors() -> Iterator[None]:
    with suppress(SafeLoraError):
        yield


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# --- strict JSON -------------------------------------------------------------------------------------------

json_tokens = st.sampled_from(
    [
        "{", "}", "[", "]", ",", ":", " ", "\n", '"', "\\", '"a"', '"a"', '"\\ud800"', '"\\ud83d\\ude00"', "\\u00",
        "0", "1", "-", "-0", "1.5", "1e999", "-1e999", "1e-999", ".", "e", "9" * 25, "18446744073709551616",
        "NaN", "Infinity", "-Infinity", "true", "false", "null", "\ufeff", "\x00", "\udcff",
    ]
)  # fmt: skip
json_soup = st.lists(json_tokens, max_size=24).map("".join)


@FUZZ
@given(raw=json_soup | json_soup.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=60) | st.text())
def test_strict_json_raises_only_invalid_json(raw: str | bytes) -> None:
    with suppress(strict.InvalidJSON):
        strict.loads(raw)


plain_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)  # no lone surrogates
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | plain_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(plain_text, inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(value=plain_values, indent=st.none() | st.integers(0, 2), ascii_only=st.booleans())
def test_strict_json_reads_what_json_writes(value: Any, indent: int | None, ascii_only: bool) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    assert strict.loads(text) == json.loads(text) == value


# --- safetensors headers -----------------------------------------------------------------------------------

small_ints = st.integers(-3, 300) | st.sampled_from([0, 1, 2**31, 2**63, -(2**63)])
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*stfile.DTYPE_BITS, "Q4", "f32", ""]) | json_values,
        "shape": st.lists(small_ints | json_scalars, max_size=3) | json_values,
        "data_offsets": st.lists(small_ints, min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.text(max_size=10) | st.just("__metadata__"),
    entries | json_values,
    max_size=5,
).map(lambda d: json.dumps(d).encode())


@FUZZ
@given(raw=headers | st.binary(max_size=200), data_size=st.integers(0, 2000))
def test_header_parser_raises_only_format_errors(raw: bytes, data_size: int) -> None:
    file_size = 8 + len(raw) + data_size
    with only_our_errors():
        header = stfile.parse_header(raw, "fuzz.safetensors", file_size)
        # what it accepts, it accepts whole: every tensor inside the file, none overlapping another
        spans = sorted((e.start, e.end) for e in header.tensors.values())
        assert all(8 + len(raw) <= start <= end <= file_size for start, end in spans)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@FUZZ
@given(prefix=st.binary(max_size=12), file_size=st.none() | st.integers(0, 2**64))
def test_header_length_raises_only_format_errors(prefix: bytes, file_size: int | None) -> None:
    with only_our_errors():
        n = stfile.header_length(prefix, "fuzz.safetensors", file_size)
        assert 0 <= n <= stfile.MAX_HEADER_BYTES


@st.composite
def almost_valid_files(draw: st.DrawFn) -> bytes:
    """A safetensors file as a writer would lay it out, now and then a byte off: a gap, an overlap, a
    wrong size, an unknown dtype, a metadata value that is no string, bytes missing or left over."""
    off = st.sampled_from([0, 0, 0, 0, 0, 0, 1, -1])
    entries, end = [], 0
    for name in draw(st.lists(st.text(max_size=5), max_size=4, unique=True)):
        dtype = draw(st.sampled_from([*stfile.DTYPE_BITS, "Q4"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        start = max(0, end + draw(off))
        size = math.prod(shape) * stfile.DTYPE_BITS.get(dtype, 8) // 8
        end = start + size + draw(off)
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}))
    header = dict(draw(st.permutations(entries)))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers(), max_size=2))
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 7))
    return struct.pack("<Q", len(raw)) + raw + bytes(max(0, end + draw(off)))


@FUZZ
@given(blob=almost_valid_files())
def test_header_parser_refuses_what_the_safetensors_library_refuses(blob: bytes) -> None:
    try:
        expected = {k: (v["dtype"], list(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(blob)}
    except safetensors.SafetensorError:
        expected = None
    try:
        header = stfile.header_of(io.BytesIO(blob), "fuzz.safetensors", len(blob))
    except FormatError:
        assert expected is None, "refused a file the library reads (no duplicates here, no null metadata)"
        return
    assert expected == {n: (e.dtype, list(e.shape), blob[e.start : e.end]) for n, e in header.tensors.items()}


# --- adapter config and keys -------------------------------------------------------------------------------

modules = st.sampled_from(
    ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head", "h.0.attn.c_attn"]
)
key_parts = st.tuples(
    st.sampled_from(["base_model.model.", ""]),
    modules | st.text("abq_.0", max_size=12),
    st.sampled_from([".lora_A", ".lora_B", ".lora_embedding_A", ".lora_magnitude_vector", ".modules_to_save", ""]),
    st.sampled_from(["", ".default", ".x.y"]),
    st.sampled_from([".weight", ".bias", ""]),
)
stray = st.dictionaries(
    key_parts.map("".join),
    st.tuples(st.sampled_from(["F32", "BF16", "I8"]), st.lists(st.integers(0, 9), max_size=3)),
    max_size=4,
)


@st.composite
def lora_pairs(draw: st.DrawFn) -> dict[str, tuple[str, list[int]]]:
    """A rank-8 lora_A/lora_B pair as PEFT writes it, so that the fuzz reaches the config checks."""
    prefix, module = draw(st.sampled_from(["base_model.model.", ""])), draw(modules)
    fan_in, fan_out, name = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.sampled_from(["", ".default"]))
    return {
        f"{prefix}{module}.lora_A{name}.weight": ("F32", [8, fan_in]),
        f"{prefix}{module}.lora_B{name}.weight": ("F32", [fan_out, 8]),
    }


tensors = st.tuples(st.lists(lora_pairs(), min_size=1, max_size=3), stray).map(
    lambda parts: {k: v for d in [*parts[0], parts[1]] for k, v in d.items()}
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` nine times in ten, any JSON value otherwise: a wrong value stops the loader early,
    so most fields are plausible and the checks behind them run too."""
    return st.integers(0, 9).flatmap(lambda k: json_values if k == 0 else valid)


configs = st.fixed_dictionaries(
    {
        "r": mostly(st.just(8)),
        "target_modules": mostly(
            st.lists(st.sampled_from(["q_proj", "up_proj", "c_attn"]), max_size=3)
            | st.sampled_from([".*q_proj", "all-linear", "(", "[a-", "q_proj)|(x"])
        ),
    },
    optional={
        "peft_type": mostly(st.sampled_from(["LORA", "IA3"])),
        "rank_pattern": mostly(st.dictionaries(st.sampled_from(["q_proj", "layers.1", "(", "*"]), st.integers(1, 9))),
        "layers_to_transform": mostly(st.lists(st.integers(0, 2), max_size=2)),
        "modules_to_save": mostly(st.lists(st.sampled_from(["lm_head", "embed"]), max_size=2)),
        "fan_in_fan_out": json_values,
        "use_dora": json_values,
        "init_lora_weights": st.sampled_from(["pissa_niter_4", "gaussian", True]) | json_values,
        "base_model_name_or_path": json_values,
    },
)


def write_adapter_dir(path: Path, cfg: dict[str, Any] | bytes, named: dict[str, tuple[str, list[int]]]) -> None:
    raw = cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode()
    (path / CONFIG_FILE).write_bytes(raw)
    blobs = {}
    for name, (dtype, shape) in named.items():
        n = 1
        for d in shape:
            n *= d
        blobs[name] = stfile.Blob(dtype, tuple(shape), bytes(n * stfile.DTYPE_BITS[dtype] // 8))
    (path / ADAPTER_FILE).write_bytes(b"".join(stfile.serialize(blobs, {"format": "pt"})))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter directory that every example overwrites."""
    return tmp_path_factory.mktemp("fuzz-adapter")


@FUZZ
@given(cfg=configs, named=tensors)
def test_adapter_loader_raises_only_adapter_errors(
    scratch: Path, cfg: dict[str, Any], named: dict[str, tuple[str, list[int]]]
) -> None:
    write_adapter_dir(scratch, cfg, named)
    with only_our_errors(), opened(scratch) as adapter:
        assert adapter.modules, "an adapter with nothing to project is refused"


@FUZZ
@given(raw=json_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40), named=tensors)
def test_adapter_config_that_is_not_a_config_is_an_adapter_error(
    scratch: Path, raw: bytes, named: dict[str, tuple[str, list[int]]]
) -> None:
    write_adapter_dir(scratch, raw, named)
    with only_our_errors(), opened(scratch):
        assert raw.startswith(b"{"), "only a JSON object can be a config"


def test_a_well_formed_adapter_loads(tmp_path: Path) -> None:
    """What the fuzzer writes can load: ``write_adapter_dir`` is not a source of refusals only."""
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    named = {f"{key}.lora_A.weight": ("F32", [8, 4]), f"{key}.lora_B.weight": ("F32", [4, 8])}
    write_adapter_dir(tmp_path, {"r": 8, "target_modules": ["q_proj"]}, named)
    with opened(tmp_path) as adapter:
        assert [m.module for m in adapter.modules] == ["model.layers.0.self_attn.q_proj"]


# --- the YAML option loader --------------------------------------------------------------------------------

yaml_tokens = st.sampled_from(
    [
        "threshold", "num_layers", "num-layers", "force", "json", ":", " ", "\n", "- ", "[", "]", "{", "}", ",",
        "0.5", "1e999", ".nan", "2001-13-45", "2001-02-30 25:61:00", "!!float x", "!!int 0xZZ", "!!binary ==",
        "!!timestamp 1", "!!python/object:os.system", "&a ", "*a", "*b", "? ", "|", ">", "'", '"', "#", "~", "yes",
        "%YAML 1.1\n---\n", "<<: ", "\t", "\\", "\x00", "!!set ", "! ", ".inf", "-.Inf", "9" * 25, "0b_", "0x_",
        "[[[[[[[[[[", "{a: {b: ", "&x [*x]", "1:30", "=", "2001-01-01", "\ufeff", "---\n",
    ]
)  # fmt: skip
yaml_texts = st.lists(yaml_tokens, max_size=16).map("".join) | st.text(max_size=40)
KNOWN = ["threshold", "num_layers", "force", "as_json"]


@FUZZ
@given(text=yaml_texts)
def test_yaml_option_loader_raises_only_usage_errors(text: str) -> None:
    with only_our_errors():
        options = config.load_options(text, "fuzz.yaml", KNOWN)
        assert set(options) <= set(KNOWN)


def test_yaml_an_impossible_date_is_the_text_written() -> None:
    # found by the fuzzer: PyYAML's date constructor raised ValueError, not YAMLError; a config
    # keeps what looks like a date as text, and the option's own parsing judges it
    assert config.load_options("threshold: 2001-13-45", "fuzz.yaml", KNOWN) == {"threshold": "2001-13-45"}
