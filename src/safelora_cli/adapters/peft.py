"""PEFT LoRA adapters: reading keys and config, and rewriting the weights file atomically."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, AdapterNotLocalError, InPlaceError, OutputError, OutputNotEmptyError, UsageError
from ..io import atomic, safefs, stfile, strict
from ..io.atomic import TMP_MARK
from ..sources import parse_ref
from .patterns import ConfigPatterns, saved, show

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CONFIG_LIMIT = 16 << 20  # adapter_config.json is kilobytes; a larger one is not a config
PEFT_PREFIX = "base_model.model."
PROVENANCE_PREFIX = "safelora."

# module path, lora_A|lora_B, optional adapter name (older files: ``lora_A.default.weight``)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
MODULES_TO_SAVE = "modules_to_save weight: passed through"
_SKIP_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "DoRA magnitude vector: left unchanged"),
    (
        re.compile(r"\.lora_embedding_[AB](\.[^.]+)?$"),
        "embedding LoRA: not defined by Safe LoRA, passed through",
    ),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "lora_B bias: not defined by Safe LoRA, passed through"),
    (
        re.compile(r"trainable_tokens_delta"),
        "trainable-token delta: not defined by Safe LoRA, passed through",
    ),
    (re.compile(r"modules_to_save"), MODULES_TO_SAVE),
)
_CONVERTED_INITS = {"pissa", "olora", "loftq", "corda", "eva"}


@dataclass(frozen=True)
class LoraConfig:
    """The parts of ``adapter_config.json`` that interpret the adapter's keys.

    Its patterns are matched as PEFT matches them, within one time budget for the config
    (``patterns``); building a ``LoraConfig`` compiles them all, and raises ``AdapterError`` for one
    that is invalid or cannot be bounded. ``source`` names the config file in messages.
    """

    r: int
    target_modules: list[str] | str | None
    rank_pattern: dict[str, int]
    fan_in_fan_out: bool
    use_dora: bool
    layers_to_transform: list[int] | None
    init_lora_weights: object
    base_model_name_or_path: str | None
    modules_to_save: list[str] = field(default_factory=list)
    alpha_pattern: dict[str, object] = field(default_factory=dict)
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    source: str = CONFIG_FILE
    patterns: ConfigPatterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A frozen dataclass sets derived fields through object.__setattr__.
        object.__setattr__(
            self,
            "patterns",
            ConfigPatterns(
                self.source,
                target_modules=self.target_modules,
                exclude_modules=self.exclude_modules,
                modules_to_save=self.modules_to_save,
                rank_pattern=self.rank_pattern,
                alpha_pattern=self.alpha_pattern,
                layers_pattern=self.layers_pattern,
                layers_to_transform=self.layers_to_transform,
            ),
        )

    def expected_rank(self, module: str) -> int:
        """r for ``module``: the first matching ``rank_pattern`` key (as PEFT matches it), else r."""
        # PEFT resolves both patterns for every module it adapts. Safe LoRA's similarity does not
        # depend on alpha, but a key PEFT could not match in bounded time is refused all the same.
        self.patterns.alpha_key(module)
        return int(self.rank_pattern.get(self.patterns.rank_key(module), self.r))

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` with this config (``layers_to_transform`` included)."""
        return self.patterns.targets(module)

    def layer(self, module: str) -> int | None:
        """``module``'s layer index as PEFT finds it for ``layers_to_transform`` (``layers_pattern`` honoured)."""
        return self.patterns.layer(module)

    def saves(self, key: str) -> bool:
        """Whether ``key`` is a full weight PEFT saved for a ``modules_to_save`` module."""
        return saved(self.modules_to_save, key.removeprefix(PEFT_PREFIX))


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: its keys in the adapter file and what the config says of it."""

    module: str  # PEFT prefix removed, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    layer: int | None


@dataclass(frozen=True)
class Adapter:
    """An adapter as read: its config and header in memory, its weights file open.

    Tensors are read from the open file when asked for (``tensor``), and a rewrite copies the
    untouched ones from it range by range: memory follows the LoRA weights the run uses, not what
    the file's size or header claims. Close it (``close``) when done.
    """

    path: Path
    dir: safefs.Directory = field(repr=False)
    config: LoraConfig
    config_bytes: bytes = field(repr=False)
    config_mode: int
    header: stfile.Header
    handle: BufferedReader = field(repr=False)  # where the tensors are read from
    stat: os.stat_result = field(repr=False)  # of the weights file as opened: a rewrite checks it is still there
    modules: list[LoraModule]
    skipped: list[tuple[str, str]]
    dora: bool
    warnings: list[str]
    source: Path | None = None  # the file the tensors come from, when not the adapter's own (a kept original)

    @property
    def file(self) -> Path:
        return self.path / ADAPTER_FILE

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from the weights file into memory of its own."""
        entry = self.header.tensors[key]
        try:
            data = bytearray(b"".join(stfile.FileRange(self.handle.fileno(), entry.start, entry.end).chunks()))
        except OSError as e:
            raise AdapterError(safefs.os_error(self.source or self.file, e)) from None
        return stfile.tensor_from_bytes(entry, data)

    def with_weights(self, handle: BufferedReader, source: Path) -> Adapter:
        """This adapter with its tensors read from ``handle`` (a kept original) instead of its own file.

        Its directory, config and ``stat`` stay: a rewrite still replaces the adapter's own file, and
        only if that file is still the one read. Takes ``handle`` over (``close`` closes it).
        """
        try:
            header, modules, skipped, dora = _weights(handle, source, self.config)
        except BaseException:
            handle.close()
            raise
        self.close()
        return replace(self, header=header, handle=handle, modules=modules, skipped=skipped, dora=dora, source=source)

    def provenance(self) -> dict[str, str]:
        """The ``safelora.*`` metadata a previous run left, if any."""
        return {k: v for k, v in self.header.metadata.items() if k.startswith(PROVENANCE_PREFIX)}

    def provenance_value(self, name: str, default: str, types: tuple[type, ...]) -> Any:
        """The JSON value a previous run recorded under ``safelora.<name>`` (``default`` if absent)."""
        key = PROVENANCE_PREFIX + name
        try:
            value = strict.loads(self.header.metadata.get(key, default))
        except strict.InvalidJSON:
            value = None
            types = ()
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise AdapterError(
                f"{self.file}: provenance {key} is not what safelora writes; the metadata was edited by hand "
                "or by another tool. Start from the original adapter"
            )
        return value

    def close(self) -> None:
        self.handle.close()


