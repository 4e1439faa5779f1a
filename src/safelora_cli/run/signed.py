"""Signed attestations as use cases: sign what a run wrote, sign an adapter once verified, remove an
attestation a rewrite does not re-sign, and check an adapter by its signature (``attest``).

An attestation never outlives the files it names: a rewrite that signs replaces it (atomically) once
the adapter is written, and one that does not sign removes it. In between, or if a crash comes first,
the old one names other bytes, and ``check`` reads it as ``modified``: it verifies nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from ..adapters import Adapter, load_adapter
from ..adapters.location import envelope_name
from ..attest import dsse, statement
from ..attest.keys import PublicKey, Signer
from ..attest.policy import Policy, violation
from ..errors import InPlaceError, SafeLoraError, SignRefusedError
from ..io import atomic, ranges, safefs
from ..results import CheckResult, Signed
from ..sources import QuietTransfer, Source, open_source
from ..stores.backups import BackupStore
from .audit import Recompute, check_adapter, same_pair, same_source, sanitized_line


def sign(adapter: Adapter, signer: Signer) -> Path:
    """Write the signed statement about ``adapter`` as it is beside it; returns the envelope's path."""
    body = statement.statement(adapter)
    signature = dsse.Signature(signer.keyid, signer.sign(dsse.pae(dsse.PAYLOAD_TYPE, body)))
    name = envelope_name(adapter)
    atomic.replace(adapter.dir, name, [dsse.encode(body, [signature])], 0o644)
    return adapter.dir.path / name


def sign_written(directory: safefs.Directory, signer: Signer) -> Path:
    """``sign`` the adapter a run has just written in ``directory`` (read back as written)."""
    adapter = load_adapter(directory)
    try:
        return sign(adapter, signer)
    finally:
        adapter.close()


