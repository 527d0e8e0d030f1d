"""The page file format, on-disk names and the eviction policies, on their own."""

from __future__ import annotations

import struct

import pytest

from depot.core.errors import InvalidArgument
from depot.core.types import PageId
from depot.pagestore import format as fmt
from depot.pagestore.eviction import LfuPolicy, LruPolicy, make_policy

PAGE = PageId("file", 3)


def encoded(length: int, page: PageId = PAGE) -> tuple[bytes, bytes]:
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    sums = fmt.block_sums(memoryview(data))
    return data, fmt.encode_trailer(page, length, sums)


@pytest.mark.parametrize("length", [0, 1, fmt.BLOCK_SIZE, fmt.BLOCK_SIZE + 1, 5 * fmt.BLOCK_SIZE])
def test_trailer_roundtrip(length: int) -> None:
    data, trailer = encoded(length)
    size = length + len(trailer)
    assert size == fmt.file_size(length)
    got_length, sums = fmt.decode_trailer(PAGE, data + trailer, size)
    assert got_length == length
    assert list(sums) == list(fmt.block_sums(memoryview(data)))
    assert len(sums) == fmt.block_count(length)


def test_block_checksums_depend_on_position() -> None:
    block = bytes(fmt.BLOCK_SIZE)
    sums = fmt.block_sums(memoryview(block + block))
    assert sums[0] != sums[1]


def test_trailer_too_short_says_how_much_is_needed() -> None:
    _data, trailer = encoded(3 * fmt.BLOCK_SIZE)
    size = 3 * fmt.BLOCK_SIZE + len(trailer)
    with pytest.raises(fmt.TrailerTooShort) as info:
        fmt.decode_trailer(PAGE, trailer[-fmt.FOOTER.size :], size)
    assert info.value.needed == len(trailer)


def _damage(trailer: bytes, offset_from_end: int, value: bytes) -> bytes:
    cut = len(trailer) - offset_from_end
    return trailer[:cut] + value + trailer[cut + len(value) :]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: _damage(t, fmt.FOOTER.size, b"NOTDEPOT"), "magic"),
        (lambda t: _damage(t, fmt.FOOTER.size - 8, struct.pack("<H", 9)), "version"),
        (lambda t: _damage(t, fmt.FOOTER.size - 12, struct.pack("<I", 4096)), "block size"),
        (lambda t: _damage(t, fmt.FOOTER.size - 16, struct.pack("<Q", 5)), "file size"),
        (lambda t: _damage(t, fmt.FOOTER.size + 3, b"\xff"), "checksum"),
        (lambda t: _damage(t, 1, b"\x00"), "checksum"),
        (lambda t: t[-10:], "too short"),
    ],
)
def test_damaged_trailer_is_refused(damage: object, message: str) -> None:
    length = 2 * fmt.BLOCK_SIZE
    _data, trailer = encoded(length)
    bad = damage(trailer)  # type: ignore[operator]
    with pytest.raises(fmt.PageFormatError, match=message):
        fmt.decode_trailer(PAGE, bad, fmt.file_size(length))


def test_trailer_of_another_page_is_refused() -> None:
    _data, trailer = encoded(100)
    with pytest.raises(fmt.PageFormatError, match="another page"):
        fmt.decode_trailer(PageId("file", 4), trailer, fmt.file_size(100))


@pytest.mark.parametrize(
    "key",
    [
        "0123456789abcdef0123456789abcdef",
        "a",
        "with space",
        "slash/es",
        "..",
        ".",
        "-x.y_z",
        "ü",
        "=looks-encoded",
        ".hidden",
    ],
)
def test_file_dir_names_roundtrip(key: str) -> None:
    name = fmt.file_dir_name(key)
    assert "/" not in name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert fmt.file_key_of(name) == key


def test_file_key_of_rejects_foreign_names() -> None:
    assert fmt.file_key_of("bad name!") is None
    assert fmt.file_key_of("=zz") is None
    assert fmt.file_key_of("=" + b"a".hex()) is None  # "a" is stored plainly


def test_file_key_too_long() -> None:
    with pytest.raises(InvalidArgument):
        fmt.file_dir_name("/" * 200)


def test_page_path_and_index_names() -> None:
    where = fmt.page_path(PageId("abc", 12))
    assert (where.file_dir, where.name) == ("abc", "12")
    assert where.shard == fmt.shard_of("abc") and len(where.shard) == 2
    with pytest.raises(InvalidArgument):
        fmt.page_path(PageId("abc", -1))
    assert fmt.parse_index("0") == 0
    assert fmt.parse_index("12") == 12
    for bad in ("012", "-1", "1.tmp", "", "\u0661"):
        assert fmt.parse_index(bad) is None


# ------------------------------------------------------------------ eviction


def pages(n: int) -> list[PageId]:
    return [PageId("f", i) for i in range(n)]


def test_lru_order() -> None:
    policy = LruPolicy()
    a, b, c = pages(3)
    assert policy.victim() is None
    for p in (a, b, c):
        policy.add(p)
    policy.touch(a)
    assert policy.victim() == b
    policy.remove(b, evicted=True)
    assert policy.victim() == c
    policy.touch(PageId("absent", 0))
    assert len(policy) == 2


def test_lfu_prefers_frequent_pages_and_breaks_ties_by_age() -> None:
    policy = LfuPolicy()
    a, b, c = pages(3)
    for p in (a, b, c):
        policy.add(p)
    policy.touch(a)
    policy.touch(a)
    policy.touch(c)
    assert policy.hits(a) == 3
    assert policy.victim() == b
    policy.remove(b, evicted=True)
    assert policy.victim() == c
    policy.remove(c)
    assert policy.victim() == a
    assert policy.hits(b) == 0


def test_lfu_ages_out_a_page_that_is_no_longer_read() -> None:
    policy = LfuPolicy()
    hot = PageId("hot", 0)
    policy.add(hot)
    for _ in range(9):
        policy.touch(hot)
    evicted_before_hot = 0
    for i in range(100):
        policy.add(PageId("new", i))
        victim = policy.victim()
        assert victim is not None
        policy.remove(victim, evicted=True)
        if victim == hot:
            break
        evicted_before_hot += 1
    # Without aging it would stay forever; with it, it goes after ~its hit count of evictions.
    assert 5 <= evicted_before_hot <= 20


def test_lfu_heap_stays_bounded() -> None:
    policy = LfuPolicy()
    live = pages(10)
    for p in live:
        policy.add(p)
    for _ in range(1000):
        for p in live:
            policy.touch(p)
    assert len(policy._heap) <= 2 * len(live) + 64 + 1
    assert policy.victim() == live[0]


def test_make_policy() -> None:
    assert make_policy("lru").name == "lru"
    assert make_policy("lfu").name == "lfu"
    with pytest.raises(InvalidArgument):
        make_policy("mru")