def _load_config(directory: safefs.Directory) -> tuple[LoraConfig, bytes, int]:
    """The config, the bytes it was read from and their file's mode (an ``--output`` copy writes those)."""
    cfg_path = directory.path / CONFIG_FILE
    if directory.lstat(CONFIG_FILE) is None:
        raise AdapterError(f"{cfg_path}: missing; pass a PEFT adapter directory (adapter_config.json + {ADAPTER_FILE})")
    data, mode = directory.read_small(CONFIG_FILE, CONFIG_LIMIT, fix="pass a PEFT adapter directory")
    try:
        raw = strict.loads(data)
    except strict.InvalidJSON as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e}); restore it from your training run") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; Safe LoRA applies to LoRA adapters only")
    _check_types(cfg_path, raw)
    r = raw.get("r")
    rank_pattern = raw.get("rank_pattern") or {}
    target = raw.get("target_modules")
    layers = raw.get("layers_to_transform")
    to_save = raw.get("modules_to_save") or []
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not (
        type(r) is int
        and r > 0
        and isinstance(rank_pattern, dict)
        and all(type(v) is int and v > 0 for v in rank_pattern.values())
        and (
            target is None
            or isinstance(target, str)
            or (isinstance(target, list) and all(isinstance(t, str) for t in target))
        )
        and (layers is None or (isinstance(layers, list) and all(type(i) is int for i in layers)))
        and _str_list(to_save)
    ):
        raise AdapterError(
            f"{cfg_path}: invalid LoRA config (r, rank_pattern, target_modules, layers_to_transform or "
            "modules_to_save); "
            "restore it from your training run"
        )
    # The patterns themselves are compiled and bounded by LoraConfig; these are the types PEFT takes.
    alpha_pattern = raw.get("alpha_pattern") or {}
    layers_pattern = raw.get("layers_pattern")
    exclude = raw.get("exclude_modules")
    if not (
        isinstance(alpha_pattern, dict)
        and (layers_pattern is None or isinstance(layers_pattern, str) or _str_list(layers_pattern))
        and (exclude is None or isinstance(exclude, str) or _str_list(exclude))
    ):
        raise AdapterError(
            f"{cfg_path}: invalid LoRA config (alpha_pattern, layers_pattern or exclude_modules); "
            "restore it from your training run"
        )
    base = raw.get("base_model_name_or_path")
    config = LoraConfig(
        r=r,
        target_modules=target,
        rank_pattern=rank_pattern,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        use_dora=bool(raw.get("use_dora", False)),
        layers_to_transform=layers,
        init_lora_weights=raw.get("init_lora_weights", True),
        base_model_name_or_path=base if isinstance(base, str) and base else None,
        modules_to_save=to_save,
        alpha_pattern=alpha_pattern,
        layers_pattern=layers_pattern,
        exclude_modules=exclude,
        source=str(cfg_path),
    )
    return config, data, mode


