from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmproxy.imap.tokens import (
    NIL,
    Atom,
    Literal,
    LiteralRef,
    Nil,
    ParenList,
    Quoted,
    Token,
    TokenError,
    astring,
    astring_text,
    format_list,
    format_token,
    format_tokens,
    nstring,
    parse_command,
    parse_response_head,
    quote,
    space_run,
    token_text,
    tokenize,
)

FAST = settings(max_examples=120, deadline=None)


def A(v: bytes) -> Atom:
    return Atom(v)


def L(*items: Token) -> ParenList:
    return ParenList(list(items))


# -- tokenize: well-formed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, tokens",
    [
        (b"", []),
        (b"   ", []),
        (b"FLAGS", [A(b"FLAGS")]),
        (b"1:* (FLAGS)", [A(b"1:*"), L(A(b"FLAGS"))]),
        (b"()", [L()]),
        (b"(())", [L(L())]),
        (b"(a (b (c)) d)", [L(A(b"a"), L(A(b"b"), L(A(b"c"))), A(b"d"))]),
        (b"NIL nil Nil NILS", [NIL, NIL, NIL, A(b"NILS")]),
        (b'""', [Quoted(b"")]),
        (b'"a b" "c\\"d" "e\\\\f"', [Quoted(b"a b"), Quoted(b'c"d'), Quoted(b"e\\f")]),
        (b'"(not a list)"', [Quoted(b"(not a list)")]),
        (b'"tab\there"', [Quoted(b"tab\there")]),
        ('"Entwürfe"'.encode(), [Quoted("Entwürfe".encode())]),  # UTF8=ACCEPT
        (b"(\\Seen \\Answered $Forwarded)", [L(A(b"\\Seen"), A(b"\\Answered"), A(b"$Forwarded"))]),
        (b'LIST "" *', [A(b"LIST"), Quoted(b""), A(b"*")]),
        (b'LIST "" %/%', [A(b"LIST"), Quoted(b""), A(b"%/%")]),
        (b"a  b\t", None),  # tab is a CTL: error (checked below)
        (b"  a   b  ", [A(b"a"), A(b"b")]),  # runs of spaces are tolerated
        (b"( a )", [L(A(b"a"))]),
        (b"foo]", [A(b"foo]")]),
        (b"12 0 4294967295", [A(b"12"), A(b"0"), A(b"4294967295")]),
        (b"\xc3\xa4bc", [A(b"\xc3\xa4bc")]),  # 8-bit atoms tolerated
        (b"~foo", [A(b"~foo")]),
    ],
)
def test_tokenize(line: bytes, tokens: list[Token] | None) -> None:
    if tokens is None:
        with pytest.raises(TokenError):
            tokenize(line)
    else:
        assert tokenize(line) == tokens


