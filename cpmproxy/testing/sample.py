"""Realistic OMA CPM / RCS message-store content for tests and the demo.

CPM stores every object as an RFC 5322 message; the *kind* of an object is
derived from its headers (and, for ``message/cpim``, from the encapsulated
MIME headers).  :func:`make_object` builds one object of a given kind,
:func:`seed_sample_store` lays out a small but representative store, and
:func:`generate_store` bulk-fills a folder for load/age-policy tests.
:func:`classify_reference` is an independent implementation of the
product's classification rules, used as the oracle in tests.
"""

from __future__ import annotations

import base64
import datetime as dt
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import format_datetime
from typing import NamedTuple

import imapclient

from cpmproxy.testing.dovecot import parse_appenduid

__all__ = [
    "EXPECTED_KINDS",
    "KINDS",
    "ONE_TO_ONE_FOLDER",
    "PEER_TEL",
    "RCS_STORE_FOLDER",
    "SESSION_CONTRIBUTION_ID",
    "SESSION_CONVERSATION_ID",
    "SESSION_FOLDER",
    "ManifestEntry",
    "classify_reference",
    "generate_store",
    "make_object",
    "seed_sample_store",
    "user_tel",
]

CRLF = "\r\n"
DOMAIN = "example.com"

#: Classification rules (case-insensitive), in the order they are applied.
EXPECTED_KINDS: dict[str, str] = {
    "session-info": "Content-Type: Application/X-CPM-Session (one per Session History folder)",
    "group-state": "Content-Type: Application/group-state-object+xml",
    "file-transfer": (
        'Content-Type: multipart/related; type="Application/X-CPM-File-Transfer", or '
        "message/cpim wrapping application/vnd.gsma.rcs-ft-http+xml"
    ),
    "sms": "Message-Context: pager-message",
    "mms": "Message-Context: multimedia-message",
    "imdn": "message/cpim wrapping message/imdn+xml",
    "chat": "message/cpim wrapping anything else (e.g. text/plain)",
    "other": "anything else (plain e-mail, voicemail, ...)",
}
KINDS: tuple[str, ...] = tuple(EXPECTED_KINDS)

PEER_TEL = "+15551234567"
ONE_TO_ONE_FOLDER = f"Default/tel:{PEER_TEL}"
# Fixed UUIDs so tests can refer to the seeded Session History folder.
SESSION_CONVERSATION_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "cpmproxy:sample:conversation"))
SESSION_CONTRIBUTION_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "cpmproxy:sample:contribution"))
SESSION_FOLDER = f"Default/{SESSION_CONVERSATION_ID}/{SESSION_CONTRIBUTION_ID}"
RCS_STORE_FOLDER = "RCSMessageStore"
GROUP_FOCUS_URI = f"sip:group-{SESSION_CONVERSATION_ID[:8]}@conf.{DOMAIN}"
GROUP_MEMBERS = ("+15551110001", "+15551110002", "+15551110003")

_KNOWN_USER_TELS = {"alice": "+15557654321", "bob": "+15557654322", "carol": "+15557654323"}


class ManifestEntry(NamedTuple):
    mailbox: str
    uid: int
    kind: str


def user_tel(user: str) -> str:
    """The MSISDN the sample data uses as ``user``'s own address."""
    if user in _KNOWN_USER_TELS:
        return _KNOWN_USER_TELS[user]
    return "+1555" + str(uuid.uuid5(uuid.NAMESPACE_DNS, user).int % 10_000_000).zfill(7)


# -- building blocks -------------------------------------------------------


def _filler(n: int) -> str:
    """Exactly ``n`` characters of wrapped ASCII text (lines < 998 octets)."""
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    out: list[str] = []
    line_len = 0
    total = 0
    i = 0
    while total < n:
        if line_len >= 76 and n - total >= 2:
            out.append(CRLF)
            total += 2
            line_len = 0
            continue
        out.append(words[i % len(words)])
        i += 1
        total += 1
        line_len += 1
    return "".join(out)


def _b64_lines(data: bytes) -> str:
    enc = base64.b64encode(data).decode()
    return CRLF.join(enc[i : i + 76] for i in range(0, len(enc), 76))