# The fields safelora reads whose type the checks above do not already pin: a wrong type is refused
# (``"fan_in_fan_out": "false"`` would otherwise read as true); fields safelora does not read are
# ignored, so configs from newer PEFT versions keep working.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,),
    "fan_in_fan_out": (bool,),
    "use_dora": (bool,),
    "init_lora_weights": (bool, str),
    "base_model_name_or_path": (str,),
}


def _check_types(cfg_path: Path, raw: dict[str, Any]) -> None:
    for key, types in _FIELD_TYPES.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, types):
            names = " or ".join("true/false" if t is bool else "a string" for t in types)
            raise AdapterError(
                f"{cfg_path}: {key} is {type(value).__name__} {_short(value)}, expected {names}; "
                "restore it from your training run"
            )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def open_dir(path: Path) -> safefs.Directory:
    """Open an adapter directory once; every later read and the rewrite go through this descriptor."""
    try:
        return safefs.Directory(path, AdapterError, fix="pass a PEFT adapter directory")
    except AdapterError:
        if not os.path.lexists(path):
            ref = parse_ref(str(path))
            if ref is not None and ref.revision is None:
                # A Hub repo id (``org/name``) given where a directory is expected: say what to do instead.
                raise AdapterNotLocalError(
                    f"{path}: no such directory, and adapters are local directories", str(path)
                ) from None
        raise


@contextmanager
def opened(path: Path) -> Iterator[Adapter]:
    """``load_adapter`` on a path, with the directory and the weights file closed afterwards."""
    with open_dir(path) as directory:
        adapter = load_adapter(directory)
        try:
            yield adapter
        finally:
            adapter.close()


def load_adapter(directory: safefs.Directory) -> Adapter:
    """Read and check an adapter directory; raises ``AdapterError`` naming the file or tensor.

    Reads the config and the weights file's header; no tensor is read until asked for.
    """
    config, config_bytes, config_mode = _load_config(directory)
    file = directory.path / ADAPTER_FILE
    if directory.lstat(ADAPTER_FILE) is None:
        if directory.lstat("adapter_model.bin") is not None:
            raise AdapterError(
                f"{directory.path}: only adapter_model.bin; re-save the adapter with safe_serialization=True"
            )
        raise AdapterError(f"{file}: missing; pass a PEFT adapter directory")
    handle = directory.open(ADAPTER_FILE, fix="pass a PEFT adapter directory")
    try:
        st = os.fstat(handle.fileno())
        header, modules, skipped, dora = _weights(handle, file, config)
    except BaseException:
        handle.close()
        raise
    warnings = []
    init = config.init_lora_weights
    if isinstance(init, str) and init.split("_")[0].lower() in _CONVERTED_INITS:
        warnings.append(
            f"init_lora_weights={init!r}: B·A is the update only if the adapter was saved with PEFT's "
            "conversion (path_initial_model_for_weight_conversion)"
        )
    return Adapter(
        directory.path,
        directory,
        config,
        config_bytes,
        config_mode,
        header,
        handle,
        st,
        modules,
        skipped,
        dora,
        warnings,
    )


