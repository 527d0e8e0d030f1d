"""XML documents of S3 responses, written as strings (no DOM: listings of 1000 keys are hot).

Element names, order and formats follow the S3 API reference: timestamps in ISO 8601 with
milliseconds (``2009-10-12T17:50:30.000Z``), ETags quoted (and escaped as ``&quot;``), keys
URL-encoded when the request asked for ``encoding-type=url``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

XML_HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_CONTENT_TYPE = ("Content-Type", "application/xml")
OWNER_ID = "depot"

_ESCAPES: dict[int, str] = {
    ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;", ord('"'): "&quot;", ord("\r"): "&#13;",
}
# Characters XML 1.0 cannot carry at all (C0 controls but tab and newline, surrogates, U+FFFE/F):
# they can only come from a request (echoed in an error), never from the namespace.
_ESCAPES.update(
    {c: "\ufffd" for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0xD800, 0xE000), 0xFFFE, 0xFFFF]}
)


def xml_text(value: str) -> str:
    """``value`` escaped for element text (characters XML cannot hold become U+FFFD)."""
    return value.translate(_ESCAPES)


def url_encode_key(value: str) -> str:
    """A key as S3 writes it for ``encoding-type=url``: decodable by ``unquote`` and ``unquote_plus``."""
    return quote(value, safe="/")


def iso8601(ts: float) -> str:
    """``2009-10-12T17:50:30.000Z``: the timestamp format of S3 XML documents."""
    ts = max(0.0, ts)
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    """One object of a listing."""

    key: str
    size: int
    mtime: float
    etag: str


def list_buckets_xml(buckets: Iterable[tuple[str, float]], owner: str = OWNER_ID) -> bytes:
    parts = [
        XML_HEADER,
        f'<ListAllMyBucketsResult xmlns="{NAMESPACE}">',
        f"<Owner><ID>{xml_text(owner)}</ID><DisplayName>{xml_text(owner)}</DisplayName></Owner>",
        "<Buckets>",
    ]
    for name, created in buckets:
        parts.append(
            f"<Bucket><Name>{xml_text(name)}</Name>"
            f"<CreationDate>{iso8601(created)}</CreationDate></Bucket>"
        )
    parts.append("</Buckets></ListAllMyBucketsResult>")
    return "".join(parts).encode("utf-8")


def location_xml(region: str) -> bytes:
    # us-east-1 is the empty location constraint, as AWS answers it.
    value = "" if region == "us-east-1" else xml_text(region)
    return (
        f'{XML_HEADER}<LocationConstraint xmlns="{NAMESPACE}">{value}</LocationConstraint>'
    ).encode()


def versioning_xml() -> bytes:
    """Versioning was never enabled on a depot bucket: the empty configuration."""
    return f'{XML_HEADER}<VersioningConfiguration xmlns="{NAMESPACE}"/>'.encode()


@dataclass(slots=True)
class ListingXml:
    """Everything a ListObjects (v1) or ListObjectsV2 answer holds."""

    bucket: str
    prefix: str
    delimiter: str | None
    max_keys: int
    encoding_url: bool
    contents: list[ObjectEntry]
    prefixes: list[str]
    truncated: bool
    # v1
    marker: str | None = None
    next_marker: str | None = None
    # v2
    v2: bool = False
    continuation_token: str | None = None
    next_continuation_token: str | None = None
    start_after: str | None = None
    fetch_owner: bool = False

    def render(self) -> bytes:
        enc = url_encode_key if self.encoding_url else (lambda s: s)
        parts = [
            XML_HEADER,
            f'<ListBucketResult xmlns="{NAMESPACE}">',
            f"<Name>{xml_text(self.bucket)}</Name>",
            f"<Prefix>{xml_text(enc(self.prefix))}</Prefix>",
        ]
        if self.v2:
            if self.continuation_token is not None:
                parts.append(
                    f"<ContinuationToken>{xml_text(self.continuation_token)}</ContinuationToken>"
                )
            if self.start_after is not None:
                parts.append(f"<StartAfter>{xml_text(enc(self.start_after))}</StartAfter>")
            parts.append(f"<KeyCount>{len(self.contents) + len(self.prefixes)}</KeyCount>")
        else:
            parts.append(f"<Marker>{xml_text(enc(self.marker or ''))}</Marker>")
        parts.append(f"<MaxKeys>{self.max_keys}</MaxKeys>")
        if self.delimiter is not None:
            parts.append(f"<Delimiter>{xml_text(enc(self.delimiter))}</Delimiter>")
        if self.encoding_url:
            parts.append("<EncodingType>url</EncodingType>")
        parts.append(f"<IsTruncated>{'true' if self.truncated else 'false'}</IsTruncated>")
        if self.v2 and self.next_continuation_token is not None:
            parts.append(
                f"<NextContinuationToken>{xml_text(self.next_continuation_token)}"
                "</NextContinuationToken>"
            )
        if not self.v2 and self.next_marker is not None:
            parts.append(f"<NextMarker>{xml_text(enc(self.next_marker))}</NextMarker>")
        owner = (
            f"<Owner><ID>{OWNER_ID}</ID><DisplayName>{OWNER_ID}</DisplayName></Owner>"
            if (self.fetch_owner or not self.v2)
            else ""
        )
        for entry in self.contents:
            parts.append(
                f"<Contents><Key>{xml_text(enc(entry.key))}</Key>"
                f"<LastModified>{iso8601(entry.mtime)}</LastModified>"
                f"<ETag>{xml_text(entry.etag)}</ETag><Size>{entry.size}</Size>"
                f"{owner}<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for prefix in self.prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{xml_text(enc(prefix))}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        return "".join(parts).encode("utf-8")
