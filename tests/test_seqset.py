from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmproxy.imap.seqset import MAX_NUMBER, STAR, SequenceSet, SequenceSetError, is_sequence_set

FAST = settings(max_examples=200, deadline=None)

# -- parsing and formatting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ranges",
    [
        (b"1", ((1, 1),)),
        (b"1:3,5,7:*", ((1, 3), (5, 5), (7, STAR))),
        (b"*", ((STAR, STAR),)),
        (b"*:4", ((4, STAR),)),
        (b"4:*", ((4, STAR),)),
        (b"5:2", ((2, 5),)),
        (b"1,2,3", ((1, 3),)),
        (b"3,1,2", ((1, 3),)),
        (b"1:5,3:8", ((1, 8),)),
        (b"1:2,4:5", ((1, 2), (4, 5))),
        (b"4294967295", ((MAX_NUMBER, MAX_NUMBER),)),
        (b"1:*,5", ((1, STAR),)),
        ("2:4", ((2, 4),)),
    ],
)
def test_parse(text: bytes | str, ranges: tuple[tuple[int, int], ...]) -> None:
    assert SequenceSet.parse(text).ranges == ranges


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"0",
        b"0:5",
        b"5:0",
        b"01",
        b"a",
        b"1,",
        b",1",
        b"1,,2",
        b"1:",
        b":1",
        b"1:2:3",
        b"$",
        b" 1",
        b"1 ",
        b"4294967296",
        b"99999999999",
        b"1" * 5000,
        b"-1",
        b"1.5",
        b"\xff",
        "1\u00e9",
        b"**",
        b"1:**",
        b"+1",
    ],
)
def test_parse_rejects(bad: bytes | str) -> None:
    with pytest.raises(SequenceSetError):
        SequenceSet.parse(bad)
    assert not is_sequence_set(bad)


def test_error_is_value_error() -> None:
    assert issubclass(SequenceSetError, ValueError)


@pytest.mark.parametrize("good", [b"1", b"*", b"1:*", b"2,4:7,9,12:*", "3:1"])
def test_is_sequence_set(good: bytes | str) -> None:
    assert is_sequence_set(good)


def test_format() -> None:
    s = SequenceSet.parse(b"7:*,5,3:1")
    assert s.format() == b"1:3,5,7:*"
    assert bytes(s) == b"1:3,5,7:*"
    assert str(s) == "1:3,5,7:*"
    assert repr(s) == "SequenceSet.parse('1:3,5,7:*')"
    assert SequenceSet.parse(b"*").format() == b"*"
    assert repr(SequenceSet.empty()) == "SequenceSet.empty()"


def test_empty() -> None:
    e = SequenceSet.empty()
    assert not e
    assert len(e) == 0
    assert list(e) == []
    assert e.ranges == ()
    assert 1 not in e
    assert e == SequenceSet.from_iterable([]) == SequenceSet()
    with pytest.raises(ValueError):
        e.format()
    with pytest.raises(ValueError):
        bytes(e)
    with pytest.raises(ValueError):
        e.min()
    with pytest.raises(ValueError):
        e.max()


# -- constructors ----------------------------------------------------------------------------------


def test_from_ranges_normalizes() -> None:
    s = SequenceSet.from_ranges([(10, 12), (5, 3), (6, 6), (1, 1), (13, 20), (30, 30)])
    assert s.ranges == ((1, 1), (3, 6), (10, 20), (30, 30))


def test_from_iterable() -> None:
    assert SequenceSet.from_iterable([5, 1, 2, 3, 3, 9, 8, STAR]).ranges == (
        (1, 3),
        (5, 5),
        (8, 9),
        (STAR, STAR),
    )
    assert SequenceSet.from_iterable(iter(range(1, 100_000))).ranges == ((1, 99_999),)


@pytest.mark.parametrize("ranges", [[(0, 3)], [(1, STAR + 1)], [(-5, -1)]])
def test_from_ranges_rejects(ranges: list[tuple[int, int]]) -> None:
    with pytest.raises(SequenceSetError):
        SequenceSet.from_ranges(ranges)


@pytest.mark.parametrize("nums", [[0], [1, STAR + 1], [-1]])
def test_from_iterable_rejects(nums: list[int]) -> None:
    with pytest.raises(SequenceSetError):
        SequenceSet.from_iterable(nums)


# -- inspection ------------------------------------------------------------------------------------


