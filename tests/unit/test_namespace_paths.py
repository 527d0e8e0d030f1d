"""Canonical depot paths: what is accepted, what is refused, and the helpers built on them."""

from __future__ import annotations

import errno
import unicodedata
import urllib.parse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from depot.core.errors import InvalidPath
from depot.namespace.paths import (
    CONFUSABLE_SEPARATORS,
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    NFKC_DOT_LOOKALIKES,
    NFKC_SEPARATOR_LOOKALIKES,
    basename,
    is_within,
    join_path,
    normalize_path,
    parent_of,
    split_path,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("depot://a/b", "/a/b"),
        ("depot:///a/b", "/a/b"),
        ("DEPOT://a/b", "/a/b"),
        ("/a/b", "/a/b"),
        ("a/b", "/a/b"),
        ("", "/"),
        ("/", "/"),
        ("depot://", "/"),
        ("depot:///", "/"),
        ("//a///b//", "/a/b"),
        ("/a/./b/.", "/a/b"),
        ("./a", "/a"),
        ("/a/b/", "/a/b"),
        ("/...", "/..."),
        ("/a/.hidden/..b/b..", "/a/.hidden/..b/b.."),
        ("/with space/ x ", "/with space/ x "),
        ("/data/2024-01-01T00:00:00", "/data/2024-01-01T00:00:00"),
        ("/a:b/c", "/a:b/c"),
        ("/q?x=1#frag", "/q?x=1#frag"),
        ("/日本語/ファイル.txt", "/日本語/ファイル.txt"),
        ("/emoji/🙂.png", "/emoji/🙂.png"),
        ("/Wait….mp3", "/Wait….mp3"),  # an ellipsis is not a dot segment
        ("/a。b", "/a。b"),  # ideographic full stop: common in CJK names
        # Percent signs that cannot turn into a separator stay literal.
        ("/100%", "/100%"),
        ("/50%off", "/50%off"),
        ("/%", "/%"),
        ("/%2", "/%2"),
        ("/%zz", "/%zz"),
        ("/%41%42", "/%41%42"),
        ("/a%25b", "/a%25b"),
        ("/%25%25", "/%25%25"),
        ("/%E3%81%82", "/%E3%81%82"),
        ("/file%20name.txt", "/file%20name.txt"),
        ("/latin1-%e9", "/latin1-%e9"),
        (b"/bytes/ok", "/bytes/ok"),
        ("/caf\u00e9".encode(), "/caf\u00e9"),
    ],
)
def test_accepted_paths(raw: str | bytes, expected: str) -> None:
    assert normalize_path(raw) == expected
    assert normalize_path(expected) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # Traversal.
        ("..", "escapes its mount"),
        ("/..", "escapes its mount"),
        ("/a/../b", "escapes its mount"),
        ("/a/b/..", "escapes its mount"),
        ("a/../../etc/passwd", "escapes its mount"),
        ("depot://../x", "escapes its mount"),
        ("depot:///a/..", "escapes its mount"),
        ("/a//..//b", "escapes its mount"),
        ("/a/./../b", "escapes its mount"),
        # Control characters, NUL, backslash.
        ("/a\x00b", "NUL"),
        ("/a/b\x00", "NUL"),
        ("/a\nb", "control character (U+000A"),
        ("/a\rb", "control character"),
        ("/a\tb", "control character"),
        ("/a\x1bb", "control character"),
        ("/a\x7fb", "control character (U+007F"),
        ("/a\x85b", "control character (U+0085"),
        ("/a\x9fb", "control character"),
        ("/a\\b", "backslash"),
        ("\\..\\x", "backslash"),
        ("/a/..\\b", "backslash"),
        # Invalid UTF-8 and lone surrogates.
        ("/a/\udc80", "not valid UTF-8"),
        ("/\ud800x", "not valid UTF-8"),
        (b"/a/\xff", "not valid UTF-8"),
        (b"/\xc0\xae\xc0\xae/x", "not valid UTF-8"),
        (b"/\xed\xa0\x80", "not valid UTF-8"),
        # Percent-encoded separators, single and double encoded.
        ("/%2e%2e", "percent-encoded '.'"),
        ("/%2E%2e/", "percent-encoded '.'"),
        ("/%2E%2E/etc", "percent-encoded '.'"),
        ("/a/%2e", "percent-encoded '.'"),
        ("/a/.%2e/b", "percent-encoded '.'"),
        ("/file%2etxt", "percent-encoded '.'"),
        ("/a%2fb", "percent-encoded '/'"),
        ("/a%2Fb", "percent-encoded '/'"),
        ("/..%2f..%2fetc", "escapes its mount"),
        ("/a%5cb", "percent-encoded '\\\\'"),
        ("/a%5Cb", "percent-encoded '\\\\'"),
        ("/a%00b", "percent-encoded U+0000"),
        ("/a%0ab", "percent-encoded U+000A"),
        ("/a%7fb", "percent-encoded U+007F"),
        ("/%252e%252e", "percent-encoded '.'"),
        ("/%252E%252e/x", "percent-encoded '.'"),
        ("/%25252e", "percent-encoded '.'"),
        ("/a%252fb", "percent-encoded '/'"),
        ("/a%255cb", "percent-encoded '\\\\'"),
        ("/%%32%65", "percent-encoded '.'"),  # '%' + '2' + 'e' only after one decoding
        ("/%2%65", "percent-encoded '.'"),
        ("/%25" + "25" * 6 + "2e", "more than 4 levels deep"),
        # Overlong UTF-8 forms of '.', '/' and '\\'.
        ("/%c0%ae%c0%ae", "overlong"),
        ("/%C0%AF", "overlong"),
        ("/%c1%9c", "overlong"),
        ("/%e0%80%ae", "overlong"),
        ("/%f0%80%80%ae", "overlong"),
        ("/%25c0%25ae", "overlong"),
        # Percent-encoded Unicode lookalikes.
        ("/%EF%BC%8E%EF%BC%8E", "U+FF0E"),
        ("/a%EF%BC%8Fb", "U+FF0F"),
        ("/a%E2%88%95b", "U+2215"),
        ("/%E2%80%A5", "lookalike"),  # U+2025 TWO DOT LEADER folds to '..'
        # Unicode lookalikes of '.', '/' and '\\'.
        ("/\uff0e\uff0e/x", "U+FF0E FULLWIDTH FULL STOP"),
        ("/a/\uff0e", "U+FF0E"),
        ("/\u2024\u2024", "U+2024 ONE DOT LEADER"),
        ("/\ufe52\ufe52", "U+FE52"),
        ("/a\uff0fb", "U+FF0F FULLWIDTH SOLIDUS"),
        ("/a\u2215b", "U+2215 DIVISION SLASH"),
        ("/a\u2044b", "U+2044 FRACTION SLASH"),
        ("/a\u29f8b", "U+29F8"),
        ("/a\uff3cb", "U+FF3C"),
        ("/a\ufe68b", "U+FE68"),
        ("/a\u2216b", "U+2216"),
        ("/\u2100", "U+2100"),  # ACCOUNT OF folds to 'a/c'
        ("/\u2025", "lookalike of '.' or '..'"),
        ("/a/\u2025/b", "lookalike of '.' or '..'"),
        # Sizes.
        ("/" + "x" * (MAX_SEGMENT_BYTES + 1), "longer than 255 bytes"),
        ("/" + "\u00e9" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("/" + "/".join(["y" * 200] * 21), "longer than 4096 bytes"),
        ("/" * 10_000, "longer than 4096 bytes"),
        # Other schemes are not depot paths.
        ("s3://bucket/key", "not a depot path"),
        ("file:///etc/passwd", "not a depot path"),
        ("http://evil/x", "not a depot path"),
    ],
)
def test_rejected_paths(raw: str | bytes, message: str) -> None:
    with pytest.raises(InvalidPath) as info:
        normalize_path(raw)
    assert message in str(info.value)
    assert info.value.errno == errno.EINVAL
    assert info.value.code == "InvalidPath"


