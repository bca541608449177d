"""Trust roots from a CA bundle file (PEM): every certificate in it, as ``openssl`` and Python's ``ssl`` read
such a file. (Twisted's ``Certificate.loadPEM`` reads the first one only: with the right CA further down
the bundle, e.g. ``/etc/ssl/certs/ca-certificates.crt``, every verification failed.)"""

from __future__ import annotations

import re

from OpenSSL import crypto
from twisted.internet.ssl import Certificate, trustRootFromCertificates

from cpmproxy.config import ConfigError

__all__ = ["trust_from_file"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\n-----END CERTIFICATE-----", re.S)


def trust_from_file(path: str, key: str):
    """The trust root made of every certificate in the PEM file ``path``; ConfigError naming ``key`` (the
    setting that gave the path) if it cannot be read or holds no certificate."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{key}: {e.strerror}: {path}") from None
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ConfigError(f"{key}: no PEM certificate in {path}")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except crypto.Error as e:
        raise ConfigError(f"{key}: a certificate in {path} cannot be read ({_reason(e)})") from None


def _reason(e: crypto.Error) -> str:
    """OpenSSL's error queue in words: its last reason (``[('DECODER routines', '', 'unsupported')]``)."""
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [r[-1] for r in errors if isinstance(r, tuple) and r and r[-1]]
    return reasons[-1] if reasons else "invalid data"
