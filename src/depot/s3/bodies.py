"""Request bodies of S3 writes: plain or ``aws-chunked``, verified while they stream.

``verified_body`` turns the streamed body of a PUT into an async iterator of the object's bytes.
It checks everything the client sent about the body, and raises the S3 error before its last
byte is yielded... or, at the latest, when the iterator ends: a consumer that only commits once
the iterator is exhausted (``CacheClient.write`` spools an async source before sending it)
never writes a body that failed a check.

- ``Content-MD5`` (``InvalidDigest`` when it is not base64 of 16 bytes, ``BadDigest``);
- ``x-amz-content-sha256`` as a hex digest (``XAmzContentSHA256Mismatch``);
- ``x-amz-checksum-{crc32,crc32c,crc64nvme,sha1,sha256}`` headers and the same in an
  ``aws-chunked`` trailer named by ``x-amz-trailer`` (``BadDigest``);
- ``aws-chunked`` framing (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]``,
  ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``), each chunk's signature for the signed variants
  (``SignatureDoesNotMatch``) and ``x-amz-decoded-content-length`` (``IncompleteBody``).

The MD5 of the body is always computed: it is the object's (or the part's) ETag.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from depot.s3.checksums import ALGORITHMS, DIGEST_SIZES, Checksum, b64, decode_b64, new_checksum
from depot.s3.errors import S3Error
from depot.s3.sigv4 import EMPTY_SHA256, SignedRequest

if TYPE_CHECKING:
    from depot.s3.gateway import BodyReader

SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = (SIGNED, SIGNED_TRAILER, UNSIGNED_TRAILER)
MAX_LINE = 8 * 1024
MAX_CHUNK = 1 << 40


@dataclass(slots=True)
class BodyDigest:
    """What the body turned out to be, filled in as it streams."""

    size: int = 0
    md5: hashlib._Hash = field(default_factory=hashlib.md5)

    @property
    def etag_hex(self) -> str:
        return self.md5.hexdigest()


class _Buffered:
    """A streamed body read by lines (chunk headers, trailers) and by counts (chunk data)."""

    def __init__(self, stream: BodyReader) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> bool:
        chunk = await self.stream.read()
        if not chunk:
            return False
        self.buf += chunk
        return True

    async def line(self) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            start = max(0, len(self.buf) - 1)
            if len(self.buf) > MAX_LINE:
                raise S3Error("InvalidRequest", "aws-chunked: a chunk header or trailer line is too long")
            if not await self._fill():
                raise _incomplete()

    async def take(self, count: int) -> AsyncIterator[bytes]:
        left = count
        while left:
            if not self.buf and not await self._fill():
                raise _incomplete()
            if len(self.buf) <= left:
                piece = bytes(self.buf)
                self.buf.clear()
            else:
                piece = bytes(self.buf[:left])
                del self.buf[:left]
            left -= len(piece)
            yield piece

    async def rest_empty(self) -> bool:
        while not self.buf:
            if not await self._fill():
                return True
        return False


def _incomplete() -> S3Error:
    return S3Error(
        "IncompleteBody",
        "You did not provide the number of bytes specified by the Content-Length HTTP header",
    )


def _checksum_headers(headers: Mapping[str, str]) -> dict[str, bytes]:
    """Algorithm -> expected digest, from ``x-amz-checksum-*`` headers."""
    expected: dict[str, bytes] = {}
    for name in ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{name}")
        if value is None:
            continue
        raw = decode_b64(value, DIGEST_SIZES[name])
        if raw is None:
            raise S3Error("InvalidRequest", f"Value for x-amz-checksum-{name} header is invalid.")
        expected[name] = raw
    if len(expected) > 1:
        raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header. Multiple "
                      "checksum Types are not allowed.")
    return expected


def _bad_checksum(name: str) -> S3Error:
    return S3Error("BadDigest", f"The {name.upper()} you specified did not match the calculated checksum.")


async def verified_body(
    headers: Mapping[str, str], stream: BodyReader, signed: SignedRequest, digest: BodyDigest
) -> AsyncIterator[bytes]:
    """The object's bytes; raises the S3 error of a failed check (see the module docstring)."""
    md5_header = headers.get("content-md5")
    md5_expected = None
    if md5_header is not None:
        md5_expected = decode_b64(md5_header, 16)
        if md5_expected is None:
            raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.",
                          status=400, ContentMD5=md5_header[:64])
    payload = headers.get("x-amz-content-sha256", "")
    expected = _checksum_headers(headers)
    sums: dict[str, Checksum] = {name: new_checksum(name) for name in expected}
    sha256 = hashlib.sha256() if len(payload) == 64 else None
    trailer_name: str | None = None
    chunked = payload in STREAMING_MODES
    if payload.startswith("STREAMING-") and not chunked:
        raise S3Error("NotImplemented", f"x-amz-content-sha256 {payload[:60]} is not supported "
                      "by depot's S3 gateway")
    if chunked:
        trailer = headers.get("x-amz-trailer")
        if payload != SIGNED and trailer is None:
            raise S3Error("InvalidRequest", f"{payload} needs an x-amz-trailer header")
        if trailer is not None:
            trailer_name = trailer.strip().lower()
            alg = trailer_name.removeprefix("x-amz-checksum-")
            if alg == trailer_name or alg not in ALGORITHMS:
                raise S3Error("InvalidRequest", f"The value specified in the x-amz-trailer header "
                              f"is not supported: {trailer[:60]}")
            if expected:
                raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header")
            sums = {alg: new_checksum(alg)}
    md5 = digest.md5

    def consume(piece: bytes) -> None:
        md5.update(piece)
        if sha256 is not None:
            sha256.update(piece)
        for checksum in sums.values():
            checksum.update(piece)
        digest.size += len(piece)

    if not chunked:
        while piece := await stream.read():
            consume(piece)
            yield piece
    else:
        async for piece in _dechunk(headers, stream, signed, payload, trailer_name, expected):
            consume(piece)
            yield piece
        decoded = headers.get("x-amz-decoded-content-length")
        if decoded is not None and (not decoded.isdigit() or int(decoded) != digest.size):
            raise _incomplete()
    if md5_expected is not None and md5.digest() != md5_expected:
        raise S3Error("BadDigest", ExpectedDigest=md5_expected.hex(),
                      CalculatedDigest=b64(md5.digest()))
    if sha256 is not None and sha256.hexdigest() != payload:
        raise S3Error("XAmzContentSHA256Mismatch", ClientComputedContentSHA256=payload,
                      S3ComputedContentSHA256=sha256.hexdigest())
    for name, checksum in sums.items():
        if checksum.digest() != expected.get(name):
            raise _bad_checksum(name)