def test_brackets_are_part_of_atoms() -> None:
    line = b"1 FETCH (BODY.PEEK[HEADER.FIELDS (Message-Context Content-Type)]<0.100> BODY[] BINARY[1.2])"
    assert tokenize(line) == [
        A(b"1"),
        A(b"FETCH"),
        L(
            A(b"BODY.PEEK[HEADER.FIELDS (Message-Context Content-Type)]<0.100>"),
            A(b"BODY[]"),
            A(b"BINARY[1.2]"),
        ),
    ]
    # Only after BODY and BINARY does a '[' open a section (up to the first ']'); elsewhere it is an atom
    # character, as in keywords Dovecot stores ("[", "a[b"; found by the command fuzzer: such a keyword
    # in a mailbox made its SELECT's "* FLAGS" unreadable and the proxy ended the session).
    assert tokenize(b"(\\Seen [ a[b $[) x") == [L(A(b"\\Seen"), A(b"["), A(b"a[b"), A(b"$[")), A(b"x")]
    assert tokenize(b"(FLAGS ([) UID 5 BODY[HEADER] {3}\r\nabc)") == [
        L(A(b"FLAGS"), L(A(b"[")), A(b"UID"), A(b"5"), A(b"BODY[HEADER]"), Literal(b"abc"))]
    assert tokenize(b"BODY.PEEK[HEADER.FIELDS (a[b)] binary.size[1] X[1 2]") == [
        A(b"BODY.PEEK[HEADER.FIELDS (a[b)]"), A(b"binary.size[1]"), A(b"X[1"), A(b"2]")]
    assert tokenize(b"[CAPABILITY IMAP4rev1 X] rest") == [A(b"[CAPABILITY"), A(b"IMAP4rev1"), A(b"X]"), A(b"rest")]
    assert tokenize(b"[READ-WRITE]") == [A(b"[READ-WRITE]")]
    assert tokenize(b"a[b[c]d]e f") == [A(b"a[b[c]d]e"), A(b"f")]
    # Nor after BODY or BINARY when the list it is in closes, or the line ends, before any ']': keywords
    # "BODY[", "body[x" (Dovecot stores them too: read as sections, "SEARCH KEYWORD BODY[" under a filtered
    # view was refused with BAD, and "FLAGS (BODY[)" was unreadable).
    assert tokenize(b"(BODY[HEADER x) (FLAGS (BODY[ body[x) UID 5 BODY[HEADER.FIELDS (A)] {1}\r\nx)") == [
        L(A(b"BODY[HEADER"), A(b"x")),
        L(A(b"FLAGS"), L(A(b"BODY["), A(b"body[x")), A(b"UID"), A(b"5"), A(b"BODY[HEADER.FIELDS (A)]"),
          Literal(b"x"))]
    assert tokenize(b"KEYWORD BODY[ UNKEYWORD binary.peek[1") == [
        A(b"KEYWORD"), A(b"BODY["), A(b"UNKEYWORD"), A(b"binary.peek[1")]
    assert tokenize(b"KEYWORD BODY[ SUBJECT {3}\r\nabc") == [A(b"KEYWORD"), A(b"BODY["), A(b"SUBJECT"), Literal(b"abc")]
    with pytest.raises(TokenError, match="unterminated"):  # (a literal ahead: the line is not all there)
        tokenize(b"(BODY[HEADER.FIELDS ({4}")
    # A header field name as a literal, its bytes inline (a command the proxy gathered): part of the atom,
    # whatever its bytes ("]" too).
    assert tokenize(b"(BODY.PEEK[HEADER.FIELDS ({4+}\r\nFrom {2}\r\n]x)] UID)") == [
        L(A(b"BODY.PEEK[HEADER.FIELDS ({4+}\r\nFrom {2}\r\n]x)]"), A(b"UID"))]
    # A quoted ']' inside a section does not end it.
    assert tokenize(b'BODY[HEADER.FIELDS ("X]" Y)] Z') == [A(b'BODY[HEADER.FIELDS ("X]" Y)]'), A(b"Z")]
    assert tokenize(b"BODY[1]<0.10>") == [A(b"BODY[1]<0.10>")]


def test_fetch_response_with_literal() -> None:
    line = b"5 FETCH (UID 9 BODY[HEADER.FIELDS (SUBJECT)] {12}\r\nSubject: x\r\n FLAGS (\\Seen))"
    assert tokenize(line) == [
        A(b"5"),
        A(b"FETCH"),
        L(
            A(b"UID"),
            A(b"9"),
            A(b"BODY[HEADER.FIELDS (SUBJECT)]"),
            Literal(b"Subject: x\r\n"),
            A(b"FLAGS"),
            L(A(b"\\Seen")),
        ),
    ]


def test_inline_literals() -> None:
    assert tokenize(b"a APPEND INBOX {5}\r\nhello (\\Seen) {3}\r\nabc") == [
        A(b"a"),
        A(b"APPEND"),
        A(b"INBOX"),
        Literal(b"hello"),
        L(A(b"\\Seen")),
        Literal(b"abc"),
    ]
    assert tokenize(b"{3+}\r\nabc {2-}\r\nxy ~{4}\r\n\x00\r\n\x01 {0}\r\n") == [
        Literal(b"abc", non_sync=True),
        Literal(b"xy", non_sync=True),
        Literal(b"\x00\r\n\x01", binary=True),
        Literal(b""),
    ]
    # Literal payloads are opaque: parens, quotes and CRLF inside them mean nothing.
    assert tokenize(b'({4}\r\n)"(\r)') == [L(Literal(b')"(\r'))]
    # Bare LF after the marker is tolerated, like the framer does.
    assert tokenize(b"{2}\nab") == [Literal(b"ab")]