def test_rejection_is_an_os_error_and_a_value_for_http() -> None:
    with pytest.raises(OSError) as info:
        normalize_path("/a/../b")
    assert isinstance(info.value, InvalidPath)
    assert info.value.to_dict()["code"] == "InvalidPath"


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidPath, match="must be a string"):
        normalize_path(42)  # type: ignore[arg-type]


def test_error_message_never_carries_raw_control_characters() -> None:
    with pytest.raises(InvalidPath) as info:
        normalize_path("/a\n[fake log line]\x1b[31m/..")
    text = str(info.value)
    assert "\n" not in text and "\x1b" not in text
    assert "\\n" in text


def test_error_message_is_bounded_for_long_inputs() -> None:
    with pytest.raises(InvalidPath) as info:
        normalize_path("/" + "z" * 20_000)
    assert len(str(info.value)) < 400


def test_size_limits_are_inclusive() -> None:
    segment = "s" * MAX_SEGMENT_BYTES
    assert normalize_path("/" + segment) == "/" + segment
    two_byte = "\u00e9" * (MAX_SEGMENT_BYTES // 2)  # 254 bytes
    assert normalize_path("/" + two_byte) == "/" + two_byte
    # 16 segments of 255 bytes, each with its '/', is exactly 4096 bytes.
    longest = "/" + "/".join([segment] * 16)
    assert len(longest.encode()) == MAX_PATH_BYTES
    assert normalize_path(longest) == longest
    with pytest.raises(InvalidPath, match="longer than 4096"):
        normalize_path(longest + "/x")


def test_redundant_separators_do_not_count_against_the_limit() -> None:
    segment = "s" * 200
    path = "/" + "/".join([segment] * 20)  # 4020 bytes once canonical
    assert normalize_path(path.replace("/", "//")) == path


def test_lookalike_tables_cover_every_nfkc_fold() -> None:
    """Every character that NFKC turns into '.', '/' or '\\' (or text holding '/' or '\\')."""
    dots = set()
    separators = set()
    for code in range(0x80, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        folded = unicodedata.normalize("NFKC", char)
        if folded == ".":
            dots.add(char)
        elif "/" in folded or "\\" in folded:
            separators.add(char)
    assert dots == set(NFKC_DOT_LOOKALIKES)
    assert separators == set(NFKC_SEPARATOR_LOOKALIKES)
    for char in dots | separators | set(CONFUSABLE_SEPARATORS):
        with pytest.raises(InvalidPath, match="lookalike"):
            normalize_path(f"/a{char}b")


@pytest.mark.parametrize(
    ("parent", "name", "expected"),
    [
        ("/", "a", "/a"),
        ("/a", "b", "/a/b"),
        ("/a/", "b/c", "/a/b/c"),
        ("depot://a", "b", "/a/b"),
        ("/a", "", "/a"),
        ("/a", ".", "/a"),
        ("/a", "/b", "/a/b"),  # never absolute: stays under parent
        ("/", "/", "/"),
    ],
)
def test_join_path(parent: str, name: str, expected: str) -> None:
    assert join_path(parent, name) == expected


@pytest.mark.parametrize("name", ["..", "../x", "%2e%2e", "a/../..", "\uff0e\uff0e"])
def test_join_path_refuses_escape(name: str) -> None:
    with pytest.raises(InvalidPath, match="escapes its mount"):
        join_path("/models", name)


@pytest.mark.parametrize(
    ("path", "parent", "name"),
    [
        ("/", "/", ""),
        ("/a", "/", "a"),
        ("/a/b", "/a", "b"),
        ("a/b/c/", "/a/b", "c"),
        ("depot://x/y", "/x", "y"),
    ],
)
def test_parent_and_basename(path: str, parent: str, name: str) -> None:
    assert parent_of(path) == parent
    assert basename(path) == name
    if name:
        assert join_path(parent_of(path), basename(path)) == normalize_path(path)


def test_split_path() -> None:
    assert split_path("/") == []
    assert split_path("depot://a//b/") == ["a", "b"]


@pytest.mark.parametrize(
    ("path", "ancestor", "inside"),
    [
        ("/models/x", "/models", True),
        ("/models", "/models", True),
        ("/models2", "/models", False),
        ("/models2/x", "/models", False),
        ("/mod", "/models", False),
        ("/anything", "/", True),
        ("/", "/", True),
    ],
)
def test_is_within_respects_segment_boundaries(path: str, ancestor: str, inside: bool) -> None:
    assert is_within(path, ancestor) is inside


# -- properties ---------------------------------------------------------------------------

_PIECES = [
    "a", "b", "models", "x.bin", ".", "..", "...", "", "%", "%2e", "%2E", "%2f", "%25", "%252e",
    "%41", "25", "2e", "\uff0e", "\u2024", "\u2025", "\u2215", "\uff0f", "\\", "\x00", "\n",
    "\u00e9", " ", "\udc80", "depot:", "%c0", "%ae", "。", "…",
]  # fmt: skip

tricky_paths = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "/", "//", "depot://", "depot:///", "DEPOT://", "./"]),
    st.lists(
        st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3).map("".join),
        max_size=8,
    ),
)
any_paths = st.one_of(tricky_paths, st.text(max_size=64))