def test_contains_len_iter() -> None:
    s = SequenceSet.parse(b"1:3,5,10:12")
    assert [n for n in range(14) if n in s] == [1, 2, 3, 5, 10, 11, 12]
    assert "1" not in s
    assert len(s) == 7
    assert list(s) == [1, 2, 3, 5, 10, 11, 12]
    assert s.min() == 1
    assert s.max() == 12
    assert not s.has_star


def test_huge_set_is_cheap() -> None:
    s = SequenceSet.parse(b"1:4294967295")
    assert len(s) == MAX_NUMBER
    assert MAX_NUMBER in s
    it = iter(s)
    assert [next(it) for _ in range(3)] == [1, 2, 3]  # lazy: never materialized


def test_star_behaviour() -> None:
    s = SequenceSet.parse(b"1:3,7:*")
    assert s.has_star
    assert STAR in s
    assert 100 in s  # before resolution '*' is above every real number
    assert s.max() == STAR
    assert bool(s)
    with pytest.raises(ValueError):
        len(s)
    with pytest.raises(ValueError):
        iter(s)


def test_hash_and_eq() -> None:
    a = SequenceSet.parse(b"1:3,5")
    b = SequenceSet.from_iterable([5, 3, 2, 1])
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != SequenceSet.parse(b"1:3")
    assert a != "1:3,5"
    assert a != [(1, 3), (5, 5)]


def test_immutable() -> None:
    s = SequenceSet.parse(b"1")
    with pytest.raises(AttributeError):
        s.foo = 1  # type: ignore[attr-defined]


# -- algebra ---------------------------------------------------------------------------------------


def test_algebra_examples() -> None:
    a = SequenceSet.parse(b"1:10,20:30")
    b = SequenceSet.parse(b"5:25")
    assert (a | b).format() == b"1:30"
    assert (a & b).format() == b"5:10,20:25"
    assert (a - b).format() == b"1:4,26:30"
    assert (b - a).format() == b"11:19"
    assert a - a == SequenceSet.empty()
    assert (a | SequenceSet.empty()) is a
    assert (SequenceSet.empty() | a) is a
    assert (a & SequenceSet.empty()) == SequenceSet.empty()


def test_algebra_with_star() -> None:
    a = SequenceSet.parse(b"1:*")
    assert (a - SequenceSet.parse(b"5:10")).format() == b"1:4,11:*"
    assert (a & SequenceSet.parse(b"3,*")).format() == b"3,*"
    assert (SequenceSet.parse(b"1:4294967295") | SequenceSet.parse(b"*")).format() == b"1:*"


def test_operators_reject_other_types() -> None:
    s = SequenceSet.parse(b"1")
    for op in (lambda: s | {1}, lambda: s & {1}, lambda: s - {1}):
        with pytest.raises(TypeError):
            op()


def test_clip() -> None:
    s = SequenceSet.parse(b"1:10,20:*")
    assert s.clip(5, 25).format() == b"5:10,20:25"
    assert s.clip(11, 19) == SequenceSet.empty()
    assert s.clip(5, 1) == SequenceSet.empty()
    assert s.clip(1, STAR) == s


@pytest.mark.parametrize(
    "text, star, expected",
    [
        (b"1:*", 5, b"1:5"),
        (b"5:*", 3, b"3:5"),  # n:* with * < n is *:n
        (b"*", 7, b"7"),
        (b"1:3,*", 2, b"1:3"),
        (b"1:3,*", 4, b"1:4"),
        (b"1:3,*", 9, b"1:3,9"),
        (b"2,10:*", 4, b"2,4:10"),
        (b"1:3", 1, b"1:3"),
    ],
)
def test_resolve(text: bytes, star: int, expected: bytes) -> None:
    resolved = SequenceSet.parse(text).resolve(star)
    assert resolved.format() == expected
    assert not resolved.has_star


@pytest.mark.parametrize("star", [0, -1, STAR])
def test_resolve_rejects_bad_star(star: int) -> None:
    with pytest.raises(ValueError):
        SequenceSet.parse(b"1:*").resolve(star)


# -- properties ------------------------------------------------------------------------------------

SMALL = 40
small_sets = st.sets(st.integers(1, SMALL), max_size=SMALL)
range_lists = st.lists(st.tuples(st.integers(1, SMALL), st.integers(1, SMALL)), max_size=8)