def test_literal_ref_at_end_of_line() -> None:
    assert tokenize(b"a APPEND INBOX (\\Seen) {310}") == [
        A(b"a"),
        A(b"APPEND"),
        A(b"INBOX"),
        L(A(b"\\Seen")),
        LiteralRef(310),
    ]
    assert tokenize(b"x {5+}") == [A(b"x"), LiteralRef(5, non_sync=True)]
    assert tokenize(b"x ~{5}") == [A(b"x"), LiteralRef(5, binary=True)]
    # Open parentheses before a pending literal are closed implicitly: the tokens are a prefix.
    assert tokenize(b"a SEARCH OR (SUBJECT {3}") == [
        A(b"a"),
        A(b"SEARCH"),
        A(b"OR"),
        L(A(b"SUBJECT"), LiteralRef(3)),
    ]


def test_supplied_literals() -> None:
    assert tokenize(b"a LOGIN {4} {6}", [b"user", b"secret"]) == [
        A(b"a"),
        A(b"LOGIN"),
        Literal(b"user"),
        Literal(b"secret"),
    ]
    assert tokenize(b"(a {1}) {2+}", (b"x", bytearray(b"yz"))) == [
        L(A(b"a"), Literal(b"x")),
        Literal(b"yz", non_sync=True),
    ]
    # Inline payloads take precedence over supplied ones.
    assert tokenize(b"{1}\r\nq {1}", [b"r"]) == [Literal(b"q"), Literal(b"r")]


@pytest.mark.parametrize(
    "line, literals, fragment",
    [
        (b"(a", (), "unbalanced '('"),
        (b"a)", (), "unbalanced ')'"),
        (b"((a)", (), "unbalanced '('"),
        (b'"abc', (), "unterminated quoted string"),
        (b'"a\\b"', (), "invalid escape"),
        (b'"a\\', (), "unterminated quoted string"),
        (b'"a\rb"', (), "control character 0x0d in quoted string"),
        (b'"a\nb"', (), "control character 0x0a in quoted string"),
        (b'"a\x00b"', (), "control character 0x00 in quoted string"),
        (b"a\x01b", (), "control character 0x01"),
        (b"a\tb", (), "control character 0x09"),
        (b"\x7f", (), "control character 0x7f"),
        (b'a"b"', (), "expected space"),
        (b'"a"b', (), "expected space"),
        (b"(a)b", (), "expected space"),
        (b"a(b)", (), "expected space"),
        (b"a{3}", (), "expected space"),
        (b"{3}\r\nab", (), "truncated"),
        (b"{3}x", (), "must be followed by CRLF"),
        (b"{3} x", (), "must be followed by CRLF"),
        (b"{abc}", (), "malformed literal marker"),
        (b"{}", (), "malformed literal marker"),
        (b"{-1}", (), "malformed literal marker"),
        (b"~{x}", (), "malformed literal marker"),
        (b"{99999999999999999999}", (), "out of range"),
        (b"{3}\r\nabcd", (), "expected space"),
        (b"{3}", (b"ab",), "announced as 3 bytes but 2 supplied"),
        (b"a", (b"x",), "not used"),
        (b"BODY[HEADER.FIELDS (A {3}", (), "unterminated '['"),  # (a literal in its list ends the line)
        (b"BODY[a\rb]", (), "control character 0x0d inside '[...]'"),
        (b"BODY[HEADER.FIELDS (\r\nFrom)]", (), "control character 0x0d inside '[...]'"),
        (b"BODY[HEADER.FIELDS ({9+}\r\nFrom)]", (), "literal inside '[...]' truncated"),
        (b'BODY["]"', (), "expected space"),  # (no ']' closes it: a keyword's '[', then a quoted string)
        (b"a\r\n", (), "control character 0x0d"),
        (b"(" * 101, (), "nested too deeply"),
    ],
)
def test_tokenize_errors(line: bytes, literals: tuple[bytes, ...], fragment: str) -> None:
    with pytest.raises(TokenError) as info:
        tokenize(line, literals)
    assert fragment in str(info.value)


def test_token_error_offset() -> None:
    with pytest.raises(TokenError) as info:
        tokenize(b"abc d\x01")
    assert info.value.offset == 5
    assert "at offset 5" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_nesting_limit_is_generous() -> None:
    line = b"(" * 100 + b")" * 100
    tokens = tokenize(line)
    depth = 0
    tok: Token = tokens[0]
    while isinstance(tok, ParenList) and tok.items:
        tok = tok.items[0]
        depth += 1
    assert depth == 99


