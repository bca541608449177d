"""Searches in a filtered view, sans-I/O: the device's sequence sets in search criteria become the
backend's (ranges that cover the hidden messages between visible ones, which match nothing: results are
of visible messages only), ESEARCH results the backend computed over every match narrowed to the visible
ones (MIN/MAX/COUNT/ALL), and ordered sets of matches (ESORT, ``[MODIFIED]``) renumbered. The policy
plugin (``plugins/policy.py``) decides which commands take which."""

from __future__ import annotations

import re

from cpmproxy.imap.seqset import SequenceSet, SequenceSetError
from cpmproxy.imap.tokens import Atom, ParenList, TokenError, token_text
from plugins.view import MailboxView
from plugins.wire import NOARG_SEARCH_KEYS, search_key_args

__all__ = ["INLINE_HIDDEN_MAX", "INLINE_SET_MAX", "esearch_options", "local_esearch_options", "renumber_ordered_set",
           "rewrite_search_keys", "visible_esearch", "visible_in_order"]

MAX_KEY_DEPTH = 100  # NOT/OR nesting in a search the view rewrites
_SET_LIKE_RE = re.compile(rb"[0-9:,*]+")
INLINE_HIDDEN_MAX = 3800  # bytes of hidden UIDs a search names itself (see PolicyPlugin._search_command)
INLINE_SET_MAX = 3800  # bytes of a sequence set a FETCH or STORE names exactly (PolicyPlugin._view_command)
_LOCAL_ESEARCH = (b"MIN", b"MAX", b"ALL", b"COUNT")  # (in Dovecot's order)


class SearchRefused(TokenError):
    """A search key the view cannot offer (the message says which): answered NO [CANNOT], not BAD."""


def esearch_options(returning: ParenList) -> tuple[bytes, ...] | None:
    """The RETURN options of a search, if the proxy can compute them all from the matches (RFC 4731:
    none is ALL); None for any other (SAVE, PARTIAL, an extension's)."""
    names = set()
    for item in returning.items:
        if not isinstance(item, Atom) or item.upper() not in _LOCAL_ESEARCH:
            return None
        names.add(item.upper())
    return tuple(n for n in _LOCAL_ESEARCH if n in names) if names else (b"ALL",)


def local_esearch_options(session, tag_list: ParenList) -> tuple[tuple[bytes, ...], bool] | None:
    """The options to compute for the ESEARCH ``(TAG "t")`` answers, and whether its matches are in a sort
    order (ESORT), if its command asked the backend for every match instead (``esearch_local``)."""
    items = tag_list.items
    if len(items) != 2 or (token_text(items[0]) or b"").upper() != b"TAG":
        return None
    tag = token_text(items[1])
    cmd = next((c for c in session.inflight_commands() if c.tag == tag), None)
    return None if cmd is None else cmd.state.get("esearch_local")


def visible_esearch(view: MailboxView, items: list, wanted: tuple[bytes, ...], ordered: bool = False) -> list:
    """The items after ``(TAG ...)`` of an ESEARCH that returned ALL of the matches, hidden ones too: the
    options ``wanted`` of the visible matches, in the client's numbers; ``ordered``: an ESORT's, whose ALL
    is in the sort order and whose MIN and MAX are its first and last (RFC 5267, as Dovecot answers).
    A MODSEQ (RFC 7162: the search had a MODSEQ key) stays the backend's: the highest of every match,
    hidden ones too, which is at most the mailbox's HIGHESTMODSEQ the device sees anyway; it is no lower
    than any visible match's, so a client asking for changes since it misses none. (MIN and MAX alone,
    whose MODSEQ is the returned messages', do not come here: see PolicyPlugin._extremes_then.)"""
    uid = bool(items) and isinstance(items[0], Atom) and items[0].upper() == b"UID"
    found_text, modseq = b"", None
    for j in range(1 if uid else 0, len(items) - 1, 2):
        key = (token_text(items[j]) or b"").upper()
        if key == b"ALL":
            found_text = token_text(items[j + 1]) or b""
        elif key == b"MODSEQ":
            modseq = items[j + 1]
    out = [Atom(b"UID")] if uid else []
    if ordered:
        shown_list = visible_in_order(view, found_text, uid)
        for name in wanted:
            if name == b"COUNT":
                out += [Atom(name), Atom(b"%d" % len(shown_list))]
            elif shown_list:
                value = shown_list[0] if name == b"MIN" else shown_list[-1] if name == b"MAX" else None
                out += [Atom(name), Atom(_ordered_set(shown_list) if value is None else b"%d" % value)]
        return out + ([Atom(b"MODSEQ"), modseq] if shown_list and modseq is not None else [])
    found = SequenceSet.parse(found_text) if found_text else SequenceSet.empty()
    if uid:
        shown = view.visible_uidset(found)
    else:
        shown = found - view.hidden_seqs
        shown = SequenceSet.parse(renumber_ordered_set(view, shown.format())) if shown else shown
    for name in wanted:
        if name == b"COUNT":
            out += [Atom(name), Atom(b"%d" % len(shown))]
        elif shown:
            value = shown.min() if name == b"MIN" else shown.max() if name == b"MAX" else None
            out += [Atom(name), Atom(shown.format() if value is None else b"%d" % value)]
    return out + ([Atom(b"MODSEQ"), modseq] if shown and modseq is not None else [])


