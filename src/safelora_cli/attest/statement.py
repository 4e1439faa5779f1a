"""What safelora signs: an in-toto Statement v1 whose subjects are the adapter's files and whose
predicate (``PREDICATE_TYPE``, docs/attestations.md) is how it was sanitized; and how a signed
statement is checked against the files as they are now.

The subjects are every file that changes what the adapter does at inference: the format's own
(``attested_files``: PEFT's ``adapter_model.safetensors`` and ``adapter_config.json``) and, beside
them, the tokenizer's and the chat template's. The predicate carries the stamp safelora wrote into
the weights (every ``safelora.*`` entry), the stamp digest, the covered config, and, derived from
the stamp, the method, the pair's identities, the original's digest and each module's similarity
and decision, for readers that do not parse stamps.

A file whose sha256 differs is accepted in one case only, a re-save that keeps what the adapter
does (PEFT's ``save_pretrained`` rewrites metadata, config formatting and float16 as float32): the
weights and config together must give the attested stamp digest (normalized tensor names, values as
float32, every tensor, the attested stamp entries, the covered config), and the covered config must
be the attested one. Any other file must be byte for byte what was signed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._version import __version__
from ..adapters import PROVENANCE_PREFIX, Adapter
from ..adapters.digest import DIGEST_KEY, stamp_digest
from ..adapters.lora_config import CONFIG_FILE
from ..errors import AdapterError, SafeLoraError
from ..io import ranges, safefs, strict
from ..sources import identity

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://safelora.dev/attestation/v1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class InvalidStatement(ValueError):
    """A signed payload that is not a statement safelora wrote; the message says why."""


def inference_file(name: str) -> bool:
    """Whether a file beside the adapter's own changes inference when present: the tokenizer's, the chat
    template, and any other ``adapter_model*`` (a loader told to may take ``adapter_model.bin`` instead)."""
    return name.startswith(("tokenizer", "chat_template", "adapter_model")) or name in (
        "special_tokens_map.json",
        "added_tokens.json",
    )


def required(adapter: Adapter) -> list[str]:
    """The files a statement about ``adapter`` must name: the format's own, and every inference file there."""
    names = set(adapter.format.attested_files(adapter))
    names.update(n for n in adapter.dir.names() if inference_file(n))
    return sorted(names)


def _sha256(adapter: Adapter, name: str) -> str:
    """The sha256 of ``name`` in the adapter's directory; the weights and config as the adapter read
    them (the file open, the config's bytes in memory), so that what is signed is what was checked."""
    h = hashlib.sha256()
    if name == adapter.file.name and adapter.source is None:
        pieces = ranges.FileRange(adapter.handle.fileno(), 0, adapter.stat.st_size).chunks()
    elif name == CONFIG_FILE and name in adapter.format.attested_files(adapter):
        pieces = iter([adapter.config_bytes])
    else:
        f = adapter.dir.open(name, fix="replace it with a regular file")  # a link: what a loader reads through it
        with f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()
    try:
        for piece in pieces:
            h.update(piece)
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.dir.path / name, e)) from None
    return h.hexdigest()


def _json(raw: str | None, default: Any) -> Any:
    try:
        return strict.loads(raw) if raw is not None else default
    except strict.InvalidJSON:
        return default


def derived(stamp: Mapping[str, str]) -> dict[str, Any]:
    """What the predicate says beside the stamp, read from the stamp (so the two never disagree)."""
    p = PROVENANCE_PREFIX
    mode = stamp.get(p + "mode")
    k = _json(stamp.get(p + "num_layers"), None)
    roles = {}
    for role in ("base", "aligned"):
        tensors = identity.parse_map(stamp.get(f"{p}{role}_tensors")) or {}
        roles[role] = {
            "identity": stamp.get(p + role),
            "content": identity.combined(tensors) if tensors else None,
            "tensors": tensors,
        }
    return {
        "method": {
            "name": "safe-lora",
            "mode": mode,
            "threshold": _json(stamp.get(p + "threshold"), None),
            "numLayers": k if mode == "number" else None,
            "precision": stamp.get(p + "precision"),
        },
        **roles,
        "original": {"sha256": stamp.get(p + "original")},
        "modules": _json(stamp.get(p + "layers"), []),
        "sanitizedBy": {"name": "safelora", "version": stamp.get(p + "version")},
    }