def _fake_jpeg(nbytes: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rnd.randbytes(max(0, nbytes - 13)) + b"\xff\xd9"


def _msg_id(token: str) -> str:
    return f"<{token}@cpm.{DOMAIN}>"


def _headers(pairs: Iterable[tuple[str, str | None]]) -> str:
    return "".join(f"{k}: {v}{CRLF}" for k, v in pairs if v is not None)


def _cpim(from_uri: str, to_uri: str, when: dt.datetime, imdn_id: str, inner_headers: str, body: str) -> str:
    """RFC 3862 message/cpim body: CPIM headers, blank line, MIME entity."""
    return (
        f"From: <{from_uri}>{CRLF}"
        f"To: <{to_uri}>{CRLF}"
        f"DateTime: {when.strftime('%Y-%m-%dT%H:%M:%SZ')}{CRLF}"
        f"NS: imdn <urn:ietf:params:imdn>{CRLF}"
        f"imdn.Message-ID: {imdn_id}{CRLF}"
        f"imdn.Disposition-Notification: positive-delivery, display{CRLF}"
        f"{CRLF}"
        f"{inner_headers}"
        f"{CRLF}"
        f"{body}"
    )


def _sip(tel: str) -> str:
    return f"sip:{tel}@{DOMAIN}"


def make_object(
    kind: str,
    *,
    owner: str = "+15557654321",
    peer: str = PEER_TEL,
    direction: str = "received",
    date: dt.datetime | None = None,
    conversation_id: str | None = None,
    contribution_id: str | None = None,
    imdn_message_id: str | None = None,
    message_id: str | None = None,
    subject: str | None = None,
    text: str | None = None,
    group: bool = False,
    variant: str | None = None,
    ref_imdn_id: str | None = None,
    size: int | None = None,
    seed: int = 0,
) -> bytes:
    """Build one CPM object of ``kind`` (see :data:`EXPECTED_KINDS`) as CRLF bytes.

    ``owner``/``peer`` are E.164 numbers; ``direction`` is "sent" or
    "received".  ``group=True`` addresses a group chat focus instead of the
    peer.  ``variant`` selects the file-transfer encoding, "cpim" (default
    for 1:1) or "related" (default for group), or the "other" flavour,
    "email" (default) or "voicemail".  ``size`` pads the object to about
    that many bytes.  ``ref_imdn_id`` is the chat message an IMDN refers to.
    """
    if kind not in EXPECTED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if direction not in ("sent", "received"):
        raise ValueError("direction must be 'sent' or 'received'")
    rnd = random.Random(seed)
    token = uuid.UUID(int=rnd.getrandbits(128), version=4).hex
    params = _Params(
        kind=kind,
        owner=owner,
        peer=peer,
        direction=direction,
        date=(date or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).replace(microsecond=0),
        conversation_id=conversation_id or str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
        contribution_id=contribution_id or str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
        imdn_message_id=imdn_message_id or token[:20],
        message_id=message_id or _msg_id(token),
        subject=subject,
        text=text,
        group=group,
        variant=variant or _default_variant(kind, group),
        ref_imdn_id=ref_imdn_id or token[12:32],
        seed=seed,
    )
    data = _BUILDERS[kind](params, "")
    if size is not None and size > len(data):
        data = _BUILDERS[kind](params, _filler(size - len(data)))
    return data


def _default_variant(kind: str, group: bool) -> str:
    if kind == "file-transfer":
        # 1:1 FT is stored as the RCS FT-over-HTTP CPIM message; group
        # Session History keeps the OMA CPM multipart/related form.
        return "related" if group else "cpim"
    return "email" if kind == "other" else ""


class _Params(NamedTuple):
    kind: str
    owner: str
    peer: str
    direction: str
    date: dt.datetime
    conversation_id: str
    contribution_id: str
    imdn_message_id: str
    message_id: str
    subject: str | None
    text: str | None
    group: bool
    variant: str
    ref_imdn_id: str
    seed: int

    @property
    def remote_uri(self) -> str:
        return GROUP_FOCUS_URI if self.group else f"tel:{self.peer}"

    @property
    def from_to(self) -> tuple[str, str]:
        """RFC 5322 From/To, oriented by direction."""
        me, other = f"<tel:{self.owner}>", f"<{self.remote_uri}>"
        return (me, other) if self.direction == "sent" else (other, me)

    @property
    def cpim_from_to(self) -> tuple[str, str]:
        me = _sip(self.owner)
        other = GROUP_FOCUS_URI if self.group else _sip(self.peer)
        return (me, other) if self.direction == "sent" else (other, me)


def _cpm_headers(p: _Params, content_type: str, extra: Sequence[tuple[str, str | None]] = ()) -> str:
    frm, to = p.from_to
    return _headers(
        [
            ("From", frm),
            ("To", to),
            ("Date", format_datetime(p.date)),
            ("Subject", p.subject),
            ("Conversation-ID", p.conversation_id),
            ("Contribution-ID", p.contribution_id),
            ("IMDN-Message-ID", p.imdn_message_id),
            ("Message-Direction", p.direction),
            *extra,
            ("Message-ID", p.message_id),
            ("MIME-Version", "1.0"),
            ("Content-Type", content_type),
        ]
    )


def _finish(headers: str, body: str) -> bytes:
    if not body.endswith(CRLF):
        body += CRLF
    return (headers + CRLF + body).encode("utf-8")


def _build_chat(p: _Params, pad: str) -> bytes:
    text = (p.text or "Hello! Are we still on for lunch tomorrow? \U0001f642") + pad
    frm, to = p.cpim_from_to
    body = _cpim(
        frm,
        to,
        p.date,
        p.imdn_message_id,
        f"Content-Type: text/plain; charset=utf-8{CRLF}",
        text,
    )
    return _finish(_cpm_headers(p, "message/cpim"), body)


def _build_imdn(p: _Params, pad: str) -> bytes:
    status = "<displayed/>" if p.direction == "sent" else "<delivered/>"
    notification = "display-notification" if p.direction == "sent" else "delivery-notification"
    comment = f"<!-- {pad} -->{CRLF}" if pad else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>{CRLF}'
        f'<imdn xmlns="urn:ietf:params:xml:ns:imdn">{CRLF}'
        f"<message-id>{p.ref_imdn_id}</message-id>{CRLF}"
        f"<datetime>{p.date.strftime('%Y-%m-%dT%H:%M:%SZ')}</datetime>{CRLF}"
        f"<{notification}><status>{status}</status></{notification}>{CRLF}"
        f"{comment}"
        f"</imdn>{CRLF}"
    )
    frm, to = p.cpim_from_to
    body = _cpim(
        frm,
        to,
        p.date,
        p.imdn_message_id,
        f"Content-Type: message/imdn+xml{CRLF}Content-Disposition: notification{CRLF}",
        xml,
    )
    return _finish(_cpm_headers(p, "message/cpim"), body)