def test_tokenize_accepts_bytes_like() -> None:
    assert tokenize(bytearray(b"a (b)")) == [A(b"a"), L(A(b"b"))]
    assert tokenize(memoryview(b'"x"')) == [Quoted(b"x")]


# -- token helpers ---------------------------------------------------------------------------------


def test_atom_helpers() -> None:
    assert A(b"123").is_number()
    assert A(b"123").as_int() == 123
    assert A(b"0").as_int() == 0
    assert not A(b"1:3").is_number()
    assert not A(b"").is_number()
    assert not A("١".encode()).is_number()
    with pytest.raises(ValueError):
        A(b"1:3").as_int()
    with pytest.raises(ValueError):
        A(b"9" * 100).as_int()
    assert A(b"fetch").upper() == b"FETCH"


@pytest.mark.parametrize("written", [b"NIL", b"nil", b"Nil"])
def test_nil_is_nil_in_any_case_and_a_mailbox_of_that_name_where_an_astring_goes(written: bytes) -> None:
    """``SELECT nil`` selects the mailbox "nil" (Dovecot): the atom NIL keeps the case it was written in,
    for astring positions, and is written out so again (a rewritten command names the same mailbox)."""
    (tok,) = tokenize(written)
    assert tok == NIL and isinstance(tok, Nil) and hash(tok) == hash(NIL)
    assert astring_text(tok) == astring(tok) == written
    assert token_text(tok) is None and nstring(tok) is None  # (where NIL means no value, it still does)
    assert format_token(tok) == written
    assert astring_text(ParenList([])) is None


def test_tokens_are_immutable_values() -> None:
    assert Atom(b"x") != Quoted(b"x")
    assert Quoted(b"x") != Literal(b"x")
    assert Nil() == NIL
    assert repr(NIL) == "NIL"
    assert hash(Atom(b"x")) == hash(Atom(b"x"))
    with pytest.raises(AttributeError):
        Atom(b"x").value = b"y"  # type: ignore[misc]


def test_astring_nstring() -> None:
    assert astring(A(b"INBOX")) == b"INBOX"
    assert astring(Quoted(b"a b")) == b"a b"
    assert astring(Literal(b"x\r\ny")) == b"x\r\ny"
    assert astring(NIL) == b"NIL"
    with pytest.raises(TokenError):
        astring(L())
    with pytest.raises(TokenError):
        astring(LiteralRef(3))
    assert nstring(NIL) is None
    assert nstring(Quoted(b"")) == b""
    assert nstring(Literal(b"z")) == b"z"
    with pytest.raises(TokenError):
        nstring(A(b"x"))


# -- parse_command ---------------------------------------------------------------------------------


def test_parse_command_uid_fetch() -> None:
    line = b"a1 UID FETCH 1:* (FLAGS)"
    cmd = parse_command(line)
    assert (cmd.tag, cmd.name, cmd.uid) == (b"a1", b"FETCH", True)
    assert line[cmd.args_offset :] == b"1:* (FLAGS)" == cmd.raw_args
    assert cmd.args == [A(b"1:*"), L(A(b"FLAGS"))]
    assert cmd.args is cmd.args  # tokenized once


