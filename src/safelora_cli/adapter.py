"""PEFT LoRA adapters: reading keys and config, and rewriting the weights file atomically."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import stfile
from .errors import AdapterError
from .patterns import ConfigPatterns, saved
from .sources import parse_ref

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PROVENANCE_PREFIX = "safelora."
TMP_MARK = ".safelora-tmp-"

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
    """An adapter directory read into memory (adapters are megabytes, not gigabytes)."""

    path: Path
    config: LoraConfig
    header: stfile.Header
    data: bytearray = field(repr=False)
    modules: list[LoraModule]
    skipped: list[tuple[str, str]]
    dora: bool
    warnings: list[str]

    @property
    def file(self) -> Path:
        return self.path / ADAPTER_FILE

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.header.tensors[key]
        return stfile.tensor_from_bytes(entry, memoryview(self.data)[entry.start : entry.end])

    def provenance(self) -> dict[str, str]:
        """The ``safelora.*`` metadata a previous run left, if any."""
        return {k: v for k, v in self.header.metadata.items() if k.startswith(PROVENANCE_PREFIX)}

    def provenance_value(self, name: str, default: str, types: tuple[type, ...]) -> Any:
        """The JSON value a previous run recorded under ``safelora.<name>`` (``default`` if absent)."""
        key = PROVENANCE_PREFIX + name
        try:
            value = json.loads(self.header.metadata.get(key, default))
        except (json.JSONDecodeError, RecursionError):
            value = None
            types = ()
        if not isinstance(value, types):
            raise AdapterError(
                f"{self.file}: provenance {key} is not what safelora writes; the metadata was edited by hand "
                "or by another tool. Start from the original adapter"
            )
        return value


def _load_config(path: Path) -> tuple[LoraConfig, dict[str, Any]]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        what = "not a file" if cfg_path.exists() else "missing"
        raise AdapterError(f"{cfg_path}: {what}; pass a PEFT adapter directory (adapter_config.json + {ADAPTER_FILE})")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(
            f"{cfg_path}: not valid JSON ({e.__class__.__name__}); restore it from your training run"
        ) from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; Safe LoRA applies to LoRA adapters only")
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
    return config, raw


def _str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(t, str) for t in x)


def _require_dir(path: Path) -> None:
    if path.is_dir():
        return
    ref = None if path.exists() else parse_ref(str(path))
    if ref is not None and ref.revision is None:
        # A Hub repo id (``org/name``) given where a directory is expected: say what to do instead.
        raise AdapterError(
            f"{path}: no such directory, and adapters are local directories; download it first "
            f"(huggingface-cli download {path} --local-dir DIR) and pass --adapter DIR"
        )
    what = "does not exist" if not path.exists() else "is not a directory"
    raise AdapterError(f"{path}: {what}; pass a PEFT adapter directory")


def load_adapter(path: Path) -> Adapter:
    """Read and check an adapter directory; raises ``AdapterError`` naming the file or tensor."""
    _require_dir(path)
    config, _ = _load_config(path)
    file = path / ADAPTER_FILE
    if not file.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(f"{path}: only adapter_model.bin; re-save the adapter with safe_serialization=True")
        what = "not a file" if file.exists() else "missing"
        raise AdapterError(f"{file}: {what}; pass a PEFT adapter directory")
    try:
        data = bytearray(file.read_bytes())
    except OSError as e:
        raise AdapterError(f"{file}: cannot read ({e.strerror})") from None
    n = stfile.header_length(bytes(data[:8]), str(file), len(data))
    header = stfile.parse_header(bytes(data[8 : 8 + n]), str(file), len(data))
    modules, skipped, dora = _parse_keys(file, header, config)
    warnings = []
    init = config.init_lora_weights
    if isinstance(init, str) and init.split("_")[0].lower() in _CONVERTED_INITS:
        warnings.append(
            f"init_lora_weights={init!r}: B·A is the update only if the adapter was saved with PEFT's "
            "conversion (path_initial_model_for_weight_conversion)"
        )
    return Adapter(path, config, header, data, modules, skipped, dora, warnings)


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
        if not entry.torch_dtype.is_floating_point:
            raise AdapterError(
                f"{file}: {key} is {entry.dtype}, not floating point; Safe LoRA needs the trained LoRA weights "
                "(save the adapter from your training run in float32, float16 or bfloat16)"
            )
        pairs.setdefault(m["module"], {})[m["part"]] = key
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
    if not config.targets(module):
        raise AdapterError(
            f"{file}: holds LoRA weights for {module!r} but target_modules={config.target_modules!r} "
            "does not name it; config and weights do not belong together"
        )
    layer = config.layer(module)
    if config.layers_to_transform is not None and layer not in config.layers_to_transform:
        raise AdapterError(
            f"{file}: holds LoRA weights for {module!r} but layers_to_transform="
            f"{config.layers_to_transform} excludes layer {layer}"
        )
    return LoraModule(module, a_key, b_key, rank, layer)


def digest(blobs: Mapping[str, stfile.Blob]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(blobs):
        b = blobs[name]
        h.update(f"{name}\0{b.dtype}\0{list(b.shape)}\0{len(b.data)}\n".encode())
        h.update(b.data)
    return h.hexdigest()


def file_digest(adapter: Adapter) -> str:
    """``digest`` of the adapter file as it is on disk."""
    return digest(_blobs(adapter, {}))


def _blobs(adapter: Adapter, replacements: Mapping[str, torch.Tensor]) -> dict[str, stfile.Blob]:
    data = memoryview(adapter.data)
    blobs: dict[str, stfile.Blob] = {}
    for name, e in sorted(adapter.header.tensors.items(), key=lambda kv: kv[1].start):
        new = replacements.get(name)
        raw = bytes(data[e.start : e.end]) if new is None else stfile.tensor_bytes(new)
        blobs[name] = stfile.Blob(e.dtype, e.shape, raw)
    return blobs


def write_adapter(
    adapter: Adapter,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    output: Path | None,
    *,
    overwrite_output: bool = False,
) -> Path:
    """Write the patched weights; returns the file written.

    In place: a temp file in the adapter's own directory, fsync, ``os.replace``, fsync the directory,
    so a crash leaves either the old file or the new one. With ``output``: a complete adapter
    directory (every other file copied) and the source left untouched. Every tensor not in
    ``replacements`` is copied byte for byte; replacements keep their original dtype.
    """
    for key, t in replacements.items():
        e = adapter.header.tensors[key]
        if tuple(t.shape) != e.shape or t.dtype != e.torch_dtype:
            raise AssertionError(f"replacement for {key} changed shape or dtype")
    blobs = _blobs(adapter, replacements)
    metadata = {k: v for k, v in adapter.header.metadata.items() if not k.startswith(PROVENANCE_PREFIX)}
    metadata.update(provenance)
    metadata[PROVENANCE_PREFIX + "digest"] = digest(blobs)
    chunks = stfile.serialize(blobs, metadata)
    mode = adapter.file.stat().st_mode & 0o777
    if output is not None:
        return _write_output(adapter.path, output, chunks, mode, overwrite_output)
    target = adapter.path / ADAPTER_FILE
    atomic_write(target, chunks, mode=mode)
    return target


def _write_output(src: Path, output: Path, chunks: list[bytes], mode: int, overwrite: bool) -> Path:
    """A complete adapter directory at ``output``: the new weights and a copy of every other file.

    A new or empty ``output`` appears whole or not at all: the directory is assembled beside it and
    renamed into place, so a failure or a crash leaves it as it was (a killed run's temp directory
    is removed by the next run that writes there). Reusing a non-empty one (--force) copies the
    files into it one by one, the weights atomically.
    """
    if output.resolve() == src.resolve():
        raise AdapterError(f"{output}: is the adapter directory itself; drop --output to patch in place")
    if output.exists() and not output.is_dir():
        raise AdapterError(f"{output}: exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise AdapterError(f"{output}: exists and is not empty; choose another --output or pass --force")
        _copy_files(src, output, output)
        atomic_write(output / ADAPTER_FILE, chunks, mode=mode)
        return output / ADAPTER_FILE
    parent = output.absolute().parent
    prefix = f".{output.name}{TMP_MARK}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(parent, prefix)
        # Made by mkdir, not mkdtemp (0700), so it ends up with the mode any new directory would get.
        staging = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as e:
        raise AdapterError(f"{output}: cannot write ({e.strerror}); choose a writable --output") from None
    try:
        _copy_files(src, staging, output)
        with (staging / ADAPTER_FILE).open("xb") as f:
            for chunk in chunks:
                f.write(chunk)
            os.fchmod(f.fileno(), mode)
        for path in (*staging.rglob("*"), staging):
            if not path.is_symlink():
                stfile.fsync(path)
        os.rename(staging, output)  # onto a missing or an empty directory, never a full one
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise AdapterError(
            f"{output}: write failed ({e.strerror}); nothing was written there. Free some space or choose "
            "another --output"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        stfile.fsync(parent)
    except OSError as e:
        raise AdapterError(
            f"{output}: written, but syncing {parent} failed ({e.strerror}); a crash may still undo the write"
        ) from None
    return output / ADAPTER_FILE


def _copy_files(src: Path, dst: Path, output: Path) -> None:
    """Every file of the adapter directory but its weights (and our temp files) into ``dst``."""
    try:
        for item in src.iterdir():
            if item.name == ADAPTER_FILE or TMP_MARK in item.name:
                continue
            if item.is_dir():
                shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, dst / item.name)
    except OSError as e:
        raise AdapterError(f"{output}: cannot write ({e.strerror}); choose a writable --output") from None


@contextmanager
def rewrite_lock(path: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive lock on the adapter directory from reading the adapter to replacing it.

    A second run on the same adapter waits here, then reads what the first one wrote and sees its
    provenance: it reports the no-op or refuses, and never projects the original a second time. It
    is flock(2) on the directory itself: no lock file to create (read-only directories still give
    their own error) or leave behind, and the kernel releases it when the holder dies, even by SIGKILL.
    ``on_wait`` is called once if another run holds the lock.
    """
    _require_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise AdapterError(f"{path}: cannot open the adapter directory ({e.strerror})") from None
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise AdapterError(
                f"{path}: cannot lock the adapter directory ({e.strerror}); pass --output DIR on a local disk"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _test_pause() -> None:
    """Test-only: SAFELORA_TEST_WRITE_DELAY (seconds) stretches each step of ``atomic_write`` so that
    tests/test_processes.py can land SIGKILL between the steps. Unset, as outside the tests, it does nothing."""
    delay = os.environ.get("SAFELORA_TEST_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))


def atomic_write(target: Path, chunks: list[bytes], mode: int = 0o644) -> None:
    """Replace ``target`` with ``chunks`` so that readers and crashes see old or new, never a mix."""
    directory = target.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}{os.getpid()}-", dir=directory)
    except OSError as e:
        raise AdapterError(f"{directory}: cannot create a file here ({e.strerror}); use --output DIR") from None
    tmp = Path(tmp_name)
    try:
        _test_pause()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                _test_pause()
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        _test_pause()
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AdapterError(
            f"{target}: write failed ({e.strerror}); the original file is unchanged. Free some space or pass "
            "--output DIR"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # After the rename the new file is in place: a failure now must not claim the old one survived.
    try:
        stfile.fsync(directory)
    except OSError as e:
        raise AdapterError(
            f"{target}: written, but syncing {directory} failed ({e.strerror}); a crash may still undo the write"
        ) from None


def clean_stale_temps(directory: Path, prefix: str = f".{ADAPTER_FILE}{TMP_MARK}") -> list[Path]:
    """Remove the temp files (or directories) that killed runs left in ``directory``; returns them.

    A temp name is ``prefix`` then the pid that made it; those of live processes (a concurrent
    run) are kept.
    """
    removed = []
    for p in directory.glob(f"{glob.escape(prefix)}*"):
        pid = p.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
