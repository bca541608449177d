from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmproxy.imap.mutf7 import decode, encode
from cpmproxy.imap.tokens import TokenError
from plugins.wire import command_mailbox_name

VECTORS = [
    ("", b""),
    ("INBOX", b"INBOX"),
    ("Entwürfe", b"Entw&APw-rfe"),
    ("&", b"&-"),
    ("a&b&&c", b"a&-b&-&-c"),
    ("台北", b"&U,BTFw-"),
    ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("Envoyés", b"Envoy&AOk-s"),
    ("Корзина", b"&BBoEPgRABDcEOAQ9BDA-"),
    ("😀", b"&2D3eAA-"),  # astral plane: a UTF-16 surrogate pair
    ("a-b", b"a-b"),
    ("ä-", b"&AOQ--"),
    ("\x00", b"&AAA-"),
    ("\t\x7f", b"&AAkAfw-"),
    ("ä&ö", b"&AOQ-&-&APY-"),
    ("Ã¤", b"&AMMApA-"),
]


@pytest.mark.parametrize("text, encoded", VECTORS)
def test_vectors(text: str, encoded: bytes) -> None:
    assert encode(text) == encoded
    assert decode(encoded) == text


def test_decode_accepts_bytes_like() -> None:
    assert decode(bytearray(b"Entw&APw-rfe")) == "Entwürfe"
    assert decode(memoryview(b"&-")) == "&"


@pytest.mark.parametrize(
    "bad",
    [
        b"&",  # unterminated
        b"abc&U,BTFw",  # unterminated
        b"&U,BTFw",
        b"&U,B-",  # incomplete UTF-16 code unit
        b"&A-",  # length 1 mod 4
        b"&AGE-",  # encodes "a": must be written directly
        b"&ACY-",  # encodes "&": must be "&-"
        b"&AOQ-&AOQ-",  # adjacent sections: non-canonical spelling of "&AOQA5A-"
        b"&AOR-",  # non-zero padding bits
        b"&AO=-",  # '=' padding not allowed
        b"&AO/-",  # '/' is ',' in modified base64
        b"&A O-",
        b"&2D0-",  # lone high surrogate
        b"&3gA-",  # lone low surrogate
        b"Entw\xc3\xbcrfe",  # raw 8-bit
        b"\xff",
        b"a\x00b",  # raw control characters must be encoded
        b"a\r\nb",
        b"\x7f",
    ],
)
def test_decode_rejects(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode(bad)


def test_encode_rejects_lone_surrogate() -> None:
    with pytest.raises(ValueError):
        encode("\ud800")


def test_printable_ascii_passes_through() -> None:
    printable = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x26)
    assert encode(printable) == printable.encode()
    assert decode(printable.encode()) == printable


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_round_trip(text: str) -> None:
    encoded = encode(text)
    assert encoded.isascii()
    assert decode(encoded) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("a&-äöü日本😀 \x00~/")))
def test_round_trip_dense(text: str) -> None:
    assert decode(encode(text)) == text


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40))
def test_decode_is_canonical_or_raises(data: bytes) -> None:
    # Whatever decodes must be exactly what encode produces: no two spellings of one name.
    try:
        text = decode(data)
    except ValueError:
        return
    assert encode(text) == data


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="&-AZaz09+,/=.", max_size=20).map(str.encode))
def test_decode_near_misses(data: bytes) -> None:
    try:
        text = decode(data)
    except ValueError:
        return
    assert encode(text) == data


def test_a_commands_mailbox_in_another_spelling_is_refused() -> None:
    """A name the backend may read as another (Dovecot ignores the last base64 character's padding bits) is
    refused in a command rather than judged by the policy as a folder of another name."""
    assert command_mailbox_name(b"Priv&AOk-") == "Priv\u00e9"
    assert command_mailbox_name(b"inbox/a&-b") == "INBOX/a&b"
    assert command_mailbox_name("Priv\u00e9".encode()) == "Priv\u00e9"  # (8-bit: UTF-8, as UTF8=ACCEPT writes)
    for raw in (b"Priv&AOn-", b"&AFg-", b"&AOk-&AOk-"):  # (read as another name by a lenient reader)
        with pytest.raises(TokenError):
            command_mailbox_name(raw)
    for raw in (b"&AOk", b"x&", b"&A*k-", b"&AOkA-"):  # (no name at all: the backend says so)
        assert command_mailbox_name(raw) == raw.decode()
    assert decode(b"&AOn-", strict=False) == "\u00e9" and decode(b"&AFg-&AOk-", strict=False) == "X\u00e9"