@pytest.mark.parametrize(
    "line, tag, name, uid, raw_args",
    [
        (b"a NOOP", b"a", b"NOOP", False, b""),
        (b"a noop", b"a", b"NOOP", False, b""),
        (b"A001 login joe secret", b"A001", b"LOGIN", False, b"joe secret"),
        (b"x uid store 1 +FLAGS (\\Seen)", b"x", b"STORE", True, b"1 +FLAGS (\\Seen)"),
        (b"t.1 UID EXPUNGE", b"t.1", b"EXPUNGE", True, b""),
        (b"a[1 X-FOO-BAR baz", b"a[1", b"X-FOO-BAR", False, b"baz"),
        (b"$#&'!~ SELECT INBOX", b"$#&'!~", b"SELECT", False, b"INBOX"),
        (b"a UID", b"a", b"UID", False, None),  # error: no command after UID
        (b"a APPEND INBOX {5}\r\nhello", b"a", b"APPEND", False, b"INBOX {5}\r\nhello"),
    ],
)
def test_parse_command(line: bytes, tag: bytes, name: bytes, uid: bool, raw_args: bytes | None) -> None:
    if raw_args is None:
        with pytest.raises(TokenError):
            parse_command(line)
        return
    cmd = parse_command(line)
    assert (cmd.tag, cmd.name, cmd.uid, cmd.raw_args) == (tag, name, uid, raw_args)
    assert cmd.line is line


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"", "empty command line"),
        (b" NOOP", "empty tag"),
        (b"a", "missing command name"),
        (b"a ", "missing command name"),
        (b"a+b NOOP", "'+' in tag"),
        (b"a(b NOOP", "in tag"),
        (b"a)b NOOP", "in tag"),
        (b"a{b NOOP", "in tag"),
        (b"a%b NOOP", "in tag"),
        (b"* NOOP", "in tag"),
        (b"+ NOOP", "in tag"),
        (b'a"b NOOP', "in tag"),
        (b"a\\b NOOP", "in tag"),
        (b"a]b NOOP", "in tag"),
        (b"a\x01 NOOP", "control character 0x01 in tag"),
        (b"\xc3\xa4 NOOP", "in tag"),
        (b"a  NOOP", "invalid command name"),
        (b"a 123", "invalid command name"),
        (b"a FETCH(", "invalid command name"),
        (b"a UID  FETCH", "after UID"),
        (b"a UID ", "after UID"),
    ],
)
def test_parse_command_errors(line: bytes, fragment: str) -> None:
    with pytest.raises(TokenError) as info:
        parse_command(line)
    assert fragment in str(info.value)


def test_parse_command_args_errors_are_lazy() -> None:
    cmd = parse_command(b"a FETCH 1 (FLAGS")
    assert cmd.name == b"FETCH"
    with pytest.raises(TokenError) as info:
        _ = cmd.args
    assert info.value.offset == len(b"a FETCH 1 (FLAGS")  # offsets refer to the whole line


def test_parse_command_with_supplied_literals() -> None:
    cmd = parse_command(b"a LOGIN {3} {6}", [b"joe", b"secret"])
    assert cmd.args == [Literal(b"joe"), Literal(b"secret")]
    cmd = parse_command(b"a LOGIN {3}\r\njoe {6+}\r\nsecret")
    assert cmd.args == [Literal(b"joe"), Literal(b"secret", non_sync=True)]


# -- parse_response_head ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, kind, tag, number, name, code, text",
    [
        (b"* 5 EXISTS", "untagged", None, 5, b"EXISTS", None, b""),
        (b"* 0 RECENT", "untagged", None, 0, b"RECENT", None, b""),
        (b"* 12 FETCH (FLAGS (\\Seen))", "untagged", None, 12, b"FETCH", None, b"(FLAGS (\\Seen))"),
        (b"* 4294967295 EXPUNGE", "untagged", None, 4294967295, b"EXPUNGE", None, b""),
        (b"* CAPABILITY IMAP4rev1 IDLE", "untagged", None, None, b"CAPABILITY", None, b"IMAP4rev1 IDLE"),
        (
            b'* LIST (\\HasNoChildren) "/" INBOX',
            "untagged",
            None,
            None,
            b"LIST",
            None,
            b'(\\HasNoChildren) "/" INBOX',
        ),
        (
            b"* ok [READ-WRITE] SELECT completed",
            "untagged",
            None,
            None,
            b"OK",
            b"READ-WRITE",
            b"SELECT completed",
        ),
        (
            b"* OK [PERMANENTFLAGS (\\Seen \\*)] Limited",
            "untagged",
            None,
            None,
            b"OK",
            b"PERMANENTFLAGS (\\Seen \\*)",
            b"Limited",
        ),
        (
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready",
            "untagged",
            None,
            None,
            b"OK",
            b"CAPABILITY IMAP4rev1 LITERAL+",
            b"ready",
        ),
        (b"* OK [ALERT]", "untagged", None, None, b"OK", b"ALERT", b""),
        (b"* OK [ALERT]x", "untagged", None, None, b"OK", b"ALERT", b"x"),
        (b"* OK", "untagged", None, None, b"OK", None, b""),
        (b"* OK no code [here]", "untagged", None, None, b"OK", None, b"no code [here]"),
        (
            b"* BYE [UNAVAILABLE] shutting down",
            "untagged",
            None,
            None,
            b"BYE",
            b"UNAVAILABLE",
            b"shutting down",
        ),
        (
            b"* PREAUTH [CAPABILITY IMAP4rev1] hi",
            "untagged",
            None,
            None,
            b"PREAUTH",
            b"CAPABILITY IMAP4rev1",
            b"hi",
        ),
        (
            b'* NO [BADCHARSET ("a]b" UTF-8)] x',
            "untagged",
            None,
            None,
            b"NO",
            b'BADCHARSET ("a]b" UTF-8)',
            b"x",
        ),
        (  # (keywords with a '[', which Dovecot stores: the code ends at the first ']')
            b"* OK [PERMANENTFLAGS (\\Seen [ a[b \\*)] Flags permitted.",
            "untagged",
            None,
            None,
            b"OK",
            b"PERMANENTFLAGS (\\Seen [ a[b \\*)",
            b"Flags permitted.",
        ),
        (b"* FLAGS [not a code]", "untagged", None, None, b"FLAGS", None, b"[not a code]"),
        (b"a1 OK [READ-ONLY] done", "tagged", b"a1", None, b"OK", b"READ-ONLY", b"done"),
        (b"a1 no [TRYCREATE] nope", "tagged", b"a1", None, b"NO", b"TRYCREATE", b"nope"),
        (b"A0042 BAD syntax", "tagged", b"A0042", None, b"BAD", None, b"syntax"),
        (b"+ idling", "continuation", None, None, None, None, b"idling"),
        (b"+", "continuation", None, None, None, None, b""),
        (b"+ ", "continuation", None, None, None, None, b""),
        (b"+YQ==", "continuation", None, None, None, None, b"YQ=="),
    ],
)
def test_parse_response_head(
    line: bytes,
    kind: str,
    tag: bytes | None,
    number: int | None,
    name: bytes | None,
    code: bytes | None,
    text: bytes,
) -> None:
    head = parse_response_head(line)
    assert (head.kind, head.tag, head.number, head.name, head.code) == (kind, tag, number, name, code)
    assert line[head.text_offset :] == text


