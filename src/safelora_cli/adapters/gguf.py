"""GGUF LoRA files (llama.cpp, Ollama), an ``AdapterFormat`` of one file.

``convert_lora_to_gguf.py`` writes ``general.type = adapter``, ``adapter.type = lora`` and
``adapter.lora.alpha``, and each LoRA weight as ``<gguf tensor>.lora_a`` (r×in) and ``.lora_b``
(out×r), with llama.cpp's tensor names (``blk.0.attn_q.weight.lora_b``). Names map to Hugging Face
modules through ``gguf_names``' closed table, which also says whether the converter reordered the
rows of attn_q/attn_k: ``tensor`` puts them back in Hugging Face order, ``encode`` reorders a
replacement again, so the run's projection with C is, in the file's own row order, a projection with
C conjugated by that permutation.

The header is read by ``io.ggufile`` (bounded, strict); tensors are F32, F16, BF16 or Q8_0 (the
``gguf`` package's quants dequantize and requantize, so requantizing is exactly llama.cpp's). A
rewrite keeps every key/value pair and tensor byte for byte but the replaced lora_b tensors and the
``safelora.*`` pairs, the stamp, stored as GGUF strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from types import ModuleType

import torch

from ..errors import AdapterError, FormatError, MissingExtraError, OutputError, OutputNotEmptyError
from ..io import atomic, ggufile, ranges, safefs, stfile
from . import gguf_names
from .base import PROVENANCE_PREFIX, Adapter, BaseConfig, LoraModule, Weights
from .digest import DIGEST_KEY, STAMP_VERSION, VERSION_KEY, stamp_digest
from .location import file_of
from .lora_config import LoraConfig

INSTALL_HINT = "pip install 'safelora[gguf]'"
_FIX = "pass a GGUF LoRA file (convert_lora_to_gguf.py's output)"
_Q8_0 = 8
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_COMPUTED = "F32, F16, BF16 or Q8_0"


def _gguf(where: Path) -> ModuleType:
    """The ``gguf`` package (the ``gguf`` extra), or exit 2 with the line that installs it."""
    try:
        import gguf
    except ImportError:
        raise MissingExtraError(
            f"{where}: reading a GGUF LoRA file needs the gguf package, which is not installed: {INSTALL_HINT}"
        ) from None
    return gguf


@dataclass(frozen=True)
class GgufHeader(stfile.Header):
    """The tensors as the run sees them (shapes rows×columns, absolute offsets), and the GGUF layout."""

    layout: ggufile.Layout


@dataclass(frozen=True)
class GgufConfig(LoraConfig):
    """The adapter's settings, with the table entry and head counts its q/k row order needs (None
    when no base ``config.json`` was given: only the bytes can be read then, not attn_q/attn_k's B)."""

    entry: gguf_names.Entry | None = None
    heads: tuple[int, int] | None = None  # num_attention_heads, num_key_value_heads
    alpha: float = 0.0


def _int(config: Mapping[str, object], key: str, default: object = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(
            f"base config.json: {key} is not a positive integer; pass the base model the GGUF was made from"
        )
    return value


def _base_class(config: Mapping[str, object]) -> str | None:
    """The base's class, ``architectures[0]`` of its config.json."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    return archs[0]


def _heads(config: Mapping[str, object]) -> tuple[int, int]:
    """num_attention_heads and num_key_value_heads (the former when absent), from the base's config.json."""
    n_head = _int(config, "num_attention_heads")
    return n_head, _int(config, "num_key_value_heads", n_head)


def _permute(t: torch.Tensor, n_head: int, back: bool) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of the rows (``back``: its inverse)."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise AdapterError(
            f"{rows} rows are not {n_head} heads of two rotary halves; pass the base the GGUF was made from"
        )
    half = rows // n_head // 2
    if back:
        return t.reshape(n_head, half, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape).contiguous()
    return t.reshape(n_head, 2, half, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape).contiguous()


