"""Read-only questions about an adapter: what is it (inspect), and was it sanitized (check)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..adapters import PROVENANCE_PREFIX, Adapter, file_digest, load_adapter, opened
from ..adapters.peft_config import MODULES_TO_SAVE
from ..io.safefs import Directory
from ..results import CheckResult, Inspection
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


def check(target: Path | Directory, pair: tuple[str, str] | None = None) -> CheckResult:
    """Whether the adapter carries valid provenance, is unmodified since, and (optionally) used ``pair``.

    ``pair`` is the (base, aligned) identity as provenance records it (``source@revision-or-fingerprint``).
    """
    with _adapter(target) as adapter:
        return _check(adapter, pair)


def _check(adapter: Adapter, pair: tuple[str, str] | None) -> CheckResult:
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
    if pair is not None:
        had = (prov.get(PROVENANCE_PREFIX + "base"), prov.get(PROVENANCE_PREFIX + "aligned"))
        if had != pair:
            return CheckResult(
                adapter_path,
                "other_pair",
                f"sanitized against {had[0]} → {had[1]}, not {pair[0]} → {pair[1]}",
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
