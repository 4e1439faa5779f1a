"""Signing and public keys: PEM, PKCS#8 private keys and SubjectPublicKeyInfo public keys, Ed25519
(pure) or ECDSA on P-256 with SHA-256 (DER signatures).

``cryptography`` (the ``sign`` extra) is imported here only, when a key is loaded: ``import
safelora_cli`` and ``--help`` never pay for it, and without it a key is a usage error naming the
install line. A key's id is the lowercase hex sha256 of its SubjectPublicKeyInfo DER: what an
envelope's ``keyid`` says (a hint only; every trusted key is tried) and what a policy's ``keys`` lists.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KeyFileError, MissingExtraError
from ..io import safefs

SIGN_EXTRA = "pip install 'safelora[sign]'"
SIGN_KEY_ENV = "SAFELORA_SIGN_KEY"  # a PEM file, or the PEM text itself (a CI secret)
PASSPHRASE_ENV = "SAFELORA_SIGN_KEY_PASSPHRASE"
PUBLIC_KEYS_ENV = "SAFELORA_PUBLIC_KEYS"  # PEM files, separated as PATH is
_MAX_PEM = 64 << 10
_PRIVATE = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
_PUBLIC = b"-----BEGIN PUBLIC KEY-----"
_KINDS = "an Ed25519 or ECDSA P-256 key"


def crypto(what: str) -> Any:
    """The ``cryptography`` modules safelora uses, or ``MissingExtraError`` (exit 2) naming the install line."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    except ImportError as e:
        raise MissingExtraError(f"{what} needs cryptography ({e}): {SIGN_EXTRA}") from None
    return _Crypto(exceptions, hashes, serialization, ec, ed25519)


@dataclass(frozen=True)
class _Crypto:
    exceptions: Any
    hashes: Any
    serialization: Any
    ec: Any
    ed25519: Any


@dataclass(frozen=True)
class Signer:
    """A private key ready to sign: its id, its algorithm, and the public half as PEM."""

    keyid: str
    algorithm: str  # "ed25519" or "ecdsa-p256-sha256"
    public_pem: bytes = field(repr=False)
    sign: Callable[[bytes], bytes] = field(repr=False)


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key: where it came from (for messages), its id, and its check of a signature."""

    source: str
    keyid: str
    algorithm: str
    verify: Callable[[bytes, bytes], bool] = field(repr=False)  # (signature, message) -> valid


def _kind(c: _Crypto, key: Any, where: str) -> str:
    if isinstance(key, (c.ed25519.Ed25519PrivateKey, c.ed25519.Ed25519PublicKey)):
        return "ed25519"
    if isinstance(key, (c.ec.EllipticCurvePrivateKey, c.ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, c.ec.SECP256R1):
            return "ecdsa-p256-sha256"
        raise KeyFileError(f"{where}: an ECDSA key on {key.curve.name}; give {_KINDS}")
    raise KeyFileError(f"{where}: a {type(key).__name__.removeprefix('_')}; give {_KINDS}")


def keyid(c: _Crypto, public: Any) -> str:
    der = public.public_bytes(c.serialization.Encoding.DER, c.serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _pem(spec: str | os.PathLike[str], what: str) -> tuple[bytes, str]:
    """The PEM ``spec`` names: a file, or (from an environment variable) the PEM text itself."""
    text = os.fspath(spec)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode("utf-8"), f"the {what} given as PEM text"
    data, _ = safefs.read_small(text, KeyFileError, _MAX_PEM, fix=f"give {what} as a PEM file")
    return data, text


def load_signer(spec: str | os.PathLike[str], passphrase: str | None = None) -> Signer:
    """The private key in ``spec`` (a PEM file, or PEM text), decrypted with ``passphrase`` (default:
    ``SAFELORA_SIGN_KEY_PASSPHRASE``) when it is encrypted."""
    c = crypto("--sign-key")
    data, where = _pem(spec, "the signing key")
    if not data.lstrip().startswith(_PRIVATE):
        raise KeyFileError(
            f"{where}: not a PEM PKCS#8 private key; make one with openssl genpkey -algorithm ed25519 (or convert "
            "one with openssl pkcs8 -topk8)"
        )
    secret = os.environ.get(PASSPHRASE_ENV) if passphrase is None else passphrase
    encrypted = data.lstrip().startswith(_PRIVATE[1])
    if encrypted and not secret:
        raise KeyFileError(f"{where}: encrypted; set {PASSPHRASE_ENV} to its passphrase")
    try:
        key = c.serialization.load_pem_private_key(data, secret.encode("utf-8") if encrypted and secret else None)
    except (ValueError, TypeError, c.exceptions.UnsupportedAlgorithm) as e:
        wrong = " (wrong passphrase?)" if encrypted else ""
        raise KeyFileError(f"{where}: cannot be read as a private key{wrong}: {e}") from None
    algorithm = _kind(c, key, where)
    public = key.public_key()
    pem = public.public_bytes(c.serialization.Encoding.PEM, c.serialization.PublicFormat.SubjectPublicKeyInfo)
    if algorithm == "ed25519":
        sign: Callable[[bytes], bytes] = key.sign
    else:
        sign = lambda message: key.sign(message, c.ec.ECDSA(c.hashes.SHA256()))  # noqa: E731  (DER)
    return Signer(keyid(c, public), algorithm, pem, sign)


def load_public(path: str | os.PathLike[str]) -> PublicKey:
    """The public key in the PEM file ``path`` (SubjectPublicKeyInfo: ``BEGIN PUBLIC KEY``)."""
    c = crypto("--public-key")
    data, where = _pem(Path(path), "a public key")
    if not data.lstrip().startswith(_PUBLIC):
        raise KeyFileError(
            f"{where}: not a PEM public key (BEGIN PUBLIC KEY); derive it with openssl pkey -pubout -in PRIVATE.pem"
        )
    try:
        key = c.serialization.load_pem_public_key(data)
    except (ValueError, c.exceptions.UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: cannot be read as a public key: {e}") from None
    algorithm = _kind(c, key, where)

    def verify(signature: bytes, message: bytes) -> bool:
        try:
            if algorithm == "ed25519":
                key.verify(signature, message)
            else:
                key.verify(signature, message, c.ec.ECDSA(c.hashes.SHA256()))
        except c.exceptions.InvalidSignature:
            return False
        return True

    return PublicKey(where, keyid(c, key), algorithm, verify)


def load_signer_or_env(spec: str | os.PathLike[str] | None) -> Signer | None:
    """``load_signer`` of ``spec``, else of ``SAFELORA_SIGN_KEY`` when it is set; None when neither is."""
    given = spec if spec is not None else os.environ.get(SIGN_KEY_ENV) or None
    return None if given is None else load_signer(given)


def load_publics(paths: Sequence[str | os.PathLike[str]] | None) -> list[PublicKey]:
    """The trusted keys in ``paths``, else in the files ``SAFELORA_PUBLIC_KEYS`` lists."""
    if paths is None:
        paths = [p for p in os.environ.get(PUBLIC_KEYS_ENV, "").split(os.pathsep) if p]
    return [load_public(p) for p in paths]
