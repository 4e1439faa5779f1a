"""Read-only questions about an adapter: what is it (inspect), and was it sanitized (check)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapters import PROVENANCE_PREFIX, Adapter, load_adapter, opened
from ..adapters.digest import DIGEST_KEY, STAMP_VERSION, intact, stamp_version
from ..adapters.peft_config import MODULES_TO_SAVE
from ..errors import AdapterError
from ..io import strict
from ..io.safefs import Directory
from ..results import CheckResult, Inspection, SourceInfo
from ..sources import Source, identity
from ..stores.backups import BackupStore

# Recomputes the adapter from its original against the pair: None when it reproduces it, else why not.
Recompute = Callable[[Adapter], str | None]
WAYS_TO_VERIFY = (
    "verify it with the original adapter and the pair (recomputation), a signature, or trust the stamp "
    "(which only guards against accidents)"
)
BASE_KEY = PROVENANCE_PREFIX + "base"
ALIGNED_KEY = PROVENANCE_PREFIX + "aligned"


def verified_by_record(adapter: Adapter, store: BackupStore) -> bool:
    """Whether the stamp is intact and safelora on this machine recorded writing exactly this result."""
    return (
        stamp_version(adapter) == STAMP_VERSION
        and intact(adapter)
        and store.written(adapter.provenance().get(DIGEST_KEY)) is not None
    )


@contextmanager
def _adapter(target: Path | Directory, base: Source | None = None) -> Iterator[Adapter]:
    """The adapter at ``target``, read with ``base``'s config.json at hand (for a format that needs it)."""
    if isinstance(target, Path):
        with opened(target) as adapter:
            yield adapter
        return
    adapter = load_adapter(target, None if base is None else base.model_config)
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
    return same_source(recorded, "base", base) and same_source(recorded, "aligned", aligned)


def same_source(recorded: Mapping[str, str], role: str, src: Source) -> bool:
    """``same_pair`` for one of the two (``role``: ``base`` or ``aligned``)."""
    tensors = _recorded(recorded, role)
    if tensors is None:
        if f"{PROVENANCE_PREFIX}{role}_tensors" in recorded:
            return False  # present but malformed
        legacy = f"{src.label}@{src.revision or src.fingerprint()}"
        return recorded.get(PROVENANCE_PREFIX + role) == legacy
    names = src.names()
    if not tensors or not all(name in names for name in tensors):
        return False
    return src.digest(sorted(tensors)) == tensors


def recorded_infos(recorded: Mapping[str, str], base: Source, aligned: Source) -> tuple[SourceInfo, SourceInfo]:
    """The pair as a no-op run reports it: identified by the tensors provenance lists (known by now)."""
    return (
        source_info(base, sorted(_recorded(recorded, "base") or {})),
        source_info(aligned, sorted(_recorded(recorded, "aligned") or {})),
    )


def check(
    target: Path | Directory,
    pair: tuple[Source, Source] | None = None,
    *,
    store: BackupStore | None = None,
    trust_stamp: bool = False,
    recompute: Recompute | None = None,
) -> CheckResult:
    """Whether the adapter is sanitized by safelora, unmodified since, (optionally) against ``pair``,
    and verified: by ``recompute`` (the original projected again reproduces it), by the local record
    in ``store`` (safelora on this machine wrote these bytes), or, with ``trust_stamp``, by an intact
    stamp alone. Anything else with an intact stamp is ``unverified``.
    """
    with _adapter(target, None if pair is None else pair[0]) as adapter:
        result = check_adapter(adapter, pair, store if store is not None else BackupStore(), trust_stamp, recompute)
    return replace(result, structured=structured(result.provenance))


def structured(provenance: Mapping[str, str]) -> dict[str, Any]:
    """Provenance entries that hold a JSON list or object (``safelora.projected``, ``safelora.layers``,
    the tensor digests), decoded (strictly), for the JSON documents; every other entry as written."""
    out: dict[str, Any] = {}
    for key, value in provenance.items():
        try:
            decoded = strict.loads(value) if value[:1] in ("[", "{") else None
        except strict.InvalidJSON:
            decoded = None
        out[key] = decoded if isinstance(decoded, (list, dict)) else value
    return out


def check_adapter(
    adapter: Adapter,
    pair: tuple[Source, Source] | None,
    store: BackupStore,
    trust_stamp: bool,
    recompute: Recompute | None,
) -> CheckResult:
    """``check`` of an adapter already loaded (``sign`` signs the very files it verified)."""
    path = adapter.path
    prov = adapter.provenance()
    if not prov:
        return CheckResult(path, "never_sanitized", "no safelora provenance: never sanitized", prov)
    version = stamp_version(adapter)
    if version is not None and version != STAMP_VERSION and version.isdigit() and int(version) > int(STAMP_VERSION):
        return CheckResult(
            path, "unverified", f"stamp version {version} is newer than this safelora reads; upgrade safelora", prov
        )
    if not intact(adapter):
        return CheckResult(
            path,
            "modified",
            "tensors, config or stamp differ from what safelora wrote: modified since it was sanitized",
            prov,
        )
    if pair is not None and not same_pair(prov, *pair):
        had = (prov.get(BASE_KEY), prov.get(ALIGNED_KEY))
        return CheckResult(
            path,
            "other_pair",
            f"sanitized against {had[0]} → {had[1]}, not {pair[0].given} → {pair[1].given} "
            "(the weights it was projected with differ from these)",
            prov,
        )
    if version is None:  # a version 1 stamp: the tensors only; only trusted as it is
        notes = ["config not covered"]
        if trust_stamp:
            return CheckResult(path, "sanitized", sanitized_line(prov, adapter.file), prov, "trust-stamp", notes)
        return CheckResult(
            path,
            "unverified",
            "a version 1 stamp (config not covered), which only a trusted stamp passes; project the original "
            "again to stamp it anew",
            prov,
            notes=notes,
        )
    if recompute is not None:
        failed = recompute(adapter)
        if failed is not None:
            return CheckResult(path, "unverified", f"the original does not reproduce it: {failed}", prov)
        return CheckResult(path, "sanitized", sanitized_line(prov, adapter.file), prov, "recomputation")
    if store.written(prov.get(DIGEST_KEY)) is not None:
        return CheckResult(path, "sanitized", sanitized_line(prov, adapter.file), prov, "local-record")
    if trust_stamp:
        return CheckResult(path, "sanitized", sanitized_line(prov, adapter.file), prov, "trust-stamp")
    return CheckResult(
        path,
        "unverified",
        f"stamp intact, but no record of safelora writing it on this machine; {WAYS_TO_VERIFY}",
        prov,
    )


def sanitized_line(prov: Mapping[str, str], where: Path) -> str:
    """``check``'s line for a verified stamp ``prov``: the version, the pair and how many modules were projected."""
    try:
        projected = strict.loads(prov.get(PROVENANCE_PREFIX + "projected", "[]"))
    except strict.InvalidJSON:
        projected = None
    if not isinstance(projected, list):
        raise AdapterError(
            f"{where}: provenance {PROVENANCE_PREFIX}projected is not what safelora writes; the metadata was edited "
            "by hand or by another tool. Start from the original adapter"
        )
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
        structured=structured(adapter.provenance()),
        backup=store.find(original) if store is not None else None,
    )