def _ft_xml(p: _Params, size: int, pad: str) -> str:
    until = (p.date + dt.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    comment = f"<!-- {pad} -->{CRLF}" if pad else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>{CRLF}'
        f'<file xmlns="urn:gsma:params:xml:ns:rcs:rcs:fthttp">{CRLF}'
        f'<file-info type="thumbnail">{CRLF}'
        f"<file-size>2048</file-size>{CRLF}"
        f"<content-type>image/jpeg</content-type>{CRLF}"
        f'<data url="https://ft.{DOMAIN}/t/{p.imdn_message_id}" until="{until}"/>{CRLF}'
        f"</file-info>{CRLF}"
        f'<file-info type="file" file-disposition="render">{CRLF}'
        f"<file-size>{size}</file-size>{CRLF}"
        f"<file-name>IMG_{p.seed:04d}.jpg</file-name>{CRLF}"
        f"<content-type>image/jpeg</content-type>{CRLF}"
        f'<data url="https://ft.{DOMAIN}/f/{p.imdn_message_id}" until="{until}"/>{CRLF}'
        f"</file-info>{CRLF}"
        f"{comment}"
        f"</file>{CRLF}"
    )


def _build_file_transfer(p: _Params, pad: str) -> bytes:
    if p.variant == "cpim":
        frm, to = p.cpim_from_to
        body = _cpim(
            frm,
            to,
            p.date,
            p.imdn_message_id,
            f"Content-Type: application/vnd.gsma.rcs-ft-http+xml{CRLF}",
            _ft_xml(p, 482_133, pad),
        )
        return _finish(_cpm_headers(p, "message/cpim"), body)
    if p.variant != "related":
        raise ValueError("file-transfer variant must be 'cpim' or 'related'")
    # OMA CPM stored file transfer: descriptor part + the file itself.
    boundary = f"cpm-ft-{p.imdn_message_id}"
    image = _fake_jpeg(1024 + len(pad) * 3 // 4, p.seed)
    descriptor = (
        f'<?xml version="1.0" encoding="UTF-8"?>{CRLF}'
        f"<file-transfer-info>{CRLF}"
        f"<file-name>IMG_{p.seed:04d}.jpg</file-name>{CRLF}"
        f"<file-size>{len(image)}</file-size>{CRLF}"
        f"<content-type>image/jpeg</content-type>{CRLF}"
        f"<content-id>file-{p.imdn_message_id}@{DOMAIN}</content-id>{CRLF}"
        f"</file-transfer-info>{CRLF}"
    )
    body = (
        f"--{boundary}{CRLF}"
        f"Content-Type: Application/X-CPM-File-Transfer{CRLF}"
        f"{CRLF}{descriptor}"
        f"--{boundary}{CRLF}"
        f"Content-Type: image/jpeg{CRLF}"
        f"Content-ID: <file-{p.imdn_message_id}@{DOMAIN}>{CRLF}"
        f'Content-Disposition: attachment; filename="IMG_{p.seed:04d}.jpg"{CRLF}'
        f"Content-Transfer-Encoding: base64{CRLF}"
        f"{CRLF}{_b64_lines(image)}{CRLF}"
        f"--{boundary}--{CRLF}"
    )
    ctype = f'multipart/related; type="Application/X-CPM-File-Transfer"; boundary="{boundary}"'
    return _finish(_cpm_headers(p, ctype), body)


def _build_sms(p: _Params, pad: str) -> bytes:
    text = (p.text or "Your verification code is 482913") + pad
    return _finish(_cpm_headers(p, "text/plain; charset=utf-8", [("Message-Context", "pager-message")]), text)


def _build_mms(p: _Params, pad: str) -> bytes:
    boundary = f"cpm-mms-{p.imdn_message_id}"
    text = (p.text or "Look at this view!") + pad
    image = _fake_jpeg(1500, p.seed)
    body = (
        f"--{boundary}{CRLF}"
        f"Content-Type: text/plain; charset=utf-8{CRLF}"
        f"Content-ID: <text1>{CRLF}"
        f"{CRLF}{text}{CRLF}"
        f"--{boundary}{CRLF}"
        f"Content-Type: image/jpeg{CRLF}"
        f"Content-ID: <image1>{CRLF}"
        f"Content-Transfer-Encoding: base64{CRLF}"
        f"{CRLF}{_b64_lines(image)}{CRLF}"
        f"--{boundary}--{CRLF}"
    )
    ctype = f'multipart/related; type="text/plain"; boundary="{boundary}"'
    return _finish(
        _cpm_headers(p, ctype, [("Message-Context", "multimedia-message")]),
        body,
    )


def _build_session_info(p: _Params, pad: str) -> bytes:
    invited = "".join(f'<participant comm-addr="tel:{t}"/>{CRLF}' for t in (p.owner, *GROUP_MEMBERS))
    comment = f"<!-- {pad} -->{CRLF}" if pad else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>{CRLF}'
        f"<session>{CRLF}"
        f"<session-type>{'Group' if p.group else '1-1'}</session-type>{CRLF}"
        f"<sdp>v=0{CRLF}o=- 3670165678 3670165678 IN IP4 198.51.100.7{CRLF}"
        f"s=-{CRLF}c=IN IP4 198.51.100.7{CRLF}t=0 0{CRLF}"
        f"m=message 9 TCP/TLS/MSRP *{CRLF}a=accept-types:message/cpim{CRLF}</sdp>{CRLF}"
        f"<invited-participants>{CRLF}{invited}</invited-participants>{CRLF}"
        f"{comment}"
        f"</session>{CRLF}"
    )
    return _finish(_cpm_headers(p, "Application/X-CPM-Session"), xml)