def _weights(
    handle: BufferedReader, file: Path, config: LoraConfig
) -> tuple[stfile.Header, list[LoraModule], list[tuple[str, str]], bool]:
    """The header of an open weights file and what it holds, as ``config`` interprets it."""
    try:
        header = stfile.header_of(handle, str(file), os.fstat(handle.fileno()).st_size)
    except OSError as e:
        raise AdapterError(safefs.os_error(file, e)) from None
    return (header, *_parse_keys(file, header, config))


def _parse_keys(
    file: Path, header: stfile.Header, config: LoraConfig
) -> tuple[list[LoraModule], list[tuple[str, str]], bool]:
    pairs: dict[str, dict[str, str]] = {}
    skipped: list[tuple[str, str]] = []
    dora = config.use_dora
    for key, entry in header.tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            reason = next((why for rx, why in _SKIP_RULES if rx.search(key)), None)
            if reason is None:
                # PEFT saves a modules_to_save copy under the module's own name (``…lm_head.weight``)
                reason = MODULES_TO_SAVE if config.saves(key) else "not a LoRA tensor: passed through"
            dora = dora or "lora_magnitude_vector" in key
            skipped.append((key, reason))
            continue
        if len(entry.shape) != 2:
            skipped.append((key, f"{len(entry.shape)}-D LoRA weight (convolution): not defined by Safe LoRA"))
            continue
        if entry.dtype not in stfile.COMPUTE_DTYPES:
            raise AdapterError(
                f"{file}: {key} is {entry.dtype}; Safe LoRA computes on float16, bfloat16, float32 or float64 "
                "LoRA weights (save the adapter from your training run in one of those)"
            )
        part = pairs.setdefault(m["module"], {})
        if m["part"] in part:
            # ``….lora_B.weight`` and ``….lora_B.default.weight`` name one tensor twice: which one a
            # loader takes is up to the loader, so neither is projected.
            raise AdapterError(
                f"{file}: {part[m['part']]} and {key} are both the {m['part']} of one module; "
                "the adapter file is corrupt or crafted: save it again from your training run"
            )
        part[m["part"]] = key
    modules = []
    for raw_module, parts in pairs.items():
        if parts.keys() != {"lora_A", "lora_B"}:
            have, missing = ("lora_A", "lora_B") if "lora_A" in parts else ("lora_B", "lora_A")
            raise AdapterError(f"{file}: {parts[have]} has no matching {missing}; the adapter file is incomplete")
        modules.append(_module(file, raw_module, parts["lora_A"], parts["lora_B"], header, config))
    if not modules:
        raise AdapterError(f"{file}: no 2-D lora_A/lora_B pairs; nothing for Safe LoRA to project")
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.module))
    return modules, skipped, dora


