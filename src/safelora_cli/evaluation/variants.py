"""The adapters ``eval`` compares, read through safelora's own adapter reader (never written), and
put on the one loaded model as PEFT adapters to switch between.

An adapter safelora projected carries the sha256 of its original (``safelora.original``); when the
backup store keeps that original and safelora wrote the adapter, as it is now, from it (the binding
``restore`` checks), the original is evaluated too. ``original`` (a directory) names it instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import PROVENANCE_PREFIX, Adapter, file_digest, load_adapter, open_all, opened
from ..errors import AdapterError, EvalModelError
from ..io import ranges, strict
from ..run.binding import bound
from ..stores.backups import BackupStore

FOREIGN_FILES = {".gguf": "GGUF", "adapters.safetensors": "MLX"}


@dataclass
class Weights:
    """One adapter as PEFT will load it: its config (as read) and its weights file's bytes."""

    name: str  # the variant's name
    kind: str  # adapter, original
    path: Path  # the adapter directory (an original: the adapter it is the original of)
    config: dict[str, Any]
    data: bytes = field(repr=False)
    digest: str | None
    source: str | None = None  # an original: backup or given
    original_path: str | None = None


def _bytes(adapter: Adapter) -> bytes:
    size = os.fstat(adapter.handle.fileno()).st_size
    return b"".join(ranges.FileRange(adapter.handle.fileno(), 0, size).chunks())


def _config(adapter: Adapter) -> dict[str, Any]:
    doc = strict.loads(adapter.config_bytes)
    if not isinstance(doc, dict):
        raise AdapterError(f"{adapter.path}: adapter_config.json is not a JSON object")
    return doc


def _refuse_foreign(path: Path) -> None:
    """A GGUF or MLX adapter, named as such (eval loads PEFT adapters only, for now)."""
    try:
        names = os.listdir(path) if path.is_dir() else [path.name]
    except OSError:
        names = []
    for name in names:
        for mark, kind in FOREIGN_FILES.items():
            if name == mark or name.endswith(mark):
                raise AdapterError(
                    f"{path}: a {kind} adapter ({name}); eval loads PEFT adapters only for now: convert it to a "
                    "PEFT adapter directory"
                )


def _peft_only(adapter: Adapter) -> None:
    if adapter.format.name != "PEFT":
        raise AdapterError(
            f"{adapter.path}: a {adapter.format.name} adapter; eval loads PEFT adapters only for now: convert it "
            "to a PEFT adapter directory"
        )


def unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    taken.add(candidate)
    return candidate


@contextmanager
def read_all(specs: list[str], original: str | None, notes: list[str]) -> Iterator[list[Weights]]:
    """Each adapter of ``specs`` and, where one is found, its original, in that order."""
    taken = {"model"}
    found: list[Weights] = []
    with ExitStack() as stack:
        named = stack.enter_context(open_all(specs))
        for entry in named:
            if entry.dir is None:
                _refuse_foreign(entry.path)
                raise entry.error or AdapterError(f"{entry.path}: cannot be read")
            try:
                adapter = load_adapter(entry.dir)
            except AdapterError:
                _refuse_foreign(entry.path)
                raise
            stack.callback(adapter.close)
            _peft_only(adapter)
            name = unique(entry.path.name or str(entry.path), taken)
            found.append(Weights(name, "adapter", entry.path, _config(adapter), _bytes(adapter), file_digest(adapter)))
            kept = _given_original(adapter, Path(original), name, notes) if original else _kept(adapter, name, notes)
            if kept is not None:
                kept.name = unique(f"{name} (original)", taken)
                found.append(kept)
        yield found


def _kept(adapter: Adapter, name: str, notes: list[str]) -> Weights | None:
    """The adapter's original from the backup store, when safelora wrote the adapter from it."""
    provenance = adapter.provenance()
    sha = provenance.get(PROVENANCE_PREFIX + "original")
    if sha is None:
        if provenance:
            notes.append(
                f"{name}: safelora projected it without keeping its original (written as a copy, or with backups "
                "off); give the original's directory to compare with it"
            )
        return None
    store = BackupStore()
    if (problem := store.problem()) is not None:
        notes.append(f"{name}: its original is not evaluated: {problem}")
        return None
    backup = store.find(sha)
    if backup is None:
        notes.append(f"{name}: its original (sha256 {sha[:12]}…) is not in the backup store {store.root}")
        return None
    if not bound(adapter, backup):
        notes.append(
            f"{name}: changed since safelora wrote it from its original (backup {sha[:12]}): the original "
            "is not evaluated"
        )
        return None
    with store.open(backup) as f:
        data = b"".join(ranges.FileRange(f.fileno(), 0, backup.nbytes).chunks())
    return Weights(
        "", "original", adapter.path, _config(adapter), data, None, source="backup", original_path=str(backup.path)
    )


def _given_original(adapter: Adapter, path: Path, name: str, notes: list[str]) -> Weights:
    """The original named by a directory; a note when its lora_A tensors are not the adapter's
    (projection changes lora_B only, so it is then not this adapter's original)."""
    with opened(path) as original:
        _peft_only(original)
        mine = {m.module: m for m in adapter.modules}
        theirs = {m.module: m for m in original.modules}
        same = mine.keys() == theirs.keys() and all(
            torch.equal(adapter.tensor(m.a_key), original.tensor(theirs[k].a_key)) for k, m in mine.items()
        )
        if not same:
            notes.append(
                f"{name}: the original {path} has other modules or lora_A tensors: it is not this adapter before "
                "projection"
            )
        return Weights(
            "", "original", adapter.path, _config(original), _bytes(original), file_digest(original), "given", str(path)
        )


def attach(model: Any, weights: list[Weights], model_spec: str) -> tuple[Any, dict[str, str]]:
    """``model`` wrapped as a PEFT model holding every adapter of ``weights``; and the PEFT adapter
    name of each variant. An adapter that does not fit the model is refused in one line."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    lora_config: Any = LoraConfig  # peft's classmethods are untyped
    from safetensors.torch import load as load_safetensors

    names: dict[str, str] = {}
    peft_model: Any = None
    for i, w in enumerate(weights):
        adapter_name = f"variant{i}"
        where = f"{w.path}" if w.kind == "adapter" else f"{w.original_path}"
        try:
            config = lora_config.from_peft_type(**lora_config.check_kwargs(**w.config))
            config.inference_mode = True
            if peft_model is None:
                peft_model = PeftModel(model, config, adapter_name=adapter_name)
            else:
                peft_model.add_adapter(adapter_name, config)
            state = load_safetensors(w.data)
            result: Any = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
        except (ValueError, RuntimeError, TypeError, KeyError) as e:
            raise EvalModelError(
                f"{where}: does not fit the model {model_spec} ({_short(e)}); was it trained on it?"
            ) from None
        unplaced = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k or k.endswith(f".{adapter_name}")]
        if unplaced or missing:
            example = (unplaced or missing)[0]
            raise EvalModelError(
                f"{where}: does not fit the model {model_spec}: {len(unplaced)} of its tensors have no place in it and "
                f"{len(missing)} of its modules got no weights (e.g. {example}); was it trained on another model?"
            )
        names[w.name] = adapter_name
    if peft_model is not None:
        peft_model.eval()
    return peft_model, names


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("…" if len(text) > 200 else "")