def _build_group_state(p: _Params, pad: str) -> bytes:
    members = "".join(
        f'<participant name="User {t[-4:]}" comm-addr="tel:{t}" role="{"Administrator" if i == 0 else "Participant"}"/>{CRLF}'
        for i, t in enumerate((p.owner, *GROUP_MEMBERS))
    )
    comment = f"<!-- {pad} -->{CRLF}" if pad else ""
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>{CRLF}'
        f'<groupstate timestamp="{p.date.strftime("%Y-%m-%dT%H:%M:%SZ")}" '
        f'lastfocussessionid="{GROUP_FOCUS_URI}" group-type="Closed" '
        f'contributionid="{p.contribution_id}">{CRLF}'
        f"{members}{comment}"
        f"</groupstate>{CRLF}"
    )
    return _finish(_cpm_headers(p, "Application/group-state-object+xml"), xml)


def _build_other(p: _Params, pad: str) -> bytes:
    if p.variant not in ("email", "voicemail"):
        raise ValueError("other variant must be 'email' or 'voicemail'")
    if p.variant == "voicemail":
        # A voicemail: Message-Context voice-message is *not* an sms/mms rule.
        boundary = f"vm-{p.imdn_message_id}"
        audio = random.Random(p.seed).randbytes(800)
        body = (
            f"--{boundary}{CRLF}Content-Type: text/plain; charset=utf-8{CRLF}{CRLF}"
            f"You have a new voice message (0:07).{pad}{CRLF}"
            f"--{boundary}{CRLF}Content-Type: audio/amr{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}"
            f'Content-Disposition: attachment; filename="voicemail.amr"{CRLF}{CRLF}'
            f"{_b64_lines(b'#!AMR' + audio)}{CRLF}"
            f"--{boundary}--{CRLF}"
        )
        headers = _headers(
            [
                ("From", f"<tel:{p.peer}>"),
                ("To", f"<tel:{p.owner}>"),
                ("Date", format_datetime(p.date)),
                ("Subject", p.subject),
                ("Message-Context", "voice-message"),
                ("Message-ID", p.message_id),
                ("MIME-Version", "1.0"),
                ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
            ]
        )
        return _finish(headers, body)
    text = (
        p.text
        or f"Hi,{CRLF}{CRLF}the quarterly report is attached to the shared drive.{CRLF}{CRLF}Regards,{CRLF}Carol"
    ) + pad
    headers = _headers(
        [
            ("From", f"Carol Example <carol@{DOMAIN}>"),
            ("To", f"<{p.owner.lstrip('+')}@{DOMAIN}>"),
            ("Date", format_datetime(p.date)),
            ("Subject", p.subject or "Quarterly report"),
            ("Message-ID", p.message_id),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8"),
        ]
    )
    return _finish(headers, text)


