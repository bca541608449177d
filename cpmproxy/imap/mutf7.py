"""Modified UTF-7 for IMAP mailbox names (RFC 3501 section 5.1.3).

Printable US-ASCII except ``&`` stands for itself, ``&`` is ``&-``, and every other run of characters is
UTF-16BE, base64-encoded with ``,`` instead of ``/`` and no padding, between ``&`` and ``-``.

:func:`decode` is strict: it accepts only the canonical encoding :func:`encode` produces, so distinct
byte strings never decode to the same name (a proxy comparing or rewriting names must not be fooled by
alternative spellings of the same mailbox).
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["decode", "encode", "fold_inbox"]

# Runs that need base64: anything outside printable ASCII. "&" is handled separately ("&-").
_ENCODE_RE = re.compile(r"&|[^\x20-\x7e]+")
_B64_CHARS_RE = re.compile(rb"[A-Za-z0-9+,]*")
_DIRECT_RE = re.compile(r"[\x20-\x7e]")
_CTL_RE = re.compile(rb"[\x00-\x1f\x7f]")


def _b64(run: str) -> bytes:
    return base64.b64encode(run.encode("utf-16-be"), altchars=b"+,").rstrip(b"=")


def _encode_run(m: re.Match[str]) -> str:
    run = m.group()
    if run == "&":
        return "&-"
    return "&" + _b64(run).decode("ascii") + "-"


def encode(name: str) -> bytes:
    """Encode a mailbox name to modified UTF-7 (raises UnicodeEncodeError, a ValueError, on lone surrogates)."""
    return _ENCODE_RE.sub(_encode_run, name).encode("ascii")


def decode(data: bytes, *, strict: bool = True) -> str:
    """Decode modified UTF-7; raises ValueError on anything :func:`encode` would not have produced.

    ``strict=False`` reads what a lenient server may take for a name too (Dovecot ignores the padding bits
    of the last base64 character; other readers may take adjacent sections or ASCII in base64): the
    spellings :func:`encode` would not produce but that still read as some name."""
    data = bytes(data)
    if not data.isascii():
        raise ValueError("modified UTF-7 must be 7-bit ASCII")
    if (m := _CTL_RE.search(data)) is not None:
        raise ValueError(f"control character at offset {m.start()} in modified UTF-7")
    amp = data.find(b"&")
    if amp < 0:
        return data.decode("ascii")  # fast path: nothing encoded
    out: list[str] = []
    pos = 0
    last_b64_end = -1
    while amp >= 0:
        out.append(data[pos:amp].decode("ascii"))
        end = data.find(b"-", amp + 1)
        if end < 0:
            raise ValueError(f"unterminated '&' at offset {amp} in modified UTF-7")
        payload = data[amp + 1 : end]
        if not payload:
            out.append("&")
        else:
            if amp == last_b64_end and strict:
                # "&AOQ-&AOQ-" would be a second spelling of "&AOQA5A-".
                raise ValueError(f"adjacent base64 sections at offset {amp} in modified UTF-7")
            out.append(_decode_b64(payload, amp, strict))
            last_b64_end = end + 1
        pos = end + 1
        amp = data.find(b"&", pos)
    out.append(data[pos:].decode("ascii"))
    return "".join(out)


def _decode_b64(payload: bytes, offset: int, strict: bool = True) -> str:
    if _B64_CHARS_RE.fullmatch(payload) is None or len(payload) % 4 == 1:
        raise ValueError(f"bad base64 at offset {offset} in modified UTF-7")
    try:
        raw = base64.b64decode(payload + b"=" * (-len(payload) % 4), altchars=b"+,", validate=True)
    except binascii.Error:
        raise ValueError(f"bad base64 at offset {offset} in modified UTF-7") from None
    if len(raw) % 2:
        raise ValueError(f"odd number of UTF-16 bytes at offset {offset} in modified UTF-7")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise ValueError(
            f"invalid UTF-16 (unpaired surrogate) at offset {offset} in modified UTF-7"
        ) from None
    if not strict:
        return text
    if _DIRECT_RE.search(text):
        raise ValueError(f"base64 section at offset {offset} encodes printable ASCII")
    # Re-encoding catches non-zero padding bits, the last remaining way to spell the same text twice.
    if _b64(text) != payload:
        raise ValueError(f"non-canonical base64 at offset {offset} in modified UTF-7")
    return text


def fold_inbox(raw: bytes, separator: bytes = b"/") -> bytes:
    """INBOX, and the names below it, in the one spelling a server takes them in whatever their case
    (RFC 9051 5.1: INBOX is case-insensitive; Dovecot folds the prefix of its children too). "/" is the
    CPM folder layout's separator (conf/dovecot/90-cpmproxy.conf)."""
    if raw[:5].upper() == b"INBOX" and raw[5:6] in (b"", separator) and raw[:5] != b"INBOX":
        return b"INBOX" + raw[5:]
    return raw