def test_response_code_name() -> None:
    assert parse_response_head(b"* OK [capability IMAP4rev1] x").code_name == b"CAPABILITY"
    assert parse_response_head(b"* OK [UIDNEXT 5] x").code_name == b"UIDNEXT"
    assert parse_response_head(b"* OK x").code_name is None


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"*",
        b"* ",
        b"*  OK",
        b"* 5",
        b"* 5 ",
        b"* 12345678901 EXISTS",
        b"a1",
        b"a1 5 FETCH (FLAGS ())",  # numbers only in untagged responses
        b"a(1 OK",
        b"* OK [unterminated",
        b"* OK [bad\x01code]",
        b"* OK(",
        b"\x00 OK",
    ],
)
def test_parse_response_head_errors(line: bytes) -> None:
    with pytest.raises(TokenError):
        parse_response_head(line)


# -- quoting and formatting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"INBOX", b"INBOX"),
        ("INBOX", b"INBOX"),
        (b"Entw&APw-rfe", b"Entw&APw-rfe"),
        (b"123", b"123"),
        (b"", b'""'),
        (b"NIL", b'"NIL"'),
        (b"nil", b'"nil"'),
        (b"a b", b'"a b"'),
        (b'say "hi"', b'"say \\"hi\\""'),
        (b"back\\slash", b'"back\\\\slash"'),
        (b"a*", b'"a*"'),
        (b"a%", b'"a%"'),
        (b"(x)", b'"(x)"'),
        (b"{5}", b'"{5}"'),
        (b"x]", b'"x]"'),
        (b"x[", b'"x["'),
        (b"tab\t", b'"tab\t"'),
        (b"a\r\nb", b"{4}\r\na\r\nb"),
        (b"nul\x00", b"{4}\r\nnul\x00"),
        ("Entwürfe", b"{9}\r\nEntw\xc3\xbcrfe"),
    ],
)
def test_quote(value: bytes | str, expected: bytes) -> None:
    assert quote(value) == expected


def test_quote_options() -> None:
    assert quote("Entwürfe", allow_8bit=True) == b'"Entw\xc3\xbcrfe"'
    assert quote(b"a\nb", non_sync=True) == b"{3+}\r\na\nb"
    assert quote(b"a\nb", allow_8bit=True) == b"{3}\r\na\nb"