def visible_in_order(view: MailboxView, text: bytes, uid: bool) -> list[int]:
    """The visible ones of an ordered set of matches (``5,3:1,9``: each range in its own direction), in
    that order, as the client numbers them."""
    out = []
    for part in text.split(b",") if text else ():
        ends = part.split(b":")
        if not all(e.isdigit() for e in ends) or len(ends) > 2:
            continue  # ("*" or garbage: no message of the view)
        a, b = int(ends[0]), int(ends[-1])
        for n in range(a, b + 1) if a <= b else range(a, b - 1, -1):
            if uid:
                if n not in view.hidden:
                    out.append(n)
            elif (c := view.client_seq(n)) is not None:
                out.append(c)
    return out


def _ordered_set(numbers: list[int]) -> bytes:
    """``numbers`` in their order as a sequence set, runs of consecutive ones (either way) as ranges."""
    runs: list[list[int]] = []  # [first, last, step]
    for n in numbers:
        if runs and runs[-1][2] in (0, n - runs[-1][1]) and abs(n - runs[-1][1]) == 1:
            runs[-1][1], runs[-1][2] = n, n - runs[-1][1]
        else:
            runs.append([n, n, 0])
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b, _ in runs)


def renumber_ordered_set(view: MailboxView, text: bytes) -> bytes:
    """A backend sequence set of matches (``3,9:7,12``, in the order given: ESORT's is the sort order)
    in client numbers. The matches are visible messages (the search excluded the others), and a range
    of matches holds no hidden message, so each element maps as a whole."""
    runs: list[list[int]] = []  # [first, last] in the order given
    for part in text.split(b","):
        ends = []
        for n in part.split(b":"):
            if not n.isdigit():
                return text  # ("*" or garbage: the backend's business, as it was)
            ends.append(view.client_seq(int(n)) or 0)
        if 0 in ends:
            continue  # (not a visible message after all: dropped rather than shown)
        first, last = ends[0], ends[-1]
        if runs and runs[-1][0] <= runs[-1][1] and first <= last and first == runs[-1][1] + 1:
            runs[-1][1] = last  # (backend 1,3 around hidden 2 is client 1:2)
        else:
            runs.append([first, last])
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in runs)


def rewrite_search_keys(view: MailboxView, tokens: list, depth: int = 0, exact: bool = False) -> list:
    """Walk SEARCH criteria; client sequence sets become backend ones. UID sets, dates, sizes,
    strings are left alone (the walker knows each search key's arguments). ``depth``: the NOT, OR and
    parentheses around ``tokens`` (each a level of recursion here). ``exact``: sets of the visible
    messages only (for THREAD), not ranges that cover the hidden ones between them."""
    out = []
    i = 0
    while i < len(tokens):
        part, i = _one_key(view, tokens, i, depth, exact)
        out += part
    return out


def _client_star(view: MailboxView, token):
    """A ``UID`` search key's set with ``*`` as the client means it: the largest UID it sees, not the
    backend's (a hidden message's: ``UID *`` found nothing)."""
    if not isinstance(token, Atom) or b"*" not in token.value:
        return token
    visible = view.visible
    try:
        uids = SequenceSet.parse(token.value)
    except SequenceSetError:
        return token
    return Atom(uids.resolve(visible[-1]).format()) if visible else token


def _one_key(view: MailboxView, tokens: list, i: int, depth: int = 0, exact: bool = False):
    t = tokens[i]
    if depth > MAX_KEY_DEPTH:  # (NOT NOT (NOT ...: each one a level of recursion here)
        raise TokenError("search criteria nested too deeply")
    if isinstance(t, ParenList):
        return [ParenList(rewrite_search_keys(view, t.items, depth + 1, exact))], i + 1
    if not isinstance(t, Atom):
        return [t], i + 1
    key = t.upper()
    if key in NOARG_SEARCH_KEYS:
        return [t], i + 1
    if key == b"INTHREAD":
        # Dovecot's INTHREAD matches whole threads, built of every message: a hidden one links visible ones
        # (its replies found by asking for its UID; a REFERENCES chain through it), which no restriction
        # of the key's own matches undoes (found by review).
        raise SearchRefused("INTHREAD is not available here")
    n = search_key_args(tokens, i, key)
    if n:
        if key in (b"UID", b"X-REAL-UID") and n == 1:  # (Dovecot's X-REAL-UID: UID outside virtual folders)
            return [t, _client_star(view, tokens[i + 1])], i + 2
        return tokens[i:i + 1 + n], i + 1 + n
    if key == b"NOT":
        sub, j = _one_key(view, tokens, i + 1, depth + 1, exact) if i + 1 < len(tokens) else ([], i + 1)
        return [t] + sub, j
    if key == b"OR":
        a, j = _one_key(view, tokens, i + 1, depth + 1, exact) if i + 1 < len(tokens) else ([], i + 1)
        b, k = _one_key(view, tokens, j, depth + 1, exact) if j < len(tokens) else ([], j)
        return [t] + a + b, k
    try:
        s = SequenceSet.parse(t.value)
    except SequenceSetError:
        if _SET_LIKE_RE.fullmatch(t.value):
            # A set the backend may read after all (Dovecot takes "01"), in its numbers, not the view's.
            raise TokenError(f"invalid sequence set {t.value[:40]!r}") from None
        return [t], i + 1
    # The client's ranges over the backend's numbers, hidden messages in them included: they are no match
    # whatever the key says of them (results are of the visible messages only), and the set stays as
    # short as the client's (the exact one can be past the backend's line limit).
    mapped = view.backend_seqset(s) if exact else view.backend_cover(s)
    # Nothing visible matches: a number past the end matches nothing on the backend either.
    return [Atom(mapped.format() if mapped else b"%d" % (len(view.uids) + 1))], i + 1
