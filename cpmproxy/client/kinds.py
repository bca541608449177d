"""What kind of CPM object a stored message is, from its headers alone (DESIGN.md section 3).

CPM stores every object (chat message, IMDN, file transfer, SMS, MMS, Session History info, group state)
as an ordinary RFC 5322 message. The client classifies what it downloads so that listings can show kinds
and applications can render them; the rules are the same ones the proxy's policy applies on the server.

Rules, case-insensitive, applied in this order (the first match wins):

===============  ==========================================================================================
``session-info``  ``Content-Type: Application/X-CPM-Session``
``group-state``   ``Content-Type: Application/group-state-object+xml``
``file-transfer`` ``Content-Type: multipart/related; type="Application/X-CPM-File-Transfer"``
``sms``           ``Message-Context: pager-message``
``mms``           ``Message-Context: multimedia-message``
``file-transfer`` ``message/cpim`` wrapping ``application/vnd.gsma.rcs-ft-http+xml``
``imdn``          ``message/cpim`` wrapping ``message/imdn+xml``
``chat``          ``message/cpim`` wrapping anything else
``other``         anything else (e-mail, voicemail, ...)
===============  ==========================================================================================

For ``message/cpim`` (RFC 3862) the body is a block of CPIM headers, a blank line, then a MIME entity whose
own ``Content-Type`` decides. Only header blocks are looked at: classification never decodes bodies, so it
costs microseconds even for a multi-megabyte file transfer.
"""

from __future__ import annotations

import re

__all__ = ["KINDS", "classify", "parse_header_block"]

KINDS: tuple[str, ...] = ("sms", "mms", "session-info", "group-state", "file-transfer", "imdn", "chat", "other")

# Header continuation lines (RFC 5322 folding): CRLF (or bare LF) followed by whitespace.
_FOLD_RE = re.compile(rb"\r?\n[ \t]+")
# A header field: name, colon, value (the value may be empty).
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:[ \t]*(.*?)[ \t\r]*$", re.MULTILINE)
# One MIME parameter: ``; name=value`` or ``; name="quoted value"``.
_PARAM_RE = re.compile(rb';\s*([!#-\'*+.0-9A-Z^-~a-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')

_WANTED = frozenset((b"content-type", b"message-context"))


def _split_header_block(data: bytes | memoryview) -> tuple[bytes, int]:
    """The header block of ``data`` and the offset where the body starts.

    The block ends at the first empty line (CRLF CRLF, or LF LF for content stored with bare newlines).
    Without an empty line the whole input is headers and the body is empty.
    """
    raw = bytes(data)
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        return raw[:end], end + 4
    end = raw.find(b"\n\n")
    if end >= 0:
        return raw[:end], end + 2
    return raw, len(raw)


def parse_header_block(data: bytes, wanted: frozenset[bytes] | None = None) -> tuple[dict[bytes, bytes], int]:
    """Parse the header block at the start of ``data``.

    Returns ({lower-case name: unfolded value}, body offset). Only the first occurrence of a field counts
    (later duplicates are ignored, as MIME parsers do). ``wanted`` limits the result to those names.
    """
    block, body = _split_header_block(data)
    block = _FOLD_RE.sub(b" ", block)
    fields: dict[bytes, bytes] = {}
    for m in _FIELD_RE.finditer(block):
        name = m.group(1).lower()
        if (wanted is None or name in wanted) and name not in fields:
            fields[name] = m.group(2)
    return fields, body


def _media_type(content_type: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """``multipart/related; type="X"`` -> (b"multipart/related", {b"type": b"X"}), all lower-cased."""
    media, _, rest = content_type.partition(b";")
    params: dict[bytes, bytes] = {}
    for m in _PARAM_RE.finditer(b";" + rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params.setdefault(m.group(1).lower(), re.sub(rb"\\(.)", rb"\1", value).strip().lower())
    return media.strip().lower(), params


def classify(message: bytes) -> str:
    """The CPM kind (one of :data:`KINDS`) of a stored object given its raw RFC 5322 bytes."""
    headers, body = parse_header_block(message, _WANTED)
    media, params = _media_type(headers.get(b"content-type", b""))
    context = headers.get(b"message-context", b"").strip().lower()

    if media == b"application/x-cpm-session":
        return "session-info"
    if media == b"application/group-state-object+xml":
        return "group-state"
    if media == b"multipart/related" and params.get(b"type") == b"application/x-cpm-file-transfer":
        return "file-transfer"
    if context == b"pager-message":
        return "sms"
    if context == b"multimedia-message":
        return "mms"
    if media == b"message/cpim":
        # CPIM headers (From, To, DateTime, imdn.*), blank line, then the encapsulated MIME entity.
        _cpim, entity = parse_header_block(message[body:], frozenset())
        inner, _ = parse_header_block(message[body + entity :], frozenset((b"content-type",)))
        inner_media, _ = _media_type(inner.get(b"content-type", b""))
        if inner_media == b"application/vnd.gsma.rcs-ft-http+xml":
            return "file-transfer"
        if inner_media == b"message/imdn+xml":
            return "imdn"
        return "chat"
    return "other"