def test_format_list() -> None:
    assert format_list([]) == b"()"
    assert format_list([b"\\Seen", "\\Deleted"]) == b"(\\Seen \\Deleted)"
    assert format_list([b"a", [b"b", (b"c",)], []]) == b"(a (b (c)) ())"
    assert format_list(quote(v) for v in (b"x", b"y z")) == b'(x "y z")'


def test_format_tokens() -> None:
    tokens = [
        A(b"a"),
        Quoted(b'q"\\'),
        Literal(b"xy", non_sync=True),
        Literal(b"\x00", binary=True),
        NIL,
        L(A(b"b"), L()),
        LiteralRef(7),
    ]
    assert format_tokens(tokens) == b'a "q\\"\\\\" {2+}\r\nxy ~{1}\r\n\x00 NIL (b ()) {7}'
    assert tokenize(format_tokens(tokens)) == tokens
    assert format_token(LiteralRef(3, non_sync=True, binary=True)) == b"~{3+}"
    with pytest.raises(ValueError):
        format_token(Quoted(b"a\r\n"))
    with pytest.raises(TypeError):
        format_token(b"raw")  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------------------------

_ATOM_ALPHABET = b"ABCXYZabcxyz0129.:*%<>+-!#&'_~\\$/[]"  # (no section name can be spelled of it)
atoms = (
    st.binary(min_size=1, max_size=8)
    .map(lambda b: bytes(_ATOM_ALPHABET[c % len(_ATOM_ALPHABET)] for c in b))
    .filter(lambda v: v.upper() != b"NIL")
)
quoted_values = st.binary(max_size=12).map(lambda b: bytes(c for c in b if c not in (0, 10, 13)))


@st.composite
def section_atoms(draw: st.DrawFn) -> Atom:
    """Atoms with a bracketed section, e.g. BODY.PEEK[HEADER.FIELDS (A "B")]<0.5>."""
    inner = draw(st.lists(st.one_of(atoms.map(Atom), quoted_values.map(Quoted)), max_size=3))
    section = format_tokens([ParenList(inner)]) if draw(st.booleans()) else format_tokens(inner)
    suffix = draw(st.sampled_from([b"", b"<0.100>", b".MIME"]))
    name = draw(st.sampled_from([b"BODY", b"body.peek", b"BINARY", b"Binary.Peek", b"BINARY.SIZE"]))
    return Atom(name + b"[" + section.replace(b"[", b"").replace(b"]", b"") + b"]" + suffix)


leaf_tokens = st.one_of(
    atoms.map(Atom),
    section_atoms(),
    quoted_values.map(Quoted),
    st.builds(Literal, st.binary(max_size=12), st.booleans(), st.booleans()),
    st.just(NIL),
)
token_trees = st.recursive(leaf_tokens, lambda kids: st.lists(kids, max_size=4).map(ParenList), max_leaves=20)
token_lists = st.lists(token_trees, max_size=6)


@FAST
@given(
    token_lists,
    st.one_of(st.none(), st.builds(LiteralRef, st.integers(0, 10**12), st.booleans(), st.booleans())),
)
def test_tokenize_round_trip(tokens: list[Token], ref: LiteralRef | None) -> None:
    if ref is not None:
        tokens = tokens + [ref]
    assert tokenize(format_tokens(tokens)) == tokens


def _split_literals(tokens: list[Token], literals: list[bytes]) -> bytes:
    """Serialize with bare markers, collecting payloads separately (the framing layer's other form)."""
    parts = []
    for tok in tokens:
        if isinstance(tok, Literal):
            literals.append(tok.value)
            parts.append(format_token(LiteralRef(len(tok.value), tok.non_sync, tok.binary)))
        elif isinstance(tok, ParenList):
            parts.append(b"(" + _split_literals(tok.items, literals) + b")")
        else:
            parts.append(format_token(tok))
    return b" ".join(parts)


@FAST
@given(token_lists)
def test_tokenize_round_trip_supplied_literals(tokens: list[Token]) -> None:
    literals: list[bytes] = []
    line = _split_literals(tokens, literals)
    assert tokenize(line, literals) == tokens


@FAST
@given(
    st.sampled_from([b"a1", b"A0001", b"x.y", b"$"]),
    st.booleans(),
    st.sampled_from([b"FETCH", b"store", b"Search", b"X-CPM"]),
    token_lists,
)
def test_parse_command_round_trip(tag: bytes, uid: bool, name: bytes, args: list[Token]) -> None:
    head = tag + (b" UID " if uid else b" ") + name
    line = head + (b" " + format_tokens(args) if args else b"")
    cmd = parse_command(line)
    assert (cmd.tag, cmd.uid, cmd.name) == (tag, uid, name.upper())
    assert cmd.args == args
    assert cmd.raw_args == format_tokens(args)


