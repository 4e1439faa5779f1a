"""The gate: ``check`` (is an adapter sanitized, and verified?), ``sign``, ``inspect`` and ``restore``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING, overload

from ..errors import SafeLoraError, UsageError
from ..options import StrPath
from ..results import CheckResult, Inspection, Restored, Signed
from .opening import dir_of, each, one_named, one_or_all, open_adapters, open_pair, specs_of

if TYPE_CHECKING:
    from .. import sources
    from ..attest.keys import PublicKey
    from ..attest.policy import Policy
    from ..run import verify


@overload
def check(
    adapter: StrPath,
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> CheckResult: ...
@overload
def check(
    adapter: list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> list[CheckResult | SafeLoraError]: ...


def check(
    adapter: StrPath | list[StrPath],
    *,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    token: str | None = None,
    original: StrPath | None = None,
    trust_stamp: bool = False,
    public_keys: Sequence[StrPath] | None = None,
    policy: StrPath | None = None,
) -> CheckResult | list[CheckResult | SafeLoraError]:
    """Whether an adapter is sanitized by safelora, unmodified since, verified, and (with ``base`` and
    ``aligned``) against that pair. Verified: by recomputation (``original``, the adapter before
    projection, projected again against ``base``/``aligned`` reproduces it), by safelora's local
    record (it wrote these bytes on this machine), or, with ``trust_stamp``, by an intact stamp alone
    (a guard against accidents only). With ``public_keys`` (PEM files; default: the paths
    ``SAFELORA_PUBLIC_KEYS`` lists), only by a signed attestation one of those keys verifies, and
    everything reported comes from it. ``policy`` (a YAML file) is what else the verified provenance
    must meet. ``CheckResult.status`` is ``sanitized``, ``never_sanitized``, ``modified``,
    ``other_pair``, ``unverified`` or ``outside_policy``; ``ok`` is True only for ``sanitized``, and
    ``verified_by`` says how. A list (patterns expanded) gives a list: each adapter's result, or the
    ``SafeLoraError`` raised for it."""
    from ..attest import keys as signing
    from ..attest import policy as policies

    if (base is None) != (aligned is None):
        raise UsageError("give both base and aligned, or neither")
    if original is not None and base is None:
        raise UsageError("verifying with the original needs the pair: give base and aligned too")
    keys = signing.load_publics(public_keys)
    if keys and (original is not None or trust_stamp):
        raise UsageError("public keys verify by signature: give them without original or trust_stamp")
    rules = policies.load(policy) if policy is not None else None

    def one(path: StrPath) -> CheckResult:
        return _check(path, base, aligned, token, original, trust_stamp, keys, rules)

    result: CheckResult | list[CheckResult | SafeLoraError] = each(adapter, one)
    return result


def _check(
    adapter: StrPath,
    base: StrPath | None,
    aligned: StrPath | None,
    token: str | None,
    original: StrPath | None,
    trust_stamp: bool,
    keys: list[PublicKey],
    rules: Policy | None,
) -> CheckResult:
    from ..run import audit, signed

    with ExitStack() as stack:
        pair, recompute = _verifiers(stack, base, aligned, original, token)
        [named] = stack.enter_context(open_adapters([adapter]))
        if keys:
            result = signed.check_signed(dir_of(named), keys, pair, rules)
            return replace(result, structured=audit.structured(result.provenance))
        result = audit.check(dir_of(named), pair, trust_stamp=trust_stamp, recompute=recompute)
    return result if rules is None else signed.within_policy(result, rules)


def sign(
    adapter: StrPath,
    *,
    sign_key: StrPath | None = None,
    base: StrPath | None = None,
    aligned: StrPath | None = None,
    original: StrPath | None = None,
    token: str | None = None,
) -> Signed:
    """Sign an adapter safelora sanitized, once it is verified as ``check`` verifies it without a key:
    by safelora's local record, or by recomputation (``original`` with ``base`` and ``aligned``). The
    way to sign again after a key rotation. ``sign_key`` defaults to ``SAFELORA_SIGN_KEY``. Raises
    ``SignRefusedError`` when nothing verifies the adapter."""
    from ..adapters import rewrite_lock
    from ..attest import keys
    from ..run import signed
    from ..stores.backups import BackupStore

    if (base is None) != (aligned is None) or (original is None) != (base is None):
        raise UsageError("verifying by recomputation needs original, base and aligned together")
    signer = keys.load_signer_or_env(sign_key)
    if signer is None:
        raise UsageError(f"sign_key: none given, and {keys.SIGN_KEY_ENV} is not set", option="sign_key")
    with ExitStack() as stack:
        _, recompute = _verifiers(stack, base, aligned, original, token)
        [named] = stack.enter_context(open_adapters([adapter]))
        directory = dir_of(named)
        with rewrite_lock(directory):
            return signed.sign_verified(directory, signer, BackupStore(), recompute)


def _verifiers(
    stack: ExitStack, base: StrPath | None, aligned: StrPath | None, original: StrPath | None, token: str | None
) -> tuple[tuple[sources.Source, sources.Source] | None, verify.Recompute | None]:
    """The pair a check compares (opened with check's own digest memo), and the recomputation from
    ``original`` against it, each when given."""
    from .. import sources
    from ..run import verify
    from ..stores.backups import BackupStore
    from ..stores.cache import ProjectionCache

    if base is None or aligned is None:
        return None, None
    cache = ProjectionCache()  # only its memo of Hub refs: a branch names the commit it had
    hub = sources.Hub.from_env(token, cache.refs if cache.problem() is None else None)
    memo = BackupStore().digests()  # check's own digest memo, never the shared cache's
    pair = open_pair(stack, ((base, None), (aligned, None)), hub, sources.QuietTransfer(), [], memo)
    if original is None:
        return pair, None
    [first] = stack.enter_context(open_adapters([original]))
    return pair, verify.recomputer(dir_of(first), *pair)


@overload
def inspect(adapter: StrPath) -> Inspection: ...
@overload
def inspect(adapter: list[StrPath]) -> list[Inspection | SafeLoraError]: ...


def inspect(adapter: StrPath | list[StrPath]) -> Inspection | list[Inspection | SafeLoraError]:
    """What an adapter is (modules, ranks, dtypes, size, targets, DoRA…), its provenance, and whether
    the original of a projected adapter is kept in the backup store. A list gives a list, as ``check``."""
    result: Inspection | list[Inspection | SafeLoraError] = each(adapter, _inspect)
    return result


def _inspect(adapter: StrPath) -> Inspection:
    from ..run import audit
    from ..stores.backups import BackupStore

    with open_adapters([adapter]) as [named]:
        return audit.inspect(dir_of(named), BackupStore())


@overload
def restore(adapter: StrPath, *, force: bool = False) -> Restored: ...
@overload
def restore(adapter: list[StrPath], *, force: bool = False) -> list[Restored | SafeLoraError]: ...


def restore(adapter: StrPath | list[StrPath], *, force: bool = False) -> Restored | list[Restored | SafeLoraError]:
    """Put back the original ``adapter_model.safetensors`` an in-place ``project`` kept, byte for byte.

    Refused (``BackupError``) when no original is kept and, unless ``force``, when the adapter was
    changed since safelora wrote it; an adapter that already is the original kept from its directory
    gives ``Restored.unchanged`` (nothing written). A list returns one entry per adapter, as ``project`` does.
    """
    from ..run import restore as restoring
    from ..stores import backups

    store = backups.BackupStore()
    outcomes: list[Restored | SafeLoraError] = []
    with open_adapters(specs_of(adapter)) as opened:
        one_named(adapter, opened)
        for named in opened:
            try:
                outcomes.append(restoring.restore(dir_of(named), store, force=force))
            except SafeLoraError as e:
                e.adapter = named.path
                outcomes.append(e)
    result: Restored | list[Restored | SafeLoraError] = one_or_all(adapter, outcomes)
    return result
