"""What safelora's runs return: frozen data, each with the JSON document the command line prints.

Nothing here computes or renders: the flow (``run/``) builds these, ``outputs/`` turns them into
Markdown, cards and charts, and ``api`` re-exports them. So this module imports no other part of
the package, and every part may import it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._version import __version__

# The same choices ``projection.select`` takes; spelled here too so results need no torch.
Mode = Literal["threshold", "number"]
Precision = Literal["float32", "float64"]
Device = Literal["auto", "cpu", "cuda"]
# Whether a ``project`` run projected the adapter, or found it already was that projection.
RunStatus = Literal["projected", "unchanged"]
CheckStatus = Literal["sanitized", "never_sanitized", "modified", "other_pair", "unverified", "outside_policy"]
# How a ``sanitized`` verdict was verified (None for any other verdict).
VerifiedBy = Literal["local-record", "recomputation", "trust-stamp", "signature"]


def finite(x: float | None) -> float | None:
    """The JSON report's rule: a number that is not finite is no number (null)."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class Settings:
    """How to project; everything a run's outcome depends on besides its inputs."""

    mode: Mode = "threshold"
    threshold: float = 0.5
    num_layers: int | None = None
    precision: Precision = "float32"
    device: Device = "auto"
    allow_dora: bool = False
    force: bool = False
    dry_run: bool = False
    output: Path | None = None
    backup: bool = True  # an in-place run keeps the original in the backup store first
    model_card: bool = False  # write the Safe LoRA section into the written adapter's README.md
    allow_checkpoint: bool = False  # rewrite the adapter of a Trainer checkpoint in place


@dataclass(frozen=True)
class SourceInfo:
    """A checkpoint as a run used it.

    ``source`` is the spec as the user gave it (a relative path stays relative: reports only);
    ``name`` is what published files call it (a local directory's base name, a Hub repo id);
    ``tensors`` maps each tensor the run used to its content digest, ``content`` is one digest over
    that map (see ``sources/identity.py``). ``fingerprint`` is the local files' stat or the commit.
    """

    source: str
    revision: str | None
    fingerprint: str
    name: str = ""
    tensors: Mapping[str, str] = field(default_factory=dict)
    content: str = ""

    @property
    def identity(self) -> str:
        """How provenance names the source, with nothing of this machine in it: ``repo@sha`` for a Hub
        commit, ``name@blake3:<content digest, 16 hex>`` for local files."""
        name = self.name or self.source
        if self.revision:
            return f"{name}@{self.revision}"
        return f"{name}@blake3:{self.content[:16]}" if self.content else f"{name}@{self.fingerprint}"

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "content": self.content or None,
            "tensors": len(self.tensors),
        }


@dataclass(frozen=True)
class LayerResult:
    module: str
    layer: int | None
    similarity: float | None
    projected: bool
    reason: str | None
    norm_ratio: float | None
    cached: bool = False  # the operator came from the projection cache

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "layer": self.layer,
            "similarity": finite(self.similarity),
            "projected": self.projected,
            "reason": self.reason,
            "norm_ratio": finite(self.norm_ratio),
            "cached": self.cached,
        }


@dataclass(frozen=True)
class CacheUse:
    """How the projection cache served a run: its pair key, entries read, entries computed."""

    pair: str
    served: int
    computed: int

    def to_json(self) -> dict[str, Any]:
        return {"pair": self.pair, "served": self.served, "computed": self.computed}