def _module(
    file: Path, raw_module: str, a_key: str, b_key: str, header: stfile.Header, config: LoraConfig
) -> LoraModule:
    module = raw_module.removeprefix(PEFT_PREFIX)
    a, b = header.tensors[a_key], header.tensors[b_key]
    rank = a.shape[0]
    if 0 in a.shape or 0 in b.shape:
        raise AdapterError(
            f"{file}: {a_key} is {list(a.shape)} and {b_key} is {list(b.shape)}; a module with no rank, input or "
            "output features is not a LoRA update: save the adapter again from your training run"
        )
    if b.shape[1] != rank:
        raise AdapterError(
            f"{file}: {a_key} is {list(a.shape)} but {b_key} is {list(b.shape)}; ranks differ, the adapter file is "
            "incomplete or corrupt: save it again from your training run"
        )
    if rank != config.expected_rank(module):
        raise AdapterError(
            f"{file}: {a_key} has rank {rank} but adapter_config.json says r={config.expected_rank(module)} "
            "for this module; config and weights do not belong together"
        )
    layer = config.layer(module)
    if not config.targets(module):
        targets = config.target_modules
        named = f"target_modules={show(targets) if isinstance(targets, str) else show(repr(targets))}"
        if config.layers_to_transform:
            named += f" with layers_to_transform={show(repr(config.layers_to_transform))} (its layer: {layer})"
        raise AdapterError(
            f"{file}: holds LoRA weights for {show(module)} but {named} does not name it; config and weights do "
            "not belong together"
        )
    return LoraModule(module, a_key, b_key, rank, layer)


def digest(blobs: Mapping[str, stfile.Blob]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(blobs):
        b = blobs[name]
        h.update(f"{name}\0{b.dtype}\0{list(b.shape)}\0{len(b.data)}\n".encode())
        for piece in stfile.pieces(b.data):
            h.update(piece)
    return h.hexdigest()


def file_digest(adapter: Adapter) -> str:
    """``digest`` of the adapter file as it is on disk (read a chunk at a time)."""
    try:
        return digest(_blobs(adapter, {}))
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.file, e)) from None


def _blobs(adapter: Adapter, replacements: Mapping[str, torch.Tensor]) -> dict[str, stfile.Blob]:
    """Every tensor in file order: replacements as bytes, the others as ranges of the open file."""
    fd = adapter.handle.fileno()
    blobs: dict[str, stfile.Blob] = {}
    for name, e in sorted(adapter.header.tensors.items(), key=lambda kv: kv[1].start):
        new = replacements.get(name)
        data = stfile.FileRange(fd, e.start, e.end) if new is None else stfile.tensor_bytes(new)
        blobs[name] = stfile.Blob(e.dtype, e.shape, data)
    return blobs


def write_adapter(
    adapter: Adapter,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    output: Path | None,
    *,
    overwrite_output: bool = False,
    notes: list[str] | None = None,
) -> Path:
    """Write the patched weights; returns the file written.

    In place: a temp file in the adapter's own directory, fsync, a rename through the directory's
    descriptor (only if the weights file is still the one read), fsync the directory, so a crash
    leaves either the old file or the new one. With ``output``: a complete adapter directory (see
    ``_write_output``) and the source left untouched. Every tensor not in ``replacements`` is
    copied byte for byte; replacements keep their original dtype. ``notes`` gets what was skipped.
    """
    for key, t in replacements.items():
        e = adapter.header.tensors[key]
        if tuple(t.shape) != e.shape or t.dtype != e.torch_dtype:
            raise AssertionError(f"replacement for {key} changed shape or dtype")
    blobs = _blobs(adapter, replacements)
    metadata = {k: v for k, v in adapter.header.metadata.items() if not k.startswith(PROVENANCE_PREFIX)}
    metadata.update(provenance)
    try:
        metadata[PROVENANCE_PREFIX + "digest"] = digest(blobs)
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.file, e)) from None
    chunks = stfile.serialize(blobs, metadata)
    mode = adapter.stat.st_mode & 0o777
    if output is not None:
        return _write_output(adapter, output, chunks, mode, overwrite_output, [] if notes is None else notes)
    atomic_replace(adapter.dir, ADAPTER_FILE, chunks, mode, expect=adapter.stat)
    return adapter.file


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_output(
    adapter: Adapter, output: Path, chunks: list[stfile.Data], mode: int, overwrite: bool, notes: list[str]
) -> Path:
    """A complete adapter directory at ``output``: the new weights, the config as read, and a copy of
    every other regular file of the adapter directory (``_copy_tree`` says which).

    A new or empty ``output`` appears whole or not at all: the directory is assembled beside it and
    renamed into place, so a failure or a crash leaves it as it was (a killed run's temp directory
    is removed by the next run that writes there). Reusing a non-empty one (--force) replaces its
    files one by one, each by a rename, so a symlink found there is replaced, never followed.
    """
    st = _lstat(output)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{output}: is a symbolic link; give the directory it points to")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{output}: exists and is not a directory")
    if st is not None and (st.st_dev, st.st_ino) == adapter.dir.identity:
        raise OutputError(f"{output}: is the adapter directory itself; to patch it in place, give no output")
    parent_path = output.absolute().parent
    try:
        parent_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(safefs.os_error(parent_path, e)) from None
    with safefs.Directory(parent_path, OutputError, fix="it cannot hold the output") as parent:
        if st is not None:
            with _open_subdir(parent.fd, output.name, output) as out:
                if os.listdir(out.fd):
                    if not overwrite:
                        raise OutputNotEmptyError(f"{output}: exists and is not empty")
                    try:
                        _fill(adapter, out, chunks, mode, notes)
                    except OSError as e:
                        raise OutputError(
                            f"{output}: write failed ({e.strerror}) while replacing its files; some may be new, "
                            "some old. Free some space, then run again"
                        ) from None
                    return output / ADAPTER_FILE
        return _assemble(adapter, parent, output, chunks, mode, notes)