class GgufFormat:
    """llama.cpp's GGUF LoRA file (see the module's docstring)."""

    name = "GGUF"
    expects = "a GGUF LoRA file"
    holds = "llama.cpp's convert_lora_to_gguf.py output, general.type = adapter"
    # Key/value pairs that change the update the adapter applies or where it applies.
    effect_fields = frozenset({"general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"})

    def covered_config(self, adapter: Adapter) -> bytes:
        # Every pair but the stamp's own, each by the sha256 of its bytes as the file stores them (deny
        # by default, nothing left out), as canonical JSON: the form a signed statement carries.
        kvs = _layout(adapter).kvs
        covered = {
            kv.key: "sha256:" + hashlib.sha256(kv.raw).hexdigest()
            for kv in kvs
            if not kv.key.startswith(PROVENANCE_PREFIX)
        }
        return json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def detect(self, location: safefs.Directory) -> bool:
        name = file_of(location)
        if name is None:
            return False
        with location.open(name, fix=_FIX) as f:
            return f.read(4) == ggufile.MAGIC

    def lacks(self, location: safefs.Directory) -> str:
        name = file_of(location)
        if name is None:
            return f"{location.path}: a directory, not a GGUF file"
        return f"{location.path / name}: no GGUF magic"

    def read_config(self, location: safefs.Directory) -> LoraConfig:
        adapter = self.load(location)
        adapter.close()
        return adapter.config

    def load(self, location: safefs.Directory, base_config: BaseConfig | None = None) -> Adapter:
        name = file_of(location)
        if name is None:
            raise AdapterError(f"{location.path}: a directory; {_FIX}")
        file = location.path / name
        _gguf(file)
        handle = location.open(name, fix=_FIX)
        try:
            st = os.fstat(handle.fileno())
            header, modules, _, _ = self.weights(handle, file, None)
            if not isinstance(header, GgufHeader):
                raise RuntimeError(f"{file}: not read as GGUF")
            config = self._config(header, modules, file, None if base_config is None else base_config())
        except BaseException:
            handle.close()
            raise
        return Adapter(self, file, file, location, config, b"", 0, header, handle, st, modules, [], False, [])

    def _config(
        self, header: GgufHeader, modules: list[LoraModule], file: Path, base_config: Mapping[str, object] | None
    ) -> GgufConfig:
        layout = header.layout
        for key, want in (("general.type", "adapter"), ("adapter.type", "lora")):
            if layout.value(key) != want:
                raise AdapterError(f"{file}: {key} is {layout.value(key)!r}, not {want!r}; {_FIX}")
        arch = layout.value("general.architecture")
        alpha = layout.value("adapter.lora.alpha")
        if not isinstance(arch, str):
            raise AdapterError(f"{file}: no general.architecture; {_FIX}")
        if not isinstance(alpha, float):
            raise AdapterError(f"{file}: adapter.lora.alpha is missing or not a float32; {_FIX}")
        entry, heads = None, None
        if base_config is not None:
            entry = gguf_names.entry(arch, _base_class(base_config), str(file))
            heads = _heads(base_config)
        elif arch not in gguf_names.ARCHITECTURES:
            gguf_names.entry(arch, None, str(file))
        ranks = {m.rank for m in modules}
        return GgufConfig(
            r=max(ranks, default=0),
            target_modules=sorted({m.module for m in modules}),
            rank_pattern={},
            fan_in_fan_out=False,
            use_dora=False,
            layers_to_transform=None,
            init_lora_weights=True,
            base_model_name_or_path=None,
            source=str(file),
            entry=entry,
            heads=heads,
            alpha=alpha,
        )

    def weights(self, handle: BufferedReader, file: Path, config: LoraConfig | None) -> Weights:
        gguf = _gguf(file)
        try:
            layout = ggufile.read_layout(handle, os.fstat(handle.fileno()).st_size, str(file), gguf.GGML_QUANT_SIZES)
        except OSError as e:
            raise AdapterError(safefs.os_error(file, e)) from None
        except FormatError as e:
            raise AdapterError(str(e)) from None
        tensors: dict[str, stfile.TensorEntry] = {}
        for info in layout.tensors:
            dtype = "Q8_0" if info.ggml_type == _Q8_0 else _FLOAT_TYPES.get(info.ggml_type)
            if dtype is None:
                dtype = gguf.GGMLQuantizationType(info.ggml_type).name
            start = layout.data_start + info.offset
            tensors[info.name] = stfile.TensorEntry(
                info.name, dtype, tuple(reversed(info.dims)), start, start + info.nbytes
            )
        metadata: dict[str, str] = {}
        for kv in layout.kvs:
            if kv.key.startswith(PROVENANCE_PREFIX):
                if not isinstance(kv.value, str):
                    raise AdapterError(
                        f"{file}: {kv.key} is not a string, as safelora writes its stamp; "
                        "start from the original adapter"
                    )
                metadata[kv.key] = kv.value
        header = GgufHeader(tensors, metadata, layout.data_start, layout)
        return Weights(header, _modules(tensors, file), [], False)

    def tensor(self, adapter: Adapter, key: str) -> torch.Tensor:
        entry = adapter.header.tensors[key]
        try:
            data = bytearray(b"".join(ranges.FileRange(adapter.handle.fileno(), entry.start, entry.end).chunks()))
        except OSError as e:
            raise AdapterError(safefs.os_error(adapter.source or adapter.file, e)) from None
        if entry.dtype == "Q8_0":
            import numpy as np

            gguf = _gguf(adapter.file)
            raw = np.frombuffer(bytes(data), dtype=np.uint8).reshape(entry.shape[0], -1)
            t = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).astype(np.float32))
        else:
            t = stfile.tensor_from_bytes(entry, data)
        n_head = _row_heads(adapter, key)
        return t if n_head is None else _permute(t, n_head, back=True)

    def encode(self, adapter: Adapter, key: str, tensor: torch.Tensor) -> bytes:
        entry = adapter.header.tensors[key]
        n_head = _row_heads(adapter, key)
        t = tensor if n_head is None else _permute(tensor, n_head, back=False)
        if entry.dtype == "Q8_0":
            gguf = _gguf(adapter.file)
            return bytes(gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0).tobytes())
        return stfile.tensor_bytes(t.to(entry.torch_dtype))

    def provenance(self, adapter: Adapter) -> dict[str, str]:
        return {k: v for k, v in adapter.header.metadata.items() if k.startswith(PROVENANCE_PREFIX)}

    def check_output(self, adapter: Adapter, output: Path, *, overwrite: bool) -> None:
        _check_output_file(adapter, output, overwrite)

    def write(
        self,
        adapter: Adapter,
        replacements: Mapping[str, torch.Tensor],
        provenance: Mapping[str, str],
        output: Path | None,
        *,
        overwrite_output: bool = False,
        notes: list[str] | None = None,
    ) -> Path:
        """Write the patched file: in place (a temp file beside it, renamed over it only if it is still
        the file read), or a new file at ``output``. Every pair and tensor not replaced is copied byte
        for byte; memory holds one replaced tensor's bytes at a time."""
        layout = _layout(adapter)
        for key, t in replacements.items():
            if tuple(t.shape) != adapter.header.tensors[key].shape:
                raise AssertionError(f"replacement for {key} changed shape")
        stamp = {k: v for k, v in provenance.items() if k != DIGEST_KEY} | {VERSION_KEY: STAMP_VERSION}
        stamp[DIGEST_KEY] = provenance.get(DIGEST_KEY) or stamp_digest(adapter, replacements, stamp)
        kvs = [kv.raw for kv in layout.kvs if not kv.key.startswith(PROVENANCE_PREFIX)]
        kvs += [ggufile.string_kv(k, v) for k, v in sorted(stamp.items())]
        encoded = {k: self.encode(adapter, k, t) for k, t in replacements.items()}
        chunks = ggufile.rewrite(adapter.handle.fileno(), layout, kvs, encoded)
        mode = adapter.stat.st_mode & 0o777
        name = file_of(adapter.dir)
        if name is None:
            raise RuntimeError(f"{adapter.file}: a GGUF adapter opened as a directory")
        if output is None:
            atomic.replace(adapter.dir, name, chunks, mode, expect=adapter.stat)
            return adapter.file
        return _write_output(adapter, output, chunks, mode, overwrite_output)

    def kept_files(self, adapter: Adapter) -> tuple[str, ...]:
        name = file_of(adapter.dir)
        return () if name is None else (name,)

    def attested_files(self, adapter: Adapter) -> tuple[str, ...]:
        return self.kept_files(adapter)