async def _dechunk(
    headers: Mapping[str, str],
    stream: BodyReader,
    signed: SignedRequest,
    mode: str,
    trailer_name: str | None,
    expected: dict[str, bytes],
) -> AsyncIterator[bytes]:
    """Decode ``aws-chunked``; put the trailer's checksum in ``expected``."""
    reader = _Buffered(stream)
    verify = mode != UNSIGNED_TRAILER
    previous = signed.seed_signature
    key = signed.signing_key
    if verify and (previous is None or key is None):
        raise S3Error("AccessDenied", f"{mode} needs a request signed in the Authorization header")
    prefix = f"AWS4-HMAC-SHA256-PAYLOAD\n{signed.amz_date}\n{signed.scope}\n"
    while True:
        line = await reader.line()
        size_text, _, ext = line.decode("latin-1").partition(";")
        size_text = size_text.strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise S3Error("InvalidRequest", "aws-chunked: malformed chunk size") from None
        if size < 0 or size > MAX_CHUNK or len(size_text) > 16:
            raise S3Error("InvalidRequest", "aws-chunked: malformed chunk size")
        chunk_sig: str | None = None
        if ext:
            name, _, value = ext.partition("=")
            if name.strip() == "chunk-signature":
                chunk_sig = value.strip()
        if verify and chunk_sig is None:
            raise S3Error("SignatureDoesNotMatch", "aws-chunked: a chunk carries no signature")
        chunk_hash = hashlib.sha256() if verify else None
        async for piece in reader.take(size):
            if chunk_hash is not None:
                chunk_hash.update(piece)
            yield piece
        if verify:
            assert chunk_hash is not None and key is not None and chunk_sig is not None
            sts = f"{prefix}{previous}\n{EMPTY_SHA256}\n{chunk_hash.hexdigest()}"
            want = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, chunk_sig.lower()):
                raise S3Error("SignatureDoesNotMatch", "aws-chunked: a chunk signature does not match")
            previous = want
        if size == 0:
            break
        if await reader.line() != b"":
            raise S3Error("InvalidRequest", "aws-chunked: chunk data is longer than its size")
    # trailers (the last chunk's CRLF comes after them), then an empty line
    trailers: dict[str, str] = {}
    lines: list[bytes] = []
    while True:
        line = await reader.line()
        if not line:
            break
        lines.append(line)
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise S3Error("InvalidRequest", "aws-chunked: malformed trailer")
        trailers[name.strip().lower()] = value.strip()
    if mode == SIGNED_TRAILER:
        assert key is not None
        sig = trailers.pop("x-amz-trailer-signature", None)
        body = b"".join(ln + b"\n" for ln in lines if not ln.lower().startswith(b"x-amz-trailer-signature"))
        sts = (f"AWS4-HMAC-SHA256-TRAILER\n{signed.amz_date}\n{signed.scope}\n{previous}\n"
               f"{hashlib.sha256(body).hexdigest()}")
        want = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        if sig is None or not hmac.compare_digest(want, sig.lower()):
            raise S3Error("SignatureDoesNotMatch", "aws-chunked: the trailer signature does not match")
    if trailer_name is not None:
        found = trailers.get(trailer_name)
        alg = trailer_name.removeprefix("x-amz-checksum-")
        raw = decode_b64(found, DIGEST_SIZES[alg]) if found is not None else None
        if raw is None:
            raise S3Error("InvalidRequest", f"The {trailer_name} trailer is missing or invalid")
        expected[alg] = raw
    if not await reader.rest_empty():
        raise S3Error("InvalidRequest", "aws-chunked: data after the end of the body")


__all__ = ["STREAMING_MODES", "BodyDigest", "verified_body"]