def _accepted(path: str) -> str | None:
    try:
        return normalize_path(path)
    except InvalidPath:
        return None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_paths)
@example("/a/%252e%252e/b")
@example("depot://a/./b/")
def test_normalize_is_idempotent_and_canonical(raw: str) -> None:
    out = _accepted(raw)
    if out is None:
        return
    assert normalize_path(out) == out
    assert out.startswith("/")
    assert out == "/" or not out.endswith("/")
    segments = out[1:].split("/") if out != "/" else []
    assert all(seg not in ("", ".", "..") for seg in segments)
    assert "\\" not in out and "\x00" not in out
    assert len(out.encode("utf-8")) <= MAX_PATH_BYTES


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_paths)
def test_no_later_decoding_or_folding_can_escape(raw: str) -> None:
    """A layer below that percent-decodes (repeatedly) or NFKC-folds sees the same segments."""
    out = _accepted(raw)
    if out is None:
        return
    segments = out.split("/")
    for encoding in ("utf-8", "latin-1"):
        text = out
        for _ in range(4):
            text = urllib.parse.unquote(text, encoding=encoding, errors="replace")
            decoded = text.split("/")
            assert len(decoded) == len(segments)
            assert ".." not in decoded and "." not in decoded[1:]
            assert "\\" not in text and "\x00" not in text
    folded = unicodedata.normalize("NFKC", out).split("/")
    assert len(folded) == len(segments)
    assert ".." not in folded and "." not in folded[1:]
