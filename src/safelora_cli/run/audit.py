"""Read-only questions about an adapter: what is it (inspect), and was it sanitized (check)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..adapters import PROVENANCE_PREFIX, Adapter, load_adapter, opened
from ..adapters.digest import DIGEST_KEY, STAMP_VERSION, intact, stamp_version
from ..adapters.peft_config import MODULES_TO_SAVE
from ..io.safefs import Directory
from ..results import CheckResult, Inspection, SourceInfo
from ..stores.backups import BackupStore

# Recomputes the adapter from its original against the pair: None when it reproduces it, else why not.
Recompute = Callable[[Adapter], str | None]
WAYS_TO_VERIFY = (
    "verify it with the original adapter and the pair (recomputation), a signature, or trust the stamp "
    "(which only guards against accidents)"
)
BASE_KEY = PROVENANCE_PREFIX + "base"
ALIGNED_KEY = PROVENANCE_PREFIX + "aligned"


def same_pair(recorded: Mapping[str, str], base: SourceInfo, aligned: SourceInfo) -> bool:
    """Whether the stamp ``recorded`` names this base and this aligned model. The one place the
    recorded pair is compared with checkpoints: every caller goes through it."""
    return recorded.get(BASE_KEY) == base.identity and recorded.get(ALIGNED_KEY) == aligned.identity


def verified_by_record(adapter: Adapter, store: BackupStore) -> bool:
    """Whether the stamp is intact and safelora on this machine recorded writing exactly this result."""
    return (
        stamp_version(adapter) == STAMP_VERSION
        and intact(adapter)
        and store.written(adapter.provenance().get(DIGEST_KEY)) is not None
    )


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


def check(
    target: Path | Directory,
    pair: tuple[SourceInfo, SourceInfo] | None = None,
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
    with _adapter(target) as adapter:
        return _check(adapter, pair, store if store is not None else BackupStore(), trust_stamp, recompute)


def _check(
    adapter: Adapter,
    pair: tuple[SourceInfo, SourceInfo] | None,
    store: BackupStore,
    trust_stamp: bool,
    recompute: Recompute | None,
) -> CheckResult:
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
        return CheckResult(
            path,
            "other_pair",
            f"sanitized against {prov.get(BASE_KEY)} → {prov.get(ALIGNED_KEY)}, not {pair[0].identity} → "
            f"{pair[1].identity}",
            prov,
        )
    if version is None:  # a version 1 stamp: the tensors only; only trusted as it is
        notes = ["config not covered"]
        if trust_stamp:
            return CheckResult(path, "sanitized", _sanitized_line(adapter), prov, "trust-stamp", notes)
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
        return CheckResult(path, "sanitized", _sanitized_line(adapter), prov, "recomputation")
    if store.written(prov.get(DIGEST_KEY)) is not None:
        return CheckResult(path, "sanitized", _sanitized_line(adapter), prov, "local-record")
    if trust_stamp:
        return CheckResult(path, "sanitized", _sanitized_line(adapter), prov, "trust-stamp")
    return CheckResult(
        path,
        "unverified",
        f"stamp intact, but no record of safelora writing it on this machine; {WAYS_TO_VERIFY}",
        prov,
    )


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