@FAST
@given(atoms.filter(lambda v: b"]" not in v))
def test_parse_response_head_round_trip(word: bytes) -> None:
    for line in (b"* OK [" + word + b"] t", b"tag NO [" + word + b" (a b)] t"):
        head = parse_response_head(line)
        assert head.code is not None and head.code.startswith(word)
        assert line[head.text_offset :] == b"t"


@FAST
@given(st.one_of(st.binary(max_size=20), st.text(max_size=10)), st.booleans(), st.booleans())
def test_quote_round_trip(value: bytes | str, allow_8bit: bool, non_sync: bool) -> None:
    data = value.encode() if isinstance(value, str) else value
    quoted = quote(value, allow_8bit=allow_8bit, non_sync=non_sync)
    (token,) = tokenize(quoted)
    assert astring(token) == data
    if isinstance(token, Atom):
        assert token.value == data
    if not allow_8bit:
        # Without UTF8=ACCEPT, anything 8-bit or CR/LF/NUL must travel as a literal.
        assert isinstance(token, Literal) or data.isascii()


# Inputs dense in IMAP syntax reach deep into the tokenizer; raw binary covers the rest.
_FUZZ = b'a1 ()[]{}<>"\\~+-*%:\r\n\x00\x01\x80059NIL'
fuzz_lines = st.one_of(
    st.binary(max_size=40),
    st.lists(
        st.sampled_from([bytes([c]) for c in _FUZZ] + [b"{2}\r\n", b"UID ", b"OK ", b"* ", b"BODY["]),
        max_size=30,
    ).map(b"".join),
)


@settings(max_examples=600, deadline=None)
@given(fuzz_lines, st.lists(st.binary(max_size=3), max_size=2))
def test_only_token_errors(line: bytes, literals: list[bytes]) -> None:
    try:
        tokens = tokenize(line, literals)
    except TokenError:
        pass
    else:
        # Whatever tokenizes serializes back to something that tokenizes the same way.
        assert tokenize(format_tokens(tokens)) == tokens
    try:
        _ = parse_command(line, literals).args
    except TokenError:
        pass
    try:
        head = parse_response_head(line)
    except TokenError:
        pass
    else:
        assert 0 <= head.text_offset <= len(line)
        assert head.kind in ("untagged", "tagged", "continuation")


@pytest.mark.parametrize("line, at", [
    (b"a STORE  2 +FLAGS (\\Seen)", 7),
    (b"a STORE 2 +FLAGS  (\\Seen)", 16),
    (b"a  NOOP", 1),
    (b'a SEARCH SUBJECT "two  spaces"', -1),  # (text inside a quoted string)
    (b'a SEARCH SUBJECT "q \\"  q"  ALL', 26),  # (an escaped quote does not end the string)
    (b'a X "unterminated  ', -1),
    (b"a NOOP ", -1),
    (b"a LOGIN {5}", -1),
])
def test_space_run_finds_runs_of_spaces_outside_quoted_strings(line: bytes, at: int) -> None:
    assert space_run(line) == at


@given(st.lists(st.sampled_from([b"A", b"1:2", b"(X Y)", b'"a  b"', b'"q\\"x"']), min_size=1, max_size=8))
@FAST
def test_space_run_none_in_lines_written_with_single_spaces(words: list[bytes]) -> None:
    line = b"t CMD " + b" ".join(words)
    assert space_run(line) == -1
    assert space_run(line.replace(b" ", b"  ", 1)) == 1


def test_a_bare_cr_in_brackets_after_a_literal_ends_the_scan():
    """Found by ``test_only_token_errors``: the CR's literal was matched from the last brace before it, an
    earlier literal's, whose end lay behind the scan: it went back there, for ever."""
    with pytest.raises(TokenError):
        tokenize(b"a FETCH 1 (BODY[HEADER.FIELDS ({2}\r\nab X\rY)])", [])
    with pytest.raises(TokenError):
        tokenize(b'~[ aa{2}\r\n\n0:\\5><1a0<BODY[(0*}[L\ra BODY[(', [b"\x15", b"<\xdd"])