def _assemble(
    adapter: Adapter,
    parent: safefs.Directory,
    output: Path,
    chunks: list[stfile.Data],
    mode: int,
    notes: list[str],
) -> Path:
    """Build the output directory beside it, then rename it onto a missing or empty ``output``."""
    prefix = f".{output.name}{TMP_MARK}"
    staging = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        atomic.clean_stale(parent, prefix)
        # mkdir, not mkdtemp (0700), so it ends up with the mode any new directory would get.
        os.mkdir(staging, dir_fd=parent.fd)
    except OSError as e:
        raise OutputError(safefs.os_error(output, e)) from None
    try:
        with _open_subdir(parent.fd, staging, parent.path / staging) as out:
            _fill(adapter, out, chunks, mode, notes)
        os.rename(staging, output.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    except OSError as e:
        atomic.remove_entry(parent.fd, staging)
        raise OutputError(
            f"{output}: write failed ({e.strerror}); nothing was written there. Free some space"
        ) from None
    except BaseException:
        atomic.remove_entry(parent.fd, staging)
        raise
    try:
        os.fsync(parent.fd)
    except OSError as e:
        raise AdapterError(
            f"{output}: written, but syncing {parent.path} failed ({e.strerror}); a crash may still undo the write"
        ) from None
    return output / ADAPTER_FILE


def _fill(adapter: Adapter, out: safefs.Directory, chunks: list[stfile.Data], mode: int, notes: list[str]) -> None:
    """Write the adapter's files into ``out`` (the other files, the config as read, then the weights)
    and sync it; raises ``OSError``."""
    _copy_tree(adapter.dir, out, _allowed_roots(adapter.dir), notes, depth=0)
    atomic.write_file(out, CONFIG_FILE, [adapter.config_bytes], adapter.config_mode)
    atomic.write_file(out, ADAPTER_FILE, chunks, mode)
    stfile.fsync(out.fd)


_MAX_DEPTH = 16  # subdirectories copied into --output; deeper ones are skipped with a note


def _copy_tree(src: safefs.Directory, dst: safefs.Directory, roots: list[Path], notes: list[str], depth: int) -> None:
    """Copy what belongs to the adapter from ``src`` into ``dst``: regular files, subdirectories (not
    links to them), and a symlink only when what it opens is a regular file inside one of ``roots``
    (the adapter directory; for a Hugging Face cache snapshot, that repo's ``blobs/`` too). Anything
    else — a link to outside, to a directory, a loop, a FIFO or device — is skipped with a note.
    Raises ``OSError`` when writing fails.
    """
    for name in src.names():
        if (depth == 0 and name in (ADAPTER_FILE, CONFIG_FILE)) or TMP_MARK in name:
            continue
        where = src.path / name
        st = src.lstat(name)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth + 1 >= _MAX_DEPTH:
                notes.append(f"output: skipped {where}: directories nested deeper than {_MAX_DEPTH}")
                continue
            _make_subdir(dst, name)
            with _open_subdir(src.fd, name, where) as sub_src, _open_subdir(dst.fd, name, dst.path / name) as sub_dst:
                _copy_tree(sub_src, sub_dst, roots, notes, depth + 1)
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            notes.append(f"output: skipped {where}: {safefs.kind(st.st_mode)}, not a regular file")
            continue
        link = stat.S_ISLNK(st.st_mode)
        try:
            f = src.open(name, follow=link)
        except AdapterError as e:
            reason = str(e).removeprefix(f"{where}: ")
            notes.append(f"output: skipped {where}: {'a symbolic link: ' if link else ''}{reason}")
            continue
        with f:
            opened = os.fstat(f.fileno())
            why = _outside(where, opened, roots) if link else None
            if why is not None:
                notes.append(f"output: skipped {where}: {why}")
                continue
            atomic.write_file(dst, name, [stfile.FileRange(f.fileno(), 0, opened.st_size)], opened.st_mode & 0o777)
    stfile.fsync(dst.fd)


def _outside(link: Path, opened: os.stat_result, roots: list[Path]) -> str | None:
    """Why the file opened through the symlink ``link`` must not be copied (None when it lies in ``roots``).

    The link's resolved path must lie under a root, and the file at that path must be the very file
    that was opened (same device and inode): a link re-pointed after the open is refused.
    """
    try:
        target = Path(os.path.realpath(link, strict=True))
        at_target = os.stat(target)
    except OSError as e:
        return f"a symbolic link that does not resolve ({e.strerror})"
    same = (at_target.st_dev, at_target.st_ino) == (opened.st_dev, opened.st_ino)
    if not same or not any(target.is_relative_to(root) for root in roots):
        return "a symbolic link to a file outside the adapter directory"
    return None


def _allowed_roots(directory: safefs.Directory) -> list[Path]:
    """Where a symlink in the adapter directory may point: the directory itself and, for a Hugging
    Face cache snapshot (``models--org--name/snapshots/<sha>/…``), that repo's ``blobs/``."""
    real = Path(os.path.realpath(directory.path))
    try:
        if (os.stat(real).st_dev, os.stat(real).st_ino) != directory.identity:
            return []  # the path now names another directory: follow no link at all
    except OSError:
        return []
    roots = [real]
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and "--" in parts[i - 1]:
            roots.append(Path(*parts[:i]) / "blobs")
            break
    return roots


def _make_subdir(dst: safefs.Directory, name: str) -> None:
    st = dst.lstat(name)
    if st is None:
        os.mkdir(name, dir_fd=dst.fd)
    elif not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{dst.path / name}: exists and is not a directory")


@contextmanager
def _open_subdir(dir_fd: int, name: str, where: Path) -> Iterator[safefs.Directory]:
    """A subdirectory through its parent's descriptor, never through a symlink."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{where}: is a symbolic link") from None
        raise AdapterError(safefs.os_error(where, e)) from None
    with safefs.Directory(where, AdapterError, fd=fd) as directory:
        yield directory


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AdapterError(safefs.os_error(path, e)) from None


@contextmanager
def rewrite_lock(directory: safefs.Directory, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive lock on the adapter directory from reading the adapter to replacing it.

    A second run on the same adapter waits here, then reads what the first one wrote and sees its
    provenance: it reports the no-op or refuses, and never projects the original a second time. It
    is flock(2) on the directory's descriptor: no lock file to create (read-only directories still
    give their own error) or leave behind, and the kernel releases it when the holder dies, even by
    SIGKILL. ``on_wait`` is called once if another run holds the lock.
    """
    try:
        try:
            fcntl.flock(directory.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(directory.fd, fcntl.LOCK_EX)
    except OSError as e:
        raise InPlaceError(f"{directory.path}: cannot lock the adapter directory ({e.strerror})") from None
    try:
        yield
    finally:
        fcntl.flock(directory.fd, fcntl.LOCK_UN)


def atomic_replace(
    directory: safefs.Directory,
    name: str,
    chunks: Sequence[stfile.Data],
    mode: int = 0o644,
    *,
    expect: os.stat_result | None = None,
) -> None:
    """Replace ``name`` in ``directory`` in place, so that readers and crashes see old or new, never a mix.

    ``atomic.finish``, then the directory is fsync'd. With ``expect``, the rename happens only if
    ``name`` is still that very file: a file swapped or edited since it was read is never overwritten.
    """
    target = directory.path / name
    try:
        fd, tmp = atomic.create_temp(directory, name)
    except OSError as e:
        raise InPlaceError(f"{directory.path}: cannot create a file here ({e.strerror})") from None
    try:
        atomic.finish(directory, fd, tmp, name, chunks, mode, expect)
    except atomic.Changed:
        raise AdapterError(
            f"{target}: changed on disk while safelora was running; nothing was written. Run again"
        ) from None
    except OSError as e:
        raise InPlaceError(
            f"{target}: write failed ({e.strerror}); the original file is unchanged. Free some space"
        ) from None
    # After the rename the new file is in place: a failure now must not claim the old one survived.
    try:
        stfile.fsync(directory.fd)
    except OSError as e:
        raise AdapterError(
            f"{target}: written, but syncing {directory.path} failed ({e.strerror}); a crash may still undo the write"
        ) from None


@dataclass
class Named:
    """An adapter directory as the user named it, opened once (or why it could not be)."""

    path: Path
    dir: safefs.Directory | None
    error: AdapterError | None = None
    notes: list[str] = field(default_factory=list)


def expand(specs: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str | None]]:
    """Adapter paths from what the user gave, each with a note when it came from a pattern.

    A path that exists is taken literally, even if it holds ``*``, ``?`` or ``[``; a pattern is
    expanded (sorted, directories only) only when no such path exists; one that matches no directory
    is a usage error.
    """
    out: list[tuple[Path, str | None]] = []
    for spec in specs:
        text = os.fspath(spec)
        if os.path.lexists(text) or not glob.has_magic(text):
            out.append((Path(text), None))
            continue
        matches = [m for m in sorted(glob.glob(text)) if os.path.isdir(m)]
        if not matches:
            raise UsageError(f"{text!r}: no such directory, and as a pattern it matches no adapter directory")
        note = f"{text!r} matched {len(matches)} director{'y' if len(matches) == 1 else 'ies'}: " + ", ".join(matches)
        out.extend((Path(m), note) for m in matches)
    return out


@contextmanager
def open_all(specs: Sequence[str | os.PathLike[str]]) -> Iterator[list[Named]]:
    """Expand and open every adapter once; closed on exit.

    The same directory named twice (directly, via ``..`` or a symlink alias, or by two patterns)
    is processed once, with a note: a batch never waits on its own lock.
    """
    with ExitStack() as stack:
        named: list[Named] = []
        seen: dict[tuple[int, int], Named] = {}
        for path, note in expand(specs):
            notes = [note] if note else []
            try:
                directory = stack.enter_context(open_dir(path))
            except AdapterError as e:
                if not any(n.path == path and n.error is not None for n in named):
                    named.append(Named(path, None, e, notes))
                continue
            first = seen.get(directory.identity)
            if first is not None:
                if path != first.path:
                    first.notes.append(f"{path} is the same adapter directory as {first.path}: processed once")
                continue
            seen[directory.identity] = item = Named(path, directory, None, notes)
            named.append(item)
        yield named


def read_config(directory: safefs.Directory) -> LoraConfig:
    """Only the adapter's config (for defaults taken from it)."""
    return _load_config(directory)[0]