_BUILDERS: dict[str, Callable[[_Params, str], bytes]] = {
    "chat": _build_chat,
    "imdn": _build_imdn,
    "file-transfer": _build_file_transfer,
    "sms": _build_sms,
    "mms": _build_mms,
    "session-info": _build_session_info,
    "group-state": _build_group_state,
    "other": _build_other,
}


# -- reference classifier ---------------------------------------------------


def _header_block(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Parse an unfolded header block into lower-case name -> value, return the rest."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, rest = raw.partition(b"\n\n")
    headers: dict[str, str] = {}
    last: str | None = None
    for line in head.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t") and last:
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if colon:
            last = name.strip().lower()
            headers.setdefault(last, value.strip())
    return headers, rest


def classify_reference(message: bytes) -> str:
    """Classify a stored object per :data:`EXPECTED_KINDS` (test oracle)."""
    headers, body = _header_block(message)
    ctype = headers.get("content-type", "").lower()
    media = ctype.split(";", 1)[0].strip()
    context = headers.get("message-context", "").strip().lower()
    if media == "application/x-cpm-session":
        return "session-info"
    if media == "application/group-state-object+xml":
        return "group-state"
    if media == "multipart/related" and 'type="application/x-cpm-file-transfer"' in ctype.replace(" ", ""):
        return "file-transfer"
    if context == "pager-message":
        return "sms"
    if context == "multimedia-message":
        return "mms"
    if media == "message/cpim":
        _cpim_headers, entity = _header_block(body)
        inner, _ = _header_block(entity)
        inner_media = inner.get("content-type", "").split(";", 1)[0].strip().lower()
        if inner_media == "application/vnd.gsma.rcs-ft-http+xml":
            return "file-transfer"
        if inner_media == "message/imdn+xml":
            return "imdn"
        return "chat"
    return "other"


# -- store seeding ----------------------------------------------------------

ClientSource = imapclient.IMAPClient | Callable[[str], imapclient.IMAPClient]


def _ensure_folder(client: imapclient.IMAPClient, folder: str) -> None:
    """CREATE folder and its ancestors (so parents are selectable, not \\NoSelect)."""
    parts = folder.split("/")
    for i in range(1, len(parts) + 1):
        name = "/".join(parts[:i])
        if not client.folder_exists(name):
            client.create_folder(name)


def _append(
    client: imapclient.IMAPClient,
    folder: str,
    kind: str,
    data: bytes,
    when: dt.datetime,
    flags: Sequence[bytes],
) -> ManifestEntry:
    resp = client.append(folder, data, flags=tuple(flags), msg_time=when)
    return ManifestEntry(folder, parse_appenduid(resp), kind)


def seed_sample_store(
    client: ClientSource,
    user: str,
    *,
    now: dt.datetime | None = None,
) -> list[ManifestEntry]:
    """Create a representative CPM store for ``user`` and return its manifest.

    ``client`` is a logged-in IMAPClient for ``user`` or a factory
    ``f(user) -> IMAPClient`` (e.g. ``Dovecot.imap_direct``; the connection
    is logged out afterwards).  Layout::

        INBOX                          e-mail + voicemail           (other)
        Default/tel:+15551234567       1:1 chat, IMDNs, FT, SMS, MMS
        Default/<conv-id>/<contrib-id> session-info, group-state, chats, FT
        RCSMessageStore                two kept chat messages

    Dates are spread over the past ~30 days (header Date = INTERNALDATE) so
    age-based policies can be exercised.  Not idempotent: seeding twice
    appends everything twice.
    """
    owns_client = not isinstance(client, imapclient.IMAPClient)
    imap = client(user) if owns_client else client  # type: ignore[operator]
    assert isinstance(imap, imapclient.IMAPClient)
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    me = user_tel(user)
    manifest: list[ManifestEntry] = []
    seen = [imapclient.SEEN]
    seq = 0

    def add(folder: str, kind: str, days_ago: float, flags: Sequence[bytes] = seen, **kw: object) -> str:
        nonlocal seq
        seq += 1
        when = now - dt.timedelta(days=days_ago)
        imdn_id = f"{user}-{seq:04d}-{uuid.uuid5(uuid.NAMESPACE_URL, f'{user}/{seq}').hex[:12]}"
        data = make_object(
            kind,
            owner=me,
            date=when,
            imdn_message_id=imdn_id,
            seed=seq,
            **kw,  # type: ignore[arg-type]
        )
        manifest.append(_append(imap, folder, kind, data, when, flags))
        return imdn_id

    try:
        for folder in (ONE_TO_ONE_FOLDER, SESSION_FOLDER, RCS_STORE_FOLDER):
            _ensure_folder(imap, folder)

        # 1:1 conversation history with the peer.
        conv = str(uuid.uuid5(uuid.NAMESPACE_URL, f"cpmproxy:sample:{user}:1-1"))
        one = {"conversation_id": conv, "peer": PEER_TEL}
        first = add(ONE_TO_ONE_FOLDER, "chat", 28, direction="sent", text="Hi! Long time no see.", **one)
        add(ONE_TO_ONE_FOLDER, "imdn", 28, direction="received", ref_imdn_id=first, **one)
        reply = add(
            ONE_TO_ONE_FOLDER, "chat", 27.9, direction="received", text="Hey! Indeed. How are you?", **one
        )
        add(ONE_TO_ONE_FOLDER, "imdn", 27.9, direction="sent", ref_imdn_id=reply, **one)
        add(ONE_TO_ONE_FOLDER, "file-transfer", 14, direction="received", variant="cpim", **one)
        add(ONE_TO_ONE_FOLDER, "sms", 7, direction="received", **one)
        add(ONE_TO_ONE_FOLDER, "mms", 3, direction="sent", **one)
        add(ONE_TO_ONE_FOLDER, "chat", 1, direction="sent", text="See you tomorrow at noon.", **one)
        add(ONE_TO_ONE_FOLDER, "chat", 0.1, flags=(), direction="received", text="Great, see you!", **one)

        # Group chat Session History folder.
        grp = {
            "conversation_id": SESSION_CONVERSATION_ID,
            "contribution_id": SESSION_CONTRIBUTION_ID,
            "group": True,
            "subject": "Weekend trip",
        }
        add(SESSION_FOLDER, "session-info", 10, direction="sent", **grp)
        add(SESSION_FOLDER, "group-state", 10, direction="received", **grp)
        add(SESSION_FOLDER, "chat", 10, direction="sent", text="Who is in for Saturday?", **grp)
        add(SESSION_FOLDER, "chat", 9.9, direction="received", text="Me!", **grp)
        add(SESSION_FOLDER, "file-transfer", 9.8, direction="received", variant="related", **grp)
        add(SESSION_FOLDER, "chat", 9.7, flags=(), direction="received", text="Map attached.", **grp)

        # Messages the user explicitly kept.
        add(RCS_STORE_FOLDER, "chat", 20, direction="received", text="Door code is 4711", peer=PEER_TEL)
        add(RCS_STORE_FOLDER, "chat", 5, direction="sent", text="Remember: flight LH 123", peer=PEER_TEL)

        # Non-CPM content.
        add("INBOX", "other", 2, flags=(), subject="Quarterly report")
        add(
            "INBOX",
            "other",
            0.5,
            flags=(),
            variant="voicemail",
            subject=f"Voicemail from {PEER_TEL}",
            peer=PEER_TEL,
        )
    finally:
        if owns_client:
            imap.logout()
    return manifest


def generate_store(
    client: imapclient.IMAPClient,
    folder: str,
    count: int,
    kinds_mix: Mapping[str, float] | Sequence[str] = ("chat",),
    size: int | None = None,
    *,
    owner: str = "+15557654321",
    peer: str = PEER_TEL,
    days: float = 60.0,
    seed: int = 0,
    now: dt.datetime | None = None,
) -> list[ManifestEntry]:
    """Append ``count`` objects to ``folder`` (created if needed) and return the manifest.

    ``kinds_mix`` is either a sequence of kinds used round-robin or a
    mapping kind -> weight sampled deterministically from ``seed``.  Dates
    are spread evenly from ``days`` ago to now (oldest first, so UID order
    matches age); ``size`` pads each object to about that many bytes.
    """
    rnd = random.Random(seed)
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    if isinstance(kinds_mix, Mapping):
        population, weights = list(kinds_mix), list(kinds_mix.values())
        kinds = rnd.choices(population, weights=weights, k=count)
    else:
        if not kinds_mix:
            raise ValueError("kinds_mix must not be empty")
        kinds = [kinds_mix[i % len(kinds_mix)] for i in range(count)]
    _ensure_folder(client, folder)
    conv = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
    manifest: list[ManifestEntry] = []
    for i, kind in enumerate(kinds):
        when = now - dt.timedelta(days=days * (count - i) / max(count, 1))
        data = make_object(
            kind,
            owner=owner,
            peer=peer,
            direction=rnd.choice(("sent", "received")),
            date=when,
            conversation_id=conv,
            size=size,
            seed=seed * 1_000_003 + i,
            variant=("voicemail" if i % 2 else "email") if kind == "other" else None,
        )
        flags = (imapclient.SEEN,) if rnd.random() < 0.7 else ()
        manifest.append(_append(client, folder, kind, data, when, flags))
    return manifest