def _layout(adapter: Adapter) -> ggufile.Layout:
    header = adapter.header
    if not isinstance(header, GgufHeader):
        raise RuntimeError(f"{adapter.file}: not read as GGUF")
    return header.layout


def _row_heads(adapter: Adapter, key: str) -> int | None:
    """The head count ``key``'s rows were permuted with, or None when they are in Hugging Face order."""
    split = gguf_names.split(key)
    if split is None or split[3] != "b" or split[1] not in gguf_names.PERMUTED_PARTS:
        return None
    config = adapter.config
    if not isinstance(config, GgufConfig) or config.entry is None or config.heads is None:
        raise AdapterError(
            f"{adapter.file}: the row order of {key} depends on the base model's class; pass the base model "
            "(its config.json names it)"
        )
    if not config.entry.permuted:
        return None
    return config.heads[0] if split[1] == "attn_q" else config.heads[1]


def _modules(tensors: Mapping[str, stfile.TensorEntry], file: Path) -> list[LoraModule]:
    """The LoRA modules, each with a lora_a (r×in) and a lora_b (out×r) of a type safelora computes on."""
    found: dict[str, dict[str, stfile.TensorEntry]] = {}
    layers: dict[str, int | None] = {}
    for name, e in tensors.items():
        split = gguf_names.split(name)
        if split is None:
            raise AdapterError(
                f"{file}: tensor {name!r} is not a LoRA weight safelora's GGUF table names (blk.N.attn_q/k/v/output, "
                "ffn_gate/up/down, output .weight.lora_a/.lora_b); convert the adapter again without it"
            )
        module, _, layer, ab = split
        if e.dtype not in ("F32", "F16", "BF16", "Q8_0") or len(e.shape) != 2:
            raise AdapterError(f"{file}: tensor {name!r} is {e.dtype} {list(e.shape)}; safelora reads 2-D {_COMPUTED}")
        found.setdefault(module, {})[ab] = e
        layers[module] = layer
    out = []
    for module in sorted(found, key=lambda m: (layers[m] is None, layers[m] or 0, m)):
        pair = found[module]
        if set(pair) != {"a", "b"}:
            raise AdapterError(
                f"{file}: {module} has a lora_{next(iter(pair))} and no lora_{'b' if 'a' in pair else 'a'}"
            )
        a, b = pair["a"], pair["b"]
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{file}: {a.name} has rank {a.shape[0]} and {b.name} rank {b.shape[1]}; {ggufile.CORRUPT}"
            )
        out.append(LoraModule(module, a.name, b.name, a.shape[0], layers[module], b.shape[0], a.shape[1]))
    return out


