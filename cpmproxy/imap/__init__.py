"""Sans-I/O IMAP codec: sequence sets, modified UTF-7, tokenizer (no Twisted imports here)."""

from cpmproxy.imap import mutf7
from cpmproxy.imap.mutf7 import decode as mutf7_decode
from cpmproxy.imap.mutf7 import encode as mutf7_encode
from cpmproxy.imap.seqset import MAX_NUMBER, STAR, SequenceSet, SequenceSetError, is_sequence_set
from cpmproxy.imap.tokens import (
    NIL,
    Atom,
    Command,
    Literal,
    LiteralRef,
    Nil,
    ParenList,
    Quoted,
    ResponseHead,
    Token,
    TokenError,
    astring,
    format_list,
    format_token,
    format_tokens,
    nstring,
    parse_command,
    parse_response_head,
    quote,
    tokenize,
)

__all__ = [
    "MAX_NUMBER",
    "NIL",
    "STAR",
    "Atom",
    "Command",
    "Literal",
    "LiteralRef",
    "Nil",
    "ParenList",
    "Quoted",
    "ResponseHead",
    "SequenceSet",
    "SequenceSetError",
    "Token",
    "TokenError",
    "astring",
    "format_list",
    "format_token",
    "format_tokens",
    "is_sequence_set",
    "mutf7",
    "mutf7_decode",
    "mutf7_encode",
    "nstring",
    "parse_command",
    "parse_response_head",
    "quote",
    "tokenize",
]