def statement(adapter: Adapter) -> bytes:
    """The statement about ``adapter`` as it is (its stamp verified or just written), as signed bytes."""
    prov = adapter.provenance()
    digest = prov.get(DIGEST_KEY)
    if digest is None:
        raise AdapterError(f"{adapter.file}: carries no safelora stamp; only a sanitized adapter is signed")
    stamp = {k: v for k, v in sorted(prov.items()) if k != DIGEST_KEY}
    subjects = []
    for name in required(adapter):
        subjects.append({"name": name, "digest": {"sha256": _sha256(adapter, name)}})
    predicate = {
        **derived(stamp),
        "result": {
            "stampDigest": digest,
            "coveredConfig": json.loads(adapter.format.covered_config(adapter)),
        },
        "stamp": stamp,
        "signer": {"name": "safelora", "version": __version__},
        "signedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    doc = {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class Attested:
    """A signed statement, parsed: its subjects (name → sha256) and its predicate's stamp and result."""

    subjects: dict[str, str]
    stamp: dict[str, str]  # every safelora.* entry but the digest
    stamp_digest: str
    covered_config: bytes  # canonical, as ``covered_config`` gives it
    predicate: dict[str, Any]

    @property
    def provenance(self) -> dict[str, str]:
        """The stamp as ``check`` reports it (with its digest)."""
        return {**self.stamp, DIGEST_KEY: self.stamp_digest}


def _subject_name(name: object, seen: dict[str, str]) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidStatement("a subject without a name")
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise InvalidStatement(f"subject {name!r}: not a relative POSIX name")
    if ".." in name.split("/") or "." in name.split("/") or "/" in name:
        raise InvalidStatement(f"subject {name!r}: names a file outside the adapter directory's top level")
    if name in seen:
        raise InvalidStatement(f"subject {name!r}: named twice")
    return name


def parse(payload: bytes) -> Attested:
    """The statement in ``payload`` (the exact bytes the signature covers), or ``InvalidStatement``."""
    try:
        doc = strict.loads(payload)
    except (strict.InvalidJSON, UnicodeDecodeError) as e:
        raise InvalidStatement(f"the payload is not strict JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise InvalidStatement(f"not an in-toto Statement v1 ({STATEMENT_TYPE})")
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise InvalidStatement(f"predicate type {doc.get('predicateType')!r}, not {PREDICATE_TYPE}")
    subjects: dict[str, str] = {}
    listed = doc.get("subject")
    if not isinstance(listed, list) or not listed:
        raise InvalidStatement("no subjects")
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), dict):
            raise InvalidStatement("a subject without its digest")
        name = _subject_name(entry.get("name"), subjects)
        sha = entry["digest"].get("sha256")
        if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
            raise InvalidStatement(f"subject {name!r}: no lowercase hex sha256")
        subjects[name] = sha
    predicate = doc.get("predicate")
    if not isinstance(predicate, dict):
        raise InvalidStatement("no predicate")
    stamp, result = predicate.get("stamp"), predicate.get("result")
    if not (isinstance(stamp, dict) and all(isinstance(v, str) for v in stamp.values())):
        raise InvalidStatement("the predicate's stamp is not a map of strings")
    if not all(k.startswith(PROVENANCE_PREFIX) and k != DIGEST_KEY for k in stamp):
        raise InvalidStatement("the predicate's stamp holds entries safelora does not write")
    if not isinstance(result, dict) or not isinstance(result.get("stampDigest"), str):
        raise InvalidStatement("the predicate's result has no stamp digest")
    covered = result.get("coveredConfig")
    if not isinstance(covered, dict):
        raise InvalidStatement("the predicate's result has no covered config")
    for key, value in derived(stamp).items():
        if predicate.get(key) != value:
            raise InvalidStatement(f"the predicate's {key} is not what its stamp says")
    canonical = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return Attested(subjects, dict(stamp), result["stampDigest"], canonical, predicate)


def mismatch(attested: Attested, adapter: Adapter) -> str | None:
    """Why the adapter's files are not what ``attested`` names (None when they are): a required file
    not named, a named file missing or not a regular file, or different bytes where no re-save rule
    accepts them (see the module's docstring)."""
    missing = [name for name in required(adapter) if name not in attested.subjects]
    if missing:
        return f"{', '.join(missing)}: not named by the signed statement (added since it was signed)"
    differ = []
    for name, sha in attested.subjects.items():
        try:
            if _sha256(adapter, name) != sha:
                differ.append(name)
        except SafeLoraError as e:
            return str(e)
    own = set(adapter.format.attested_files(adapter))
    if not set(differ) <= own:
        return f"{', '.join(sorted(set(differ) - own))}: differs from the file signed"
    if adapter.format.covered_config(adapter) != attested.covered_config:
        return f"{adapter.dir.path / CONFIG_FILE}: its covered fields differ from the attested ones"
    if stamp_digest(adapter, None, attested.stamp) != attested.stamp_digest:
        return f"{adapter.file}: its tensors differ from the attested ones"
    return None
