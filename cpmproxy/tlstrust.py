"""TLS material from PEM files, with what is wrong with them said in words.

Trust roots from a CA bundle file: every certificate in it, as ``openssl`` and Python's ``ssl`` read such a
file. (Twisted's ``Certificate.loadPEM`` reads the first one only: with the right CA further down the
bundle, e.g. ``/etc/ssl/certs/ca-certificates.crt``, every verification failed.) The proxy's own
certificate and key, checked one at a time, so that an error names the file at fault."""

from __future__ import annotations

import re

from OpenSSL import crypto
from twisted.internet.error import VerifyError
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    trustRootFromCertificates,
)

from cpmproxy.config import ConfigError, permission_hint

__all__ = ["certificate_chain", "openssl_reason", "server_certificate", "server_tls_options", "trust_from_file"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\n-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ((?:[A-Z]+ )*PRIVATE KEY)-----")


def trust_from_file(path: str, key: str):
    """The trust root made of every certificate in the PEM file ``path``; ConfigError naming ``key`` (the
    setting that gave the path) if it cannot be read or holds no certificate."""
    data = _read(path, key)
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ConfigError(f"{key}: no PEM certificate in {path}")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except crypto.Error as e:
        raise ConfigError(f"{key}: a certificate in {path} cannot be read ({openssl_reason(e)})") from None


def server_certificate(cert_path: str, key_path: str, cert_key: str = "proxy.tls_cert",
                       key_key: str = "proxy.tls_key") -> PrivateCertificate:
    """The certificate in ``cert_path`` with the private key in ``key_path`` (the same file may hold both);
    ConfigError naming the setting at fault (``cert_key``, ``key_key``)."""
    cert_pem, key_pem = _read(cert_path, cert_key), _read(key_path, key_key)
    if not _PEM_CERT.search(cert_pem):
        raise ConfigError(f"{cert_key}: no PEM certificate in {cert_path}")
    found = _PEM_KEY.search(key_pem)
    if not found:
        raise ConfigError(f"{key_key}: no PEM private key in {key_path}")
    # (OpenSSL would ask for the passphrase on the terminal: a check or a start would hang there.)
    if b"ENCRYPTED" in found.group(1) or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise ConfigError(f"{key_key}: the private key in {key_path} is encrypted (the proxy cannot be given "
                          f"its passphrase)")
    try:
        Certificate.loadPEM(cert_pem)
    except crypto.Error as e:
        raise ConfigError(f"{cert_key}: the certificate in {cert_path} cannot be read ({openssl_reason(e)})") from None
    try:
        keys = KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except crypto.Error as e:
        raise ConfigError(f"{key_key}: the private key in {key_path} cannot be read ({openssl_reason(e)})") from None
    try:
        return PrivateCertificate.load(cert_pem, keys, crypto.FILETYPE_PEM)
    except VerifyError:
        raise ConfigError(f"{key_key}: the private key in {key_path} does not match the certificate in "
                          f"{cert_path} ({cert_key})") from None


def certificate_chain(cert_path: str, cert_key: str = "proxy.tls_cert") -> list[Certificate]:
    """The certificates after the first in ``cert_path``: the intermediates of a "full chain" file (as a
    CA or certbot's ``fullchain.pem`` gives it), which the server must send with its own certificate (a
    client that has only the root cannot verify without them). ConfigError naming ``cert_key``."""
    blocks = _PEM_CERT.findall(_read(cert_path, cert_key))[1:]
    try:
        return [Certificate.loadPEM(b) for b in blocks]
    except crypto.Error as e:
        raise ConfigError(f"{cert_key}: a certificate of the chain in {cert_path} cannot be read "
                          f"({openssl_reason(e)})") from None


def server_tls_options(cert_path: str, key_path: str, cert_key: str = "proxy.tls_cert",
                       key_key: str = "proxy.tls_key") -> CertificateOptions:
    """The TLS settings of a server offering the certificate in ``cert_path`` (with the chain that follows
    it there) and the key in ``key_path``; ConfigError naming the setting at fault."""
    own = server_certificate(cert_path, key_path, cert_key, key_key)
    chain = certificate_chain(cert_path, cert_key)
    return CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                              extraCertChain=[c.original for c in chain] or None)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: {e.strerror}: {path}{permission_hint(e)}") from None


# OpenSSL's reasons for PEM data it cannot read, in an operator's words.
_REASONS = {
    "no start line": "no PEM data",
    "unsupported": "not a format OpenSSL reads, or damaged",
    "bad base64 decode": "damaged base64 text",
    "bad end line": "damaged PEM block (its END line)",
    "wrong tag": "damaged data",
    "nested asn1 error": "damaged data",
    "header too long": "damaged or cut short",
    "too long": "damaged or cut short",
    "ASN1 lib": "damaged data",
}


def openssl_reason(e: crypto.Error) -> str:
    """OpenSSL's error queue in words: its first reason (``[('DECODER routines', '', 'unsupported')]``:
    "not a format OpenSSL reads, or damaged"), as OpenSSL put it where no words are known."""
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [r[-1] for r in errors if isinstance(r, tuple) and r and r[-1]]
    if not reasons:
        return "invalid data"
    return _REASONS.get(reasons[0], reasons[0])
