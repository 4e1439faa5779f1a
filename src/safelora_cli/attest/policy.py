"""What an admitter requires of a verified adapter, beyond "sanitized by a holder of a trusted key":
a YAML policy (docs/attestations.md).

A signature alone proves that some pair, with some settings, sanitized the adapter; a policy says
which pair, which settings and which keys are acceptable. Every key is optional and each one given
must hold; a key the policy does not know is refused (a typo never loosens it).

- ``base``, ``aligned``: a string or a list, one of which must match the attested checkpoint: its
  identity (``repo@sha``, ``name@blake3:…``) or the name in it (a Hub repo id, a directory's name),
  ``blake3:<digest>`` of its content (the whole digest, or at least its first 16 hex digits), or a
  local directory holding the very weights it lists (compared by content, as ``--base`` is).
- ``mode``: ``threshold`` or ``number``.
- ``threshold_min``, ``threshold_max``: bounds on τ (in number mode, the τ the k-th module set).
- ``num_layers_min``: number mode with at least this k (a threshold-mode adapter does not meet it).
- ``projected_min``: at least this many modules projected.
- ``keys``: the key ids (sha256 of the public key's SubjectPublicKeyInfo DER) allowed to have signed;
  an adapter not verified by a signature does not meet it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import config
from ..adapters import PROVENANCE_PREFIX
from ..errors import ConfigError, PolicyError
from ..io import safefs, strict
from ..sources import identity
from .keys import crypto

KEYS = ("base", "aligned", "mode", "threshold_min", "threshold_max", "num_layers_min", "projected_min", "keys")
_FIX = "give a YAML mapping of policy keys (docs/attestations.md)"
_MAX_BYTES = 1 << 20
_KEYID = re.compile(r"[0-9a-f]{64}")
_MIN_PREFIX = 16


@dataclass(frozen=True)
class Policy:
    source: str
    base: tuple[str, ...] | None = None
    aligned: tuple[str, ...] | None = None
    mode: str | None = None
    threshold_min: float | None = None
    threshold_max: float | None = None
    num_layers_min: int | None = None
    projected_min: int | None = None
    keys: frozenset[str] | None = None


def _number(where: str, key: str, value: Any, whole: bool) -> Any:
    if whole:
        if type(value) is not int or value < 0:
            raise PolicyError(f"{where}: {key} {value!r}: give a whole number, at least 0")
    elif type(value) not in (int, float) or not math.isfinite(value):
        raise PolicyError(f"{where}: {key} {value!r}: give a number")
    return value


def _strings(where: str, key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if key == "keys":
        items = [v.removeprefix("sha256:") if isinstance(v, str) else v for v in items]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise PolicyError(f"{where}: {key} {value!r}: give a string or a list of strings")
    return tuple(items)


def load(path: str | os.PathLike[str]) -> Policy:
    """The policy in the YAML file ``path``; ``PolicyError`` (exit 2) for one that says what no policy does.
    Needs ``cryptography`` as the keys do: a policy is for signed adapters first."""
    crypto("--policy")
    where = os.fspath(path)
    raw, _ = safefs.read_small(where, PolicyError, _MAX_BYTES, fix=_FIX)
    try:
        doc = config.load_options(raw.decode("utf-8"), where, KEYS)
    except UnicodeDecodeError:
        raise PolicyError(f"{where}: not UTF-8; save the policy as UTF-8") from None
    except ConfigError as e:
        message = str(e)
        if message.endswith(ConfigError.fix):
            message = message.removesuffix(ConfigError.fix) + _FIX
        raise PolicyError(message) from None
    found: dict[str, Any] = {"source": where}
    for key, value in doc.items():
        if key in ("base", "aligned"):
            found[key] = _strings(where, key, value)
        elif key == "mode":
            if value not in ("threshold", "number"):
                raise PolicyError(f"{where}: mode {value!r}: give threshold or number")
            found[key] = value
        elif key == "keys":
            ids = [v.lower() if isinstance(v, str) else v for v in _strings(where, key, value)]
            if not all(_KEYID.fullmatch(v) for v in ids):
                raise PolicyError(f"{where}: keys: give key ids, each the 64 hex digits safelora check names")
            found[key] = frozenset(ids)
        else:
            found[key] = _number(where, key, value, whole=key.endswith("_min") and not key.startswith("threshold"))
    return Policy(**found)


# Whether a checkpoint the policy names by path (a local directory) holds the weights the stamp lists for
# a role, by content: (role, path) -> bool.
ByContent = Callable[[str, str], bool]


def _matches(role: str, wanted: tuple[str, ...], stamp: Mapping[str, str], by_content: ByContent | None) -> bool:
    recorded = stamp.get(PROVENANCE_PREFIX + role)
    digests = identity.parse_map(stamp.get(f"{PROVENANCE_PREFIX}{role}_tensors")) or {}
    content = identity.combined(digests) if digests else None
    name = (recorded or "").rpartition("@")[0]
    for want in wanted:
        if recorded is not None and want in (recorded, name):
            return True
        if want.startswith("blake3:") and content is not None:
            prefix = want.removeprefix("blake3:").lower()
            if len(prefix) >= _MIN_PREFIX and content.startswith(prefix):
                return True
        if by_content is not None and by_content(role, want):
            return True
    return False


def _json(raw: str | None) -> Any:
    try:
        return strict.loads(raw) if raw is not None else None
    except strict.InvalidJSON:
        return None


def violation(
    policy: Policy, stamp: Mapping[str, str], keyid: str | None, by_content: ByContent | None = None
) -> str | None:
    """The first requirement of ``policy`` the verified ``stamp`` (signed by ``keyid``, if signed)
    does not meet, as a line; None when it meets them all. ``by_content`` compares a checkpoint the
    policy names by path."""
    p = PROVENANCE_PREFIX
    if policy.keys is not None and keyid not in policy.keys:
        return f"signed by key {keyid}, not one the policy allows" if keyid else "not signed, and the policy names keys"
    for role, wanted in (("base", policy.base), ("aligned", policy.aligned)):
        if wanted is not None and not _matches(role, wanted, stamp, by_content):
            return f"{role} {stamp.get(p + role)} is not the policy's {' or '.join(wanted)}"
    mode = stamp.get(p + "mode")
    if policy.mode is not None and mode != policy.mode:
        return f"mode {mode}, not the policy's {policy.mode}"
    tau = _json(stamp.get(p + "threshold"))
    number = type(tau) in (int, float)
    if policy.threshold_min is not None and not (number and tau >= policy.threshold_min):
        return f"threshold {tau}, below the policy's threshold_min {policy.threshold_min}"
    if policy.threshold_max is not None and not (number and tau <= policy.threshold_max):
        return f"threshold {tau}, above the policy's threshold_max {policy.threshold_max}"
    if policy.num_layers_min is not None:
        k = _json(stamp.get(p + "num_layers"))
        if mode != "number" or type(k) is not int or k < policy.num_layers_min:
            return f"not number mode with at least {policy.num_layers_min} layers (mode {mode}, k {k})"
    projected = _json(stamp.get(p + "projected"))
    count = len(projected) if isinstance(projected, list) else 0
    if policy.projected_min is not None and count < policy.projected_min:
        return f"{count} modules projected, fewer than the policy's projected_min {policy.projected_min}"
    return None
