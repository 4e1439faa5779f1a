"""Signed attestations: a DSSE envelope over an in-toto Statement that names an adapter's files by
sha256 and says, in safelora's own predicate, how it was sanitized (docs/attestations.md).

``dsse`` is the envelope and its pre-authentication encoding, ``keys`` the keys (``cryptography``,
the ``sign`` extra, imported only when a key is used), ``statement`` what is signed and how a
signed statement is checked against the files, ``policy`` what an admitter requires of it. The use
cases (sign after a run, sign an adapter verified, check a signed one) are ``run/signed.py``'s.
"""