@dataclass(frozen=True)
class Backup:
    """One original in the backup store."""

    sha256: str
    path: Path
    nbytes: int
    adapters: dict[str, float]  # absolute adapter directory → when it was backed up (Unix time)
    results: list[str] = field(default_factory=list)  # stamp digests of the results written from it

    @property
    def created(self) -> float:
        return min(self.adapters.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """The backup as ``safelora cache ls --json`` lists it: each adapter with when it was kept (UTC)."""
        return {
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "path": str(self.path),
            "adapters": [{"adapter": a, "kept": _date(t)} for a, t in sorted(self.adapters.items())],
            "results": list(self.results),
        }


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True)
class Report:
    """Everything a run did, for the table, the JSON document and the tests."""

    adapter: Path
    output: Path | None
    written: bool
    dry_run: bool
    base: SourceInfo
    aligned: SourceInfo
    mode: Mode
    threshold: float | None
    num_layers: int | None
    layers: list[LayerResult]
    skipped: list[tuple[str, str]]
    seconds: float
    bytes_read: int
    device: str
    notes: list[str] = field(default_factory=list)
    cache: CacheUse | None = None
    bytes_downloaded: int = 0
    backup: Backup | None = None  # the kept original this adapter's provenance names
    backup_created: bool = False  # kept by this run (else kept by an earlier one, or none)
    precision: Precision = "float32"
    attestation: Path | None = None  # the signed attestation written beside the result (--sign-key)
    signed_by: str | None = None  # the id of the key that signed it
    # "unchanged": the adapter already was this projection (a verified rerun); the layers are its stamp's.
    status: RunStatus = "projected"
    layers_known: bool = True  # False: an unchanged adapter whose stamp predates the per-module record

    @property
    def projected_count(self) -> int:
        return sum(layer.projected for layer in self.layers)

    @property
    def median_norm_ratio(self) -> float | None:
        """The median ‖CB‖/‖B‖ of the projected modules: how much of the fine-tune's update they keep."""
        ratios = sorted(r for layer in self.layers if layer.projected and (r := finite(layer.norm_ratio)) is not None)
        if not ratios:
            return None
        mid = len(ratios) // 2
        return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2

    def to_json(self) -> dict[str, Any]:
        """The document ``safelora project --json`` prints (see the README's "The JSON report"); every
        number in it is finite or null."""
        return {
            "safelora_version": __version__,
            "adapter": str(self.adapter),
            "output": str(self.output) if self.output else None,
            "written": self.written,
            "dry_run": self.dry_run,
            "base": self.base.to_json(),
            "aligned": self.aligned.to_json(),
            "mode": self.mode,
            "threshold": finite(self.threshold),
            "num_layers": self.num_layers,
            "status": self.status,
            "layer_count": len(self.layers) if self.layers_known else None,
            "projected_count": self.projected_count if self.layers_known else None,
            "median_norm_ratio": finite(self.median_norm_ratio),
            "layers": [layer.to_json() for layer in self.layers] if self.layers_known else None,
            "skipped": [{"key": key, "reason": reason} for key, reason in self.skipped],
            "notes": self.notes,
            "device": self.device,
            "bytes_read": self.bytes_read,
            "bytes_downloaded": self.bytes_downloaded,
            "cache": self.cache.to_json() if self.cache is not None else None,
            "precision": self.precision,
            "backup": (
                {"sha256": self.backup.sha256, "bytes": self.backup.nbytes, "created": self.backup_created}
                if self.backup is not None
                else None
            ),
            "seconds": round(self.seconds, 3),
            "attestation": (
                {"path": str(self.attestation), "keyid": self.signed_by} if self.attestation is not None else None
            ),
        }


@dataclass(frozen=True)
class Signed:
    """What ``safelora sign`` did: the attestation written, the key, and how the adapter was verified first."""

    adapter: Path
    attestation: Path
    keyid: str
    verified_by: VerifiedBy

    def to_json(self) -> dict[str, Any]:
        return {
            "safelora_version": __version__,
            "adapter": str(self.adapter),
            "attestation": str(self.attestation),
            "keyid": self.keyid,
            "verified_by": self.verified_by,
        }


@dataclass(frozen=True)
class CheckResult:
    """The verdict of ``safelora check``; ``ok`` is exit 0, anything else exit 3."""

    adapter: Path
    status: CheckStatus
    message: str
    provenance: dict[str, str]
    verified_by: VerifiedBy | None = None
    notes: list[str] = field(default_factory=list)
    signed_by: str | None = None  # the id of the trusted key whose signature verified it
    # ``provenance`` as the JSON shows it: an entry that holds a JSON list or object, decoded.
    structured: Mapping[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "sanitized"

    def to_json(self) -> dict[str, Any]:
        return {
            "safelora_version": __version__,
            "adapter": str(self.adapter),
            "ok": self.ok,
            "status": self.status,
            "message": self.message,
            "verified_by": self.verified_by,
            "signed_by": self.signed_by,
            "notes": list(self.notes),
            "provenance": dict(self.provenance if self.structured is None else self.structured),
        }


@dataclass(frozen=True)
class Inspection:
    """What an adapter is, as ``safelora inspect`` shows it."""

    adapter: Path
    modules: int
    ranks: dict[int, int]  # rank -> number of modules
    dtypes: dict[str, int]  # dtype -> number of tensors
    size_bytes: int
    target_modules: list[str] | str | None
    base_model: str | None
    dora: bool
    embeddings: bool
    modules_to_save: bool
    skipped: list[tuple[str, str]]
    provenance: dict[str, str]
    backup: Backup | None = None  # the kept original its provenance names, when the store holds it
    structured: Mapping[str, Any] | None = None  # ``provenance`` as the JSON shows it (see ``CheckResult``)

    def to_json(self) -> dict[str, Any]:
        return {
            "safelora_version": __version__,
            "adapter": str(self.adapter),
            "modules": self.modules,
            "ranks": {str(r): n for r, n in self.ranks.items()},
            "dtypes": self.dtypes,
            "size_bytes": self.size_bytes,
            "target_modules": self.target_modules,
            "base_model_name_or_path": self.base_model,
            "dora": self.dora,
            "embeddings": self.embeddings,
            "modules_to_save": self.modules_to_save,
            "skipped": [{"key": key, "reason": reason} for key, reason in self.skipped],
            "provenance": dict(self.provenance if self.structured is None else self.structured),
            "backup": self.backup.to_json() if self.backup is not None else None,
        }


@dataclass(frozen=True)
class Restored:
    """What ``restore`` did for one adapter."""

    adapter: Path
    backup: Backup
    notes: list[str] = field(default_factory=list)
    unchanged: bool = False  # the adapter already was its kept original: nothing was written

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter),
            "restored": not self.unchanged,
            "status": "unchanged" if self.unchanged else "restored",
            "sha256": self.backup.sha256,
            "bytes": self.backup.nbytes,
            "notes": list(self.notes),
        }