def model(s: SequenceSet) -> set[int]:
    return set(s)


def canonical(nums: set[int]) -> bytes:
    """Reference formatter written the slow, obvious way."""
    out = []
    ordered = sorted(nums)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(out).encode()


@FAST
@given(small_sets)
def test_from_iterable_matches_model(nums: set[int]) -> None:
    s = SequenceSet.from_iterable(nums)
    assert model(s) == nums
    assert len(s) == len(nums)
    assert list(s) == sorted(nums)
    assert bool(s) == bool(nums)
    for n in range(0, SMALL + 2):
        assert (n in s) == (n in nums)
    if nums:
        assert s.format() == canonical(nums)
        assert s.min() == min(nums)
        assert s.max() == max(nums)
    # Canonical representation: disjoint, sorted, non-adjacent.
    for (_, hi), (lo, _) in itertools.pairwise(s.ranges):
        assert lo > hi + 1


@FAST
@given(range_lists)
def test_from_ranges_matches_model(ranges: list[tuple[int, int]]) -> None:
    expected = set()
    for a, b in ranges:
        expected |= set(range(min(a, b), max(a, b) + 1))
    s = SequenceSet.from_ranges(ranges)
    assert model(s) == expected
    assert s == SequenceSet.from_iterable(expected)


@FAST
@given(small_sets, small_sets)
def test_algebra_matches_model(a: set[int], b: set[int]) -> None:
    sa, sb = SequenceSet.from_iterable(a), SequenceSet.from_iterable(b)
    assert model(sa | sb) == a | b
    assert model(sa & sb) == a & b
    assert model(sa - sb) == a - b
    assert (sa | sb) == SequenceSet.from_iterable(a | b)
    assert (sa & sb) == SequenceSet.from_iterable(a & b)
    assert (sa - sb) == SequenceSet.from_iterable(a - b)


@FAST
@given(small_sets, st.integers(0, SMALL + 1), st.integers(0, SMALL + 1))
def test_clip_matches_model(a: set[int], lo: int, hi: int) -> None:
    assert model(SequenceSet.from_iterable(a).clip(lo, hi)) == {n for n in a if lo <= n <= hi}


@st.composite
def seqset_text(draw: st.DrawFn) -> bytes:
    nums = st.one_of(st.integers(1, MAX_NUMBER).map(str), st.just("*"), st.integers(1, 50).map(str))
    items = draw(st.lists(st.one_of(nums, st.tuples(nums, nums).map(":".join)), min_size=1, max_size=8))
    return ",".join(items).encode()


@FAST
@given(seqset_text())
def test_parse_format_round_trip(text: bytes) -> None:
    s = SequenceSet.parse(text)
    assert is_sequence_set(text)
    formatted = s.format()
    assert SequenceSet.parse(formatted) == s
    assert SequenceSet.parse(formatted).format() == formatted
    assert SequenceSet.from_ranges(s.ranges) == s


@FAST
@given(small_sets, st.one_of(st.none(), st.integers(1, SMALL)), st.integers(1, SMALL + 5))
def test_resolve_matches_model(nums: set[int], start: int | None, star: int) -> None:
    # Model: "start:*" is the range between start and star (in either order); "*" alone is star.
    text = b",".join(filter(None, [canonical(nums), b"*" if start is None else b"%d:*" % start]))
    expected = set(nums)
    if start is None:
        expected.add(star)
    else:
        expected |= set(range(min(start, star), max(start, star) + 1))
    resolved = SequenceSet.parse(text).resolve(star)
    assert not resolved.has_star
    # Normalization may merge explicit numbers into the '*' range ("1:2,2:*" is stored as "1:*"), so
    # only the numbers that can exist (<= star) are always exact ...
    assert model(resolved.clip(1, star)) == {n for n in expected if n <= star}
    # ... and everything is exact when nothing was merged.
    if start is None or all(n < start - 1 for n in nums):
        assert model(resolved) == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30))
def test_parse_only_raises_sequence_set_error(data: bytes) -> None:
    try:
        s = SequenceSet.parse(data)
    except SequenceSetError:
        assert not is_sequence_set(data)
    else:
        assert is_sequence_set(data)
        assert SequenceSet.parse(s.format()) == s


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789:,*$", max_size=20))
def test_parse_near_miss_alphabet(text: str) -> None:
    try:
        SequenceSet.parse(text)
    except SequenceSetError:
        pass
