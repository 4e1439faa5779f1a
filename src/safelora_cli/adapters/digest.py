"""The stamp digest safelora writes and checks: what the adapter does, not how its file lays it out.

Stamp version 2 (``safelora.stamp_version = "2"``) is a sha256 over one canonical, length-prefixed
encoding of three parts:

1. every tensor of the weights file, keyed by its normalized name (``normalized_names``: PEFT's
   ``base_model.model.`` prefix and an adapter-name segment such as ``.default`` dropped, a LoRA
   module's A and B named ``<module>.lora_A``/``<module>.lora_B``), with its shape and its values
   upcast to float32 little-endian for float16, bfloat16 and float32 (so a re-save that widens
   float16 to float32 keeps the digest); every other dtype is hashed as its own bytes with its name;
2. every ``safelora.*`` metadata entry but ``safelora.digest`` itself;
3. the covered config: the format's ``covered_config`` (PEFT: the whole parsed
   ``adapter_config.json``, PEFT's defaults filled in, a documented inert list removed, canonical JSON).

Two keys that normalize to one name are refused: a loader would take one of them, and which one is
the loader's business. Version 1 stamps (no ``stamp_version``) hashed the raw tensors only
(``v1_digest``); they still read, and only ``--trust-stamp`` passes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import warnings
from collections.abc import Iterator, Mapping

import torch

from ..errors import AdapterError
from ..io import ranges, safefs, stfile
from .base import PROVENANCE_PREFIX, Adapter
from .lora_config import PEFT_PREFIX

_LITTLE = sys.byteorder == "little"
_SERIAL = 1 << 15  # elements widened per copy: torch's grain size, so each copy runs on this thread
STAMP_VERSION = "2"
DIGEST_KEY = PROVENANCE_PREFIX + "digest"
VERSION_KEY = PROVENANCE_PREFIX + "stamp_version"
_WIDENED = frozenset({"F16", "BF16", "F32"})  # hashed as float32: a lossless widening keeps the digest
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
# an adapter name after a PEFT layer's part (``lora_magnitude_vector.default.weight``, ``modules_to_save.x.weight``)
_NAMED_PART = re.compile(
    r"\.(?P<part>lora_[A-Za-z_]+|modules_to_save|trainable_tokens_delta)\.(?P<name>[^.]+)(?P<rest>\.weight|\.bias)$"
)
_NAMED_TAIL = re.compile(r"\.(?P<part>lora_embedding_[AB]|trainable_tokens_delta)\.(?P<name>[^.]+)$")


def normalize(key: str) -> str:
    """The name a tensor is digested under (see the module's docstring)."""
    m = _LORA.match(key)
    if m is not None:
        return f"{m['module'].removeprefix(PEFT_PREFIX)}.{m['part']}"
    name = key.removeprefix(PEFT_PREFIX)
    if (n := _NAMED_PART.search(name)) is not None and n["name"] not in ("weight", "bias"):
        name = name[: n.start()] + f".{n['part']}{n['rest']}"
    elif (n := _NAMED_TAIL.search(name)) is not None:
        name = name[: n.start()] + f".{n['part']}"
    return name


def normalized_names(adapter: Adapter) -> dict[str, str]:
    """Each tensor key of the weights file → its normalized name; ``AdapterError`` when two collide."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in adapter.header.tensors:
        name = normalize(key)
        if name in seen:
            raise AdapterError(
                f"{adapter.file}: {seen[name]} and {key} are one tensor ({name}) under two names; the adapter "
                "file is corrupt or crafted: save it again from your training run"
            )
        seen[name] = key
        out[key] = name
    return out


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _float32_pieces(dtype: str, data: ranges.Data) -> Iterator[bytes | memoryview]:
    """The values of a float16/bfloat16/float32 tensor as float32 little-endian bytes, a chunk at a
    time (float32 as it is: safetensors is little-endian; the others widened into one reused buffer)."""
    if dtype == "F32" and _LITTLE:
        yield from ranges.pieces(data)
        return
    width = stfile.DTYPE_BITS[dtype] // 8
    tdtype = stfile.DTYPES[dtype]
    out = bytearray()
    rest = b""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read, never written
        for chunk in ranges.pieces(data):
            piece = rest + bytes(chunk) if rest else chunk  # an element split across chunks: rare
            n = len(piece) // width
            rest = bytes(piece[n * width :])
            if n == 0:
                continue
            if len(out) < 4 * n:
                out = bytearray(4 * n)
            wide = torch.frombuffer(out, dtype=torch.float32, count=n)
            narrow = torch.frombuffer(piece, dtype=tdtype, count=n)
            for i in range(0, n, _SERIAL):  # below torch's grain size: no thread pool woken per tensor
                wide[i : i + _SERIAL].copy_(narrow[i : i + _SERIAL])
            if not _LITTLE:
                wide.view(torch.uint8).view(n, 4).copy_(wide.view(torch.uint8).view(n, 4).flip(1))
            yield memoryview(out)[: 4 * n]
    if rest:
        raise AdapterError("a tensor's byte length is not a whole number of elements")


def _hash_tensor(h: hashlib._Hash, name: str, blob: stfile.Blob) -> None:
    widened = blob.dtype in _WIDENED
    h.update(_frame(name.encode()))
    h.update(_frame(("F32" if widened else blob.dtype).encode()))
    h.update(_frame(json.dumps(list(blob.shape)).encode()))
    count = 1
    for d in blob.shape:
        count *= d
    h.update(_frame(str(count).encode()))
    for piece in _float32_pieces(blob.dtype, blob.data) if widened else ranges.pieces(blob.data):
        h.update(piece)


def stamp_digest(
    adapter: Adapter,
    replacements: Mapping[str, torch.Tensor] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> str:
    """The version 2 stamp digest of ``adapter`` with ``replacements`` (by key) and the ``safelora.*``
    entries of ``provenance`` (default: the adapter's own), over its covered config."""
    names = normalized_names(adapter)
    prov = adapter.provenance() if provenance is None else provenance
    entries = sorted((k, v) for k, v in prov.items() if k.startswith(PROVENANCE_PREFIX) and k != DIGEST_KEY)
    h = hashlib.sha256()
    h.update(_frame(b"safelora stamp v2"))
    try:
        tensors = blobs(adapter, replacements or {})
        h.update(_frame(b"tensors") + len(tensors).to_bytes(8, "big"))
        for key in sorted(tensors, key=lambda k: names[k]):
            _hash_tensor(h, names[key], tensors[key])
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.source or adapter.file, e)) from None
    h.update(_frame(b"metadata") + len(entries).to_bytes(8, "big"))
    for k, v in entries:
        h.update(_frame(k.encode()) + _frame(v.encode()))
    h.update(_frame(b"config") + _frame(adapter.format.covered_config(adapter)))
    return h.hexdigest()


