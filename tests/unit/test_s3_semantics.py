"""S3 GET semantics: Range, preconditions, ETags, dates, content types, key and bucket checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from depot.core.types import Attributes, FileStatus
from depot.s3.buckets import BucketMap, check_key, valid_bucket_name
from depot.s3.errors import S3Error, from_depot_error
from depot.s3.responses import iso8601, url_encode_key, xml_text
from depot.s3.semantics import (
    MAX_METADATA_BYTES,
    check_preconditions,
    content_type,
    etag_matches,
    http_date,
    object_headers,
    parse_http_date,
    parse_range,
    request_attributes,
    s3_etag,
)

# --- Range -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 5)),
        ("bytes=3-", 10, (3, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=-30", 10, (0, 10)),
        ("bytes=5-100", 10, (5, 10)),
        ("bytes=9-9", 10, (9, 10)),
        (" bytes= 2 - 3 ", 10, (2, 4)),
        # ignored, as S3 does: the whole object
        ("bytes=5-2", 10, None),
        ("bytes=0-1,4-5", 10, None),
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=-", 10, None),
        ("bytes=1", 10, None),
        ("bytes=--1", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(S3Error) as info:
        parse_range(header, size)
    err = info.value
    assert err.code == "InvalidRange" and err.status == 416
    assert ("Content-Range", f"bytes */{size}") in err.headers
    assert err.fields["ActualObjectSize"] == str(size)


@given(st.text(max_size=40), st.integers(0, 1 << 40))
def test_parse_range_never_crashes(header: str, size: int) -> None:
    try:
        rng = parse_range(header, size)
    except S3Error as err:
        assert err.code == "InvalidRange"
        return
    if rng is not None:
        start, end = rng
        assert 0 <= start < end <= size


# --- preconditions ----------------------------------------------------------------------------------

ETAG = '"abc"'
MTIME = 1_700_000_000.5  # Tue, 14 Nov 2023 22:13:20 GMT
BEFORE = http_date(MTIME - 10)
AT = http_date(MTIME)
AFTER = http_date(MTIME + 10)


@pytest.mark.parametrize(
    ("headers", "outcome"),
    [
        ({}, None),
        ({"if-match": ETAG}, None),
        ({"if-match": "abc"}, None),  # unquoted, as AWS accepts it
        ({"if-match": '"x", "abc"'}, None),
        ({"if-match": "*"}, None),
        ({"if-match": '"x"'}, 412),
        ({"if-match": 'W/"abc"'}, 412),  # strong comparison
        ({"if-none-match": ETAG}, 304),
        ({"if-none-match": 'W/"abc"'}, 304),  # weak comparison
        ({"if-none-match": "*"}, 304),
        ({"if-none-match": '"x"'}, None),
        ({"if-modified-since": BEFORE}, None),
        ({"if-modified-since": AT}, 304),
        ({"if-modified-since": AFTER}, 304),
        ({"if-unmodified-since": BEFORE}, 412),
        ({"if-unmodified-since": AT}, None),
        ({"if-unmodified-since": AFTER}, None),
        ({"if-modified-since": "garbage"}, None),
        ({"if-unmodified-since": "garbage"}, None),
        # S3's documented combinations
        ({"if-match": ETAG, "if-unmodified-since": BEFORE}, None),
        ({"if-none-match": ETAG, "if-modified-since": BEFORE}, 304),
        ({"if-none-match": '"x"', "if-modified-since": AFTER}, None),
        ({"if-match": '"x"', "if-none-match": ETAG}, 412),
    ],
)
def test_preconditions(headers: dict[str, str], outcome: int | None) -> None:
    assert check_preconditions(headers, ETAG, MTIME) == outcome


def test_etag_lists_and_dates() -> None:
    assert etag_matches('W/"a", "b" ,"c"', '"c"', weak=False)
    assert not etag_matches('"a"', '"c"', weak=True)
    assert etag_matches('"unterminated', '"unterminated', weak=False)
    assert parse_http_date("Tue, 14 Nov 2023 22:13:20 GMT") == 1_700_000_000
    assert parse_http_date("Tuesday, 14-Nov-23 22:13:20 GMT") == 1_700_000_000
    assert parse_http_date("Tue Nov 14 22:13:20 2023") == 1_700_000_000
    assert parse_http_date("") is None
    assert http_date(1_700_000_000.9) == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert iso8601(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"


def test_s3_etag() -> None:
    assert s3_etag(FileStatus("/a", 1, 1.0, etag='"d41d8cd98f00b204e9800998ecf8427e"')) == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert s3_etag(FileStatus("/a", 1, 1.0, etag="W/\"x\"")) == '"x"'
    synthesized = s3_etag(FileStatus("/a", 5, 2.0))
    assert synthesized.startswith('"') and synthesized.endswith('-1"')
    assert synthesized != s3_etag(FileStatus("/a", 5, 3.0))  # a new version, a new ETag


def test_content_type() -> None:
    assert content_type("a/b.json") == "application/json"
    assert content_type("a/B.TXT") == "text/plain"
    assert content_type("a/noext") == "binary/octet-stream"
    assert content_type("a.d/noext") == "binary/octet-stream"


# --- attributes: content headers and x-amz-meta-* ------------------------------------------------


def test_request_attributes() -> None:
    assert request_attributes({"content-length": "3", "x-amz-content-sha256": "x"}) is None
    attrs = request_attributes({
        "content-type": "text/csv",
        "cache-control": "no-cache",
        "content-encoding": "aws-chunked,gzip",
        "content-disposition": "inline",
        "content-language": "fr",
        "x-amz-meta-owner": "team-a",
        "x-amz-meta-content-type": "not the header",
        "x-amz-meta-": "nameless: dropped",
        "expires": "never",
    })
    assert attrs == Attributes.of(
        {"Content-Type": "text/csv", "Cache-Control": "no-cache", "Content-Encoding": "gzip",
         "Content-Disposition": "inline", "Content-Language": "fr"},
        {"owner": "team-a", "content-type": "not the header"},
    )
    # aws-chunked frames the request body only: not kept.
    assert request_attributes({"content-encoding": "aws-chunked"}) is None


def test_request_metadata_limit() -> None:
    at_limit = {"x-amz-meta-k": "v" * (MAX_METADATA_BYTES - 1)}
    assert request_attributes(at_limit) is not None
    with pytest.raises(S3Error) as info:
        request_attributes({"x-amz-meta-k": "v" * MAX_METADATA_BYTES})
    assert info.value.code == "MetadataTooLarge" and info.value.status == 400
    # Bytes, not characters: two-byte UTF-8 characters count twice.
    utf8 = ("é" * 1024).encode().decode("latin-1")
    with pytest.raises(S3Error):
        request_attributes({"x-amz-meta-k": utf8})


def test_non_ascii_values_are_kept_rfc2047_encoded() -> None:
    sent = "Grüße".encode().decode("latin-1")  # UTF-8 bytes as the HTTP server decodes them
    attrs = request_attributes({"x-amz-meta-name": sent, "x-amz-meta-word": "=?UTF-8?B?w6k=?="})
    assert attrs is not None
    meta = dict(attrs.metadata)
    assert meta["name"] == "=?UTF-8?B?R3LDvMOfZQ==?="  # what AWS answers for such a value
    assert meta["word"] == "=?UTF-8?B?w6k=?="  # already encoded: kept as sent
    latin = request_attributes({"x-amz-meta-l": "\xe9"})  # a lone Latin-1 byte: its character
    assert latin is not None and dict(latin.metadata)["l"] == "=?UTF-8?B?w6k=?="


def test_object_headers() -> None:
    assert object_headers(None, "a/b.json") == [("Content-Type", "application/json")]
    assert object_headers(Attributes(), "a/b.json") == [("Content-Type", "application/json")]
    attrs = Attributes.of(
        {"Content-Type": "text/csv", "Cache-Control": "max-age=5"},
        {"owner": "a", "stored": "ünï\r\nX-Injected: 1"},
    )
    assert object_headers(attrs, "a/b.json") == [
        ("Content-Type", "text/csv"),
        ("Cache-Control", "max-age=5"),
        ("x-amz-meta-owner", "a"),
        # One line, sent as UTF-8 (the writer encodes header text as Latin-1).
        ("x-amz-meta-stored", "ünï  X-Injected: 1".encode().decode("latin-1")),
    ]
    skipped = object_headers(attrs, "k", frozenset({"Content-Type", "Cache-Control"}))
    assert [name for name, _ in skipped] == ["x-amz-meta-owner", "x-amz-meta-stored"]


# --- keys and buckets -------------------------------------------------------------------------------


def test_bucket_names() -> None:
    assert valid_bucket_name("models")
    assert valid_bucket_name("My_Bucket.v2")
    for bad in ("", ".", "..", "-a", "a b", "a/b", "é", "x" * 256):
        assert not valid_bucket_name(bad)


def test_bucket_map_modes() -> None:
    top = BucketMap()
    assert top.object_path("data", "a/b.txt") == "/data/a/b.txt"
    with pytest.raises(S3Error) as info:
        top.root("bad name")
    assert info.value.code == "InvalidBucketName"
    mapped = BucketMap("mapped", {"all": "/", "ckpt": "/runs/r1/"})
    assert mapped.object_path("all", "x/y") == "/x/y"
    assert mapped.object_path("ckpt", "step-1") == "/runs/r1/step-1"
    with pytest.raises(S3Error) as info:
        mapped.root("data")
    assert info.value.code == "NoSuchBucket"


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("../etc/passwd", "InvalidArgument"),
        ("a/../../b", "InvalidArgument"),
        ("a/%2e%2e/b", "InvalidArgument"),
        ("a/%252e%252e/b", "InvalidArgument"),
        ("a/\u2025/b", "InvalidArgument"),
        ("a\\b", "InvalidArgument"),
        ("a\x00b", "InvalidArgument"),
        ("a//b", "NoSuchKey"),
        ("./a", "NoSuchKey"),
        ("a/", "NoSuchKey"),
        ("depot://a", "NoSuchKey"),
        ("x" * 1025, "KeyTooLongError"),
    ],
)
def test_key_tricks(key: str, code: str) -> None:
    with pytest.raises(S3Error) as info:
        check_key(key, "b")
    assert info.value.code == code


def test_ordinary_keys() -> None:
    for key in ("a", "a/b/c.txt", "100%", "50%off", "a b+c", "日本/語.txt", "..a", "a.."):
        assert check_key(key, "b") == "/" + key


@given(st.text(max_size=60))
def test_check_key_total(key: str) -> None:
    try:
        path = check_key(key, "b")
    except S3Error as err:
        assert err.code in ("InvalidArgument", "NoSuchKey", "KeyTooLongError")
    else:
        assert path == "/" + key and ".." not in path.split("/")


# --- errors and XML text ------------------------------------------------------------------------------


def test_error_xml_and_mapping() -> None:
    from depot.core.errors import InvalidPath, NotFound, Throttled, Unavailable

    err = S3Error("NoSuchKey", Key="a&b<c>")
    xml = err.to_xml("/b/a&b", "RID", "HID").decode()
    assert "<Code>NoSuchKey</Code>" in xml and "<Key>a&amp;b&lt;c&gt;</Key>" in xml
    assert "<Resource>/b/a&amp;b</Resource>" in xml and err.status == 404
    assert from_depot_error(NotFound("x"), "b", "k").code == "NoSuchKey"
    assert from_depot_error(NotFound("x"), "b", None).code == "NoSuchBucket"
    assert from_depot_error(Throttled("x"), "b", "k").code == "SlowDown"
    assert from_depot_error(Unavailable("x"), "b", "k").status == 503
    assert from_depot_error(InvalidPath("x"), "b", "k").code == "InvalidArgument"
    assert xml_text('"e"') == "&quot;e&quot;"
    assert url_encode_key("a b+c/d") == "a%20b%2Bc/d"
