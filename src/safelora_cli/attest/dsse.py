"""DSSE (Dead Simple Signing Envelope) v1: the envelope, and the bytes a signature covers.

A signature covers the pre-authentication encoding (``pae``) of the payload type and the payload's
raw bytes, never the base64 text nor a re-serialized document: the verifier checks the signature
over the bytes it decoded, and then parses those same bytes. The envelope is the JSON object
``{"payloadType", "payload", "signatures": [{"keyid", "sig"}]}`` with the payload and each signature
in base64 (standard or URL-safe, padded or not, are read; standard, padded, is written), as
in-toto, Sigstore and the DSSE reference implementations read and write it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from ..io import strict

PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_BYTES = 16 << 20  # an envelope larger than this is refused before it is parsed
MAX_SIGNATURES = 64  # each is tried with every trusted key: bounded work whatever the file holds
_STANDARD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URLSAFE = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class InvalidEnvelope(ValueError):
    """Not a DSSE envelope safelora reads; the message says why, in a few words."""


@dataclass(frozen=True)
class Signature:
    keyid: str  # a hint only ("" when absent): every trusted key is tried whatever it says
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes  # exactly the bytes signed, and the bytes to parse
    signatures: tuple[Signature, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, the lengths as ASCII decimal byte counts."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not; anything else (spaces, a mix of both alphabets,
    misplaced padding) is ``InvalidEnvelope``."""
    if _STANDARD.fullmatch(text) is None and _URLSAFE.fullmatch(text) is None:
        raise InvalidEnvelope("not base64")
    unpadded = text.rstrip("=")
    if len(unpadded) % 4 == 1 or (text != unpadded and len(text) % 4):
        raise InvalidEnvelope("not base64 (its length)")
    padded = unpadded + "=" * (-len(unpadded) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error:
        raise InvalidEnvelope("not base64") from None


def encode(payload: bytes, signatures: list[Signature], payload_type: str = PAYLOAD_TYPE) -> bytes:
    """The envelope as written: JSON, standard padded base64."""
    doc = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in signatures],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def decode(raw: bytes) -> Envelope:
    """The envelope in ``raw`` (strict JSON: duplicate keys refused), or ``InvalidEnvelope``."""
    if len(raw) > MAX_BYTES:
        raise InvalidEnvelope(f"{len(raw)} bytes, more than the {MAX_BYTES} an envelope may have")
    try:
        doc = strict.loads(raw)
    except (strict.InvalidJSON, UnicodeDecodeError) as e:
        raise InvalidEnvelope(f"not strict JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InvalidEnvelope("not a JSON object")
    kind, payload, signatures = doc.get("payloadType"), doc.get("payload"), doc.get("signatures")
    if not isinstance(kind, str) or not isinstance(payload, str):
        raise InvalidEnvelope("payloadType and payload must be strings")
    if not isinstance(signatures, list) or not signatures:
        raise InvalidEnvelope("no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise InvalidEnvelope(f"{len(signatures)} signatures, more than the {MAX_SIGNATURES} read")
    sigs = []
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            raise InvalidEnvelope("a signature without its sig string")
        keyid = entry.get("keyid", "")
        if not isinstance(keyid, str):
            raise InvalidEnvelope("a keyid that is not a string")
        sigs.append(Signature(keyid, b64decode(entry["sig"])))
    return Envelope(kind, b64decode(payload), tuple(sigs))
