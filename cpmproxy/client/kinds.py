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
# One MIME parameter: ``; name=value`` or ``; name="quoted value"``.
_PARAM_RE = re.compile(rb';[ \t]*([^=; \t]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^; \t]*))')
_QUOTED_PAIR_RE = re.compile(rb"\\(.)")

_WANTED = frozenset((b"content-type", b"message-context"))


def _split_header_block(data: bytes, start: int = 0) -> tuple[bytes, int]:
    """The header block of ``data`` starting at ``start``, and the offset where its body starts.

    The block ends at the first empty line (CRLF CRLF, or LF LF for content stored with bare newlines).
    Without an empty line the whole rest is headers and the body is empty. Offsets, not slices: a
    multi-megabyte body is never copied.
    """
    end = data.find(b"\r\n\r\n", start)
    if end >= 0:
        return data[start:end], end + 4
    end = data.find(b"\n\n", start)
    if end >= 0:
        return data[start:end], end + 2
    return data[start:], len(data)


def parse_header_block(
    data: bytes, wanted: frozenset[bytes] | None = None, start: int = 0
) -> tuple[dict[bytes, bytes], int]:
    """Parse the header block of ``data`` that starts at offset ``start``.

    Returns ({lower-case name: unfolded value}, offset of the body). Only the first occurrence of a field
    counts (later duplicates are ignored, as MIME parsers do). ``wanted`` limits the result to those names.
    """
    block, body = _split_header_block(data, start)
    if wanted is not None and not wanted:
        return {}, body
    if b"\n " in block or b"\n\t" in block:
        block = _FOLD_RE.sub(b" ", block)
    fields: dict[bytes, bytes] = {}
    for line in block.split(b"\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue  # not a header field (a stray line): ignored, as lenient parsers do
        name = name.strip().lower()
        if (wanted is None or name in wanted) and name not in fields:
            fields[name] = value.strip()
    return fields, body


def _media_type(content_type: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """``multipart/related; type="X"`` -> (b"multipart/related", {b"type": b"X"}), all lower-cased."""
    media, semi, rest = content_type.partition(b";")
    params: dict[bytes, bytes] = {}
    if semi:
        for m in _PARAM_RE.finditer(semi + rest):
            quoted = m.group(2)
            value = m.group(3) if quoted is None else _QUOTED_PAIR_RE.sub(rb"\1", quoted)
            params.setdefault(m.group(1).lower(), value.strip().lower())
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
        _cpim, entity = parse_header_block(message, frozenset(), start=body)
        inner, _ = parse_header_block(message, frozenset((b"content-type",)), start=entity)
        inner_media, _ = _media_type(inner.get(b"content-type", b""))
        if inner_media == b"application/vnd.gsma.rcs-ft-http+xml":
            return "file-transfer"
        if inner_media == b"message/imdn+xml":
            return "imdn"
        return "chat"
    return "other"