def file_digest(adapter: Adapter, provenance: Mapping[str, str] | None = None) -> str:
    """``stamp_digest`` of the adapter as it is on disk (with ``provenance`` in place of its own stamp)."""
    return stamp_digest(adapter, None, provenance)


def stamp_version(adapter: Adapter) -> str | None:
    """The stamp's version as recorded (None: a version 1 stamp, or no stamp)."""
    return adapter.provenance().get(VERSION_KEY)


def intact(adapter: Adapter) -> bool:
    """Whether the adapter's recorded digest is the one its contents give, by its stamp's version."""
    prov = adapter.provenance()
    recorded = prov.get(DIGEST_KEY)
    if recorded is None:
        return False
    version = prov.get(VERSION_KEY)
    if version is None:
        return recorded == v1_digest(adapter)
    return version == STAMP_VERSION and recorded == file_digest(adapter)


def digest(blobs: Mapping[str, stfile.Blob]) -> str:
    """Version 1: sha256 over every tensor's name, dtype, shape and bytes (no config, no metadata)."""
    h = hashlib.sha256()
    for name in sorted(blobs):
        b = blobs[name]
        h.update(f"{name}\0{b.dtype}\0{list(b.shape)}\0{len(b.data)}\n".encode())
        for piece in ranges.pieces(b.data):
            h.update(piece)
    return h.hexdigest()


def v1_digest(adapter: Adapter) -> str:
    """The version 1 digest of the adapter file as it is on disk (read a chunk at a time)."""
    try:
        return digest(blobs(adapter, {}))
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.file, e)) from None


def blobs(adapter: Adapter, replacements: Mapping[str, torch.Tensor]) -> dict[str, stfile.Blob]:
    """Every tensor in file order: replacements as bytes, the others as ranges of the open file."""
    fd = adapter.handle.fileno()
    out: dict[str, stfile.Blob] = {}
    for name, e in sorted(adapter.header.tensors.items(), key=lambda kv: kv[1].start):
        new = replacements.get(name)
        data = ranges.FileRange(fd, e.start, e.end) if new is None else adapter.format.encode(adapter, name, new)
        out[name] = stfile.Blob(e.dtype, e.shape, data)
    return out