def unsign(adapter: Adapter) -> None:
    """Remove the adapter's attestation, if any, and sync the directory; ``InPlaceError`` when it stays."""
    name = envelope_name(adapter)
    try:
        os.unlink(name, dir_fd=adapter.dir.fd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InPlaceError(
            f"{adapter.dir.path / name}: cannot remove the attestation of the rewritten adapter ({e.strerror})"
        ) from None
    try:
        ranges.fsync(adapter.dir.fd)
    except OSError as e:
        raise InPlaceError(f"{adapter.dir.path}: removing {name} was not synced ({e.strerror})") from None


def unsign_directory(directory: safefs.Directory) -> None:
    """``unsign`` the adapter in ``directory``."""
    adapter = load_adapter(directory)
    try:
        unsign(adapter)
    finally:
        adapter.close()


def sign_verified(
    directory: safefs.Directory, signer: Signer, store: BackupStore, recompute: Recompute | None
) -> Signed:
    """Sign an existing adapter once ``check`` verifies it (by recomputation, or by the local record):
    the files signed are the ones verified, read once. ``SignRefusedError`` when nothing verifies it."""
    adapter = load_adapter(directory)
    try:
        verdict = check_adapter(adapter, None, store, False, recompute)
        by = verdict.verified_by
        if by is None or not verdict.ok or by not in ("recomputation", "local-record"):
            raise SignRefusedError(f"{adapter.path}: not signed: {verdict.message}")
        return Signed(adapter.path, sign(adapter, signer), signer.keyid, by)
    finally:
        adapter.close()


def _unverified(adapter: Adapter, why: str) -> CheckResult:
    return CheckResult(adapter.path, "unverified", why, adapter.provenance())


def check_signed(
    directory: safefs.Directory,
    keys: Sequence[PublicKey],
    pair: tuple[Source, Source] | None,
    policy: Policy | None,
) -> CheckResult:
    """Whether a trusted key signed a statement about the adapter as it is (docs/attestations.md).

    Every trusted key is tried on every signature whatever the ``keyid`` says; the statement is
    parsed from the exact bytes verified. Pass: the files are what it names (or a re-save of them
    that keeps what the adapter does), the pair (when given) is the attested one by content, and the
    policy (when given) holds. Everything reported then comes from the signed predicate.
    """
    adapter = load_adapter(directory)
    try:
        return _check_signed(adapter, keys, pair, policy)
    finally:
        adapter.close()


def _check_signed(
    adapter: Adapter, keys: Sequence[PublicKey], pair: tuple[Source, Source] | None, policy: Policy | None
) -> CheckResult:
    name = envelope_name(adapter)
    where = adapter.dir.path / name
    if adapter.dir.lstat(name) is None:
        return _unverified(adapter, f"no signed attestation ({where})")
    try:
        raw, _ = adapter.dir.read_small(name, dsse.MAX_BYTES, fix="sign the adapter again", follow=False)
    except SafeLoraError as e:  # too large, a link, not a regular file: nothing to verify
        return _unverified(adapter, str(e))
    try:
        envelope = dsse.decode(raw)
    except dsse.InvalidEnvelope as e:
        return _unverified(adapter, f"{where}: {e}")
    if envelope.payload_type != dsse.PAYLOAD_TYPE:
        return _unverified(adapter, f"{where}: payload type {envelope.payload_type!r}, not {dsse.PAYLOAD_TYPE}")
    signed = dsse.pae(envelope.payload_type, envelope.payload)
    key = next((k for k in keys for s in envelope.signatures if k.verify(s.sig, signed)), None)
    if key is None:
        tried = ", ".join(k.keyid[:16] for k in keys)
        return _unverified(adapter, f"{where}: no trusted key verifies its signatures (tried {tried})")
    try:
        attested = statement.parse(envelope.payload)
    except statement.InvalidStatement as e:
        return _unverified(adapter, f"{where}: signed by key {key.keyid}, but {e}")
    prov = attested.provenance
    signer = f"signed by key {key.keyid} ({key.source})"
    problem = statement.mismatch(attested, adapter)
    if problem is not None:
        return CheckResult(adapter.path, "modified", problem, prov, notes=[signer])
    if pair is not None and not same_pair(prov, *pair):
        had = f"{prov.get('safelora.base')} → {prov.get('safelora.aligned')}"
        message = f"signed as sanitized against {had}, not {pair[0].given} → {pair[1].given}"
        return CheckResult(adapter.path, "other_pair", message, prov, notes=[signer])
    if policy is not None and (why := held_to(policy, prov, key.keyid)) is not None:
        return CheckResult(adapter.path, "outside_policy", f"{why} ({policy.source})", prov, notes=[signer])
    line = sanitized_line(prov, where)
    return CheckResult(adapter.path, "sanitized", line, prov, "signature", [signer], key.keyid)


def held_to(policy: Policy, prov: Mapping[str, str], keyid: str | None) -> str | None:
    """``policy.violation``, where a checkpoint the policy names by a local directory is opened (when
    the comparison gets to it) and compared by content with what the stamp lists, as ``--base`` is."""
    with ExitStack() as stack:
        opened: dict[tuple[str, str], Source] = {}

        def by_content(role: str, path: str) -> bool:
            if not os.path.isdir(path):
                return False
            if (role, path) not in opened:
                src = open_source(path, None, role=role, transfer=QuietTransfer(), notes=[])
                stack.callback(src.close)
                memo = BackupStore().digests()  # check's own memo, as for --base
                src.memo = memo
                src.digests.update(memo.load(src.cache_identity()))
                opened[role, path] = src
            return same_source(prov, role, opened[role, path])

        return violation(policy, prov, keyid, by_content)


def within_policy(result: CheckResult, policy: Policy) -> CheckResult:
    """A verdict verified otherwise (local record, recomputation, trusted stamp) held against ``policy``."""
    if not result.ok or (why := held_to(policy, result.provenance, result.signed_by)) is None:
        return result
    message = f"{why} ({policy.source})"
    return replace(result, status="outside_policy", message=message, verified_by=None)