def _check_output_file(adapter: Adapter, output: Path, overwrite: bool) -> None:
    """``output`` can take the patched file: not a link, a directory or the adapter file itself, and
    free unless ``overwrite``."""
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(safefs.os_error(output, e)) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{output}: is a symbolic link; give the file it points to")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{output}: is a directory; a GGUF adapter is written as one file, give FILE.gguf")
    if (st.st_dev, st.st_ino) == (adapter.stat.st_dev, adapter.stat.st_ino):
        raise OutputError(f"{output}: is the adapter file itself; to patch it in place, give no output")
    if not overwrite:
        raise OutputNotEmptyError(f"{output}: exists")


def _write_output(adapter: Adapter, output: Path, chunks: list[ranges.Data], mode: int, overwrite: bool) -> Path:
    """The patched file at ``output`` (FILE.gguf), whole or not at all; the source stays as it was."""
    _check_output_file(adapter, output, overwrite)
    parent = output.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with safefs.Directory(parent, OutputError, fix="it cannot hold the output") as directory:
            atomic.write_file(directory, output.name, chunks, mode)
            ranges.fsync(directory.fd)
    except OSError as e:
        raise OutputError(
            f"{output}: write failed ({e.strerror}); nothing was written there. Free some space"
        ) from None
    return output


GGUF = GgufFormat()
