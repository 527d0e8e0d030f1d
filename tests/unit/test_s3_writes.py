"""aws-chunked decoding and checksums of S3 write bodies (depot.s3.bodies)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from depot.s3.bodies import SIGNED, BodyDigest, verified_body
from depot.s3.checksums import new_checksum
from depot.s3.errors import S3Error
from depot.s3.multipart import PartsFile
from depot.s3.sigv4 import EMPTY_SHA256, SignedRequest, derive_signing_key
from depot.s3.writes import multipart_etag


class Reader:
    def __init__(self, data: bytes, step: int = 7) -> None:
        self.pieces = [data[i : i + step] for i in range(0, len(data), step)]

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_checksum_vectors() -> None:
    for name, want in [("crc32c", "e3069283"), ("crc64nvme", "ae8b14860a799888"), ("crc32", "cbf43926")]:
        c = new_checksum(name)
        c.update(b"123456789")
        assert c.digest().hex() == want


def _signed_body(chunks: list[bytes], key: bytes, seed: str, date: str, scope: str) -> bytes:
    out, prev = bytearray(), seed
    for data in [*chunks, b""]:
        sts = f"AWS4-HMAC-SHA256-PAYLOAD\n{date}\n{scope}\n{prev}\n{EMPTY_SHA256}\n{hashlib.sha256(data).hexdigest()}"
        prev = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
        out += f"{len(data):x};chunk-signature={prev}\r\n".encode() + data + b"\r\n"
    return bytes(out)


async def _collect(body: bytes, headers: dict[str, str], signed: SignedRequest) -> tuple[bytes, BodyDigest]:
    digest = BodyDigest()
    out = b"".join([p async for p in verified_body(headers, Reader(body), signed, digest)])
    return out, digest


async def test_signed_aws_chunked() -> None:
    date, scope = "20260101T000000Z", "20260101/us-east-1/s3/aws4_request"
    key = derive_signing_key("secret", "20260101", "us-east-1")
    signed = SignedRequest("PUT", "/b/k", "/b/k", "", [], {}, streamed=True, signing_key=key,
                           seed_signature="a" * 64, scope=scope, amz_date=date)
    chunks = [b"x" * 1000, b"y" * 10]
    body = _signed_body(chunks, key, "a" * 64, date, scope)
    headers = {"x-amz-content-sha256": SIGNED, "x-amz-decoded-content-length": "1010"}
    out, digest = await _collect(body, headers, signed)
    assert out == b"".join(chunks) and digest.etag_hex == hashlib.md5(out).hexdigest()
    tampered = body.replace(b"y" * 10, b"z" * 10)
    with pytest.raises(S3Error) as info:
        await _collect(tampered, headers, signed)
    assert info.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as info:
        await _collect(body[:-20], headers, signed)
    assert info.value.code in ("IncompleteBody", "SignatureDoesNotMatch")


async def test_plain_body_checks() -> None:
    signed = SignedRequest("PUT", "/b/k", "/b/k", "", [], {}, streamed=True)
    import base64

    good = {"content-md5": base64.b64encode(hashlib.md5(b"abc").digest()).decode()}
    assert (await _collect(b"abc", good, signed))[0] == b"abc"
    with pytest.raises(S3Error) as info:
        await _collect(b"abd", good, signed)
    assert info.value.code == "BadDigest"
    with pytest.raises(S3Error) as info:
        await _collect(b"abc", {"x-amz-content-sha256": "0" * 64}, signed)
    assert info.value.code == "XAmzContentSHA256Mismatch"


def test_parts_file_and_etag(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    (root / "1").write_bytes(b"abc")
    (root / "2").write_bytes(b"defg")
    f = PartsFile([(root / "1", 3), (root / "2", 4)])
    assert f.read() == b"abcdefg" and f.seek(2) == 2 and f.read(3) == b"cde"
    f.close()
    md5s = [hashlib.md5(b"abc").hexdigest(), hashlib.md5(b"defg").hexdigest()]
    want = hashlib.md5(b"".join(bytes.fromhex(m) for m in md5s)).hexdigest()
    assert multipart_etag(md5s) == f'"{want}-2"'
