"""Read-only questions about an adapter: what is it (inspect), and was it sanitized (check)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..adapters import PROVENANCE_PREFIX, Adapter, file_digest, load_adapter, opened
from ..adapters.peft_config import MODULES_TO_SAVE
from ..io.safefs import Directory
from ..results import CheckResult, Inspection, SourceInfo
from ..sources import Source, identity
from ..stores.backups import BackupStore


@contextmanager
def _adapter(target: Path | Directory) -> Iterator[Adapter]:
    if isinstance(target, Path):
        with opened(target) as adapter:
            yield adapter
        return
    adapter = load_adapter(target)
    try:
        yield adapter
    finally:
        adapter.close()


def source_info(src: Source, names: Sequence[str] = ()) -> SourceInfo:
    """``src`` as reports and provenance name it, identified by the content of ``names`` (read and
    hashed now unless their digests are known)."""
    tensors = src.digest(names) if names else {}
    content = identity.combined(tensors) if tensors else ""
    return SourceInfo(src.given, src.revision, src.fingerprint(), src.public_name(), tensors, content)


def _recorded(recorded: Mapping[str, str], role: str) -> dict[str, str] | None:
    """The digest map provenance records for ``role`` (``safelora.base_tensors``…), or None."""
    return identity.parse_map(recorded.get(f"{PROVENANCE_PREFIX}{role}_tensors"))


def same_pair(recorded: Mapping[str, str], base: Source, aligned: Source) -> bool:
    """Whether provenance ``recorded`` names this (base, aligned) pair: the one place it is decided.

    By content: each checkpoint must hold every tensor the stamp lists (``safelora.base_tensors``,
    ``safelora.aligned_tensors``), with the same digest of dtype, shape and bytes; paths, inodes,
    times and where the files came from (a copy, a Hugging Face cache snapshot, the Hub) do not
    count. Digests the source does not know yet (``Source.digests``, filled from a memo by whoever
    opened it) are read and hashed now, those tensors only. A stamp that lists no tensors proves
    no pair, except one written before content identity (no map at all), compared by name as then.
    """
    for role, src in (("base", base), ("aligned", aligned)):
        tensors = _recorded(recorded, role)
        if tensors is None:
            if f"{PROVENANCE_PREFIX}{role}_tensors" in recorded:
                return False  # present but malformed
            legacy = f"{src.label}@{src.revision or src.fingerprint()}"
            if recorded.get(PROVENANCE_PREFIX + role) != legacy:
                return False
            continue
        names = src.names()
        if not tensors or not all(name in names for name in tensors):
            return False
        if src.digest(sorted(tensors)) != tensors:
            return False
    return True


def recorded_infos(recorded: Mapping[str, str], base: Source, aligned: Source) -> tuple[SourceInfo, SourceInfo]:
    """The pair as a no-op run reports it: identified by the tensors provenance lists (known by now)."""
    return (
        source_info(base, sorted(_recorded(recorded, "base") or {})),
        source_info(aligned, sorted(_recorded(recorded, "aligned") or {})),
    )


def check(target: Path | Directory, pair: tuple[Source, Source] | None = None) -> CheckResult:
    """Whether the adapter carries valid provenance, is unmodified since, and (optionally) used ``pair``
    (the base and aligned checkpoints, compared by ``same_pair``)."""
    with _adapter(target) as adapter:
        return _check(adapter, pair)


def _check(adapter: Adapter, pair: tuple[Source, Source] | None) -> CheckResult:
    adapter_path = adapter.path
    prov = adapter.provenance()
    if not prov:
        return CheckResult(adapter_path, "never_sanitized", "no safelora provenance: never sanitized", prov)
    recorded = prov.get(PROVENANCE_PREFIX + "digest")
    if recorded is None or recorded != file_digest(adapter):
        return CheckResult(
            adapter_path,
            "modified",
            "tensors differ from what safelora wrote: modified since it was sanitized",
            prov,
        )
    if pair is not None and not same_pair(prov, *pair):
        had = (prov.get(PROVENANCE_PREFIX + "base"), prov.get(PROVENANCE_PREFIX + "aligned"))
        return CheckResult(
            adapter_path,
            "other_pair",
            f"sanitized against {had[0]} → {had[1]}, not {pair[0].given} → {pair[1].given} "
            "(the weights it was projected with differ from these)",
            prov,
        )
    return CheckResult(adapter_path, "sanitized", _sanitized_line(adapter), prov)


def _sanitized_line(adapter: Adapter) -> str:
    prov = adapter.provenance()
    projected = adapter.provenance_value("projected", "[]", (list,))
    return (
        f"sanitized by safelora {prov.get(PROVENANCE_PREFIX + 'version')} against "
        f"{prov.get(PROVENANCE_PREFIX + 'base')} → {prov.get(PROVENANCE_PREFIX + 'aligned')} "
        f"({len(projected)} modules projected)"
    )


def inspect(target: Path | Directory, store: BackupStore | None = None) -> Inspection:
    """Describe an adapter without reading any checkpoint (or any tensor); with ``store``, whether
    the original of a projected adapter is kept there."""
    with _adapter(target) as adapter:
        return _inspection(adapter, store)


def _inspection(adapter: Adapter, store: BackupStore | None) -> Inspection:
    keys = list(adapter.header.tensors)
    original = adapter.provenance().get(PROVENANCE_PREFIX + "original")
    return Inspection(
        adapter=adapter.path,
        modules=len(adapter.modules),
        ranks=dict(sorted(Counter(m.rank for m in adapter.modules).items())),
        dtypes=dict(Counter(e.dtype for e in adapter.header.tensors.values())),
        size_bytes=adapter.stat.st_size,
        target_modules=adapter.config.target_modules,
        base_model=adapter.config.base_model_name_or_path,
        dora=adapter.dora,
        embeddings=any("lora_embedding_" in k for k in keys),
        modules_to_save=any(why == MODULES_TO_SAVE for _, why in adapter.skipped),
        skipped=adapter.skipped,
        provenance=adapter.provenance(),
        backup=store.find(original) if store is not None else None,
    )
