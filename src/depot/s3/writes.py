"""S3 write operations over ``CacheClient`` writes (docs/s3.md, "Writes").

``install_writes(gateway, client, staging_dir)`` registers the handlers on a gateway whose client
can write: PutObject (and CopyObject), DeleteObject, DeleteObjects, the multipart calls,
CreateBucket and DeleteBucket. Bodies stream through ``depot.s3.bodies.verified_body`` and reach
``CacheClient.write`` as an async source, which the client spools (memory bounded, the rest on
disk) before it sends a byte: a body that fails a check (Content-MD5, x-amz-content-sha256,
checksums, chunk signatures) writes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote

from depot.client.client import version_of
from depot.client.localwrites import LOCAL_WRITE_MIN
from depot.core.errors import AlreadyExists, DepotError, NotFound, StaleVersion
from depot.core.types import Attributes, FileStatus
from depot.s3.bodies import BodyDigest, verified_body
from depot.s3.buckets import join_key
from depot.s3.checksums import ALGORITHMS, DIGEST_SIZES, decode_b64, new_checksum
from depot.s3.errors import S3Error, from_depot_error
from depot.s3.gateway import ObjectReader, S3Gateway, S3Request
from depot.s3.multipart import MAX_PARTS, MIN_PART_SIZE, PartsFile, Staging, Upload
from depot.s3.responses import NAMESPACE, OWNER_ID, XML_HEADER, iso8601, xml_text
from depot.s3.semantics import check_preconditions, parse_range, request_attributes, s3_etag

MAX_DELETE_KEYS = 1000
COPY_BLOCK = 4 * 1024 * 1024
DELETE_CONCURRENCY = 16
# PUT bodies below this are gathered and written as bytes, in one request (what the client
# does with a write this small anyway); larger ones stream (to a local write where it applies).
SMALL_BODY = LOCAL_WRITE_MIN


@runtime_checkable
class ObjectWriter(ObjectReader, Protocol):
    """A reader that can also write: ``CacheClient``."""

    async def write(
        self, path: str, data: object, *, attributes: Attributes | None = None
    ) -> FileStatus: ...

    async def delete(self, path: str) -> None: ...

    async def mkdir(self, path: str) -> None: ...


def multipart_etag(md5s: list[str]) -> str:
    joined = b"".join(bytes.fromhex(m) for m in md5s)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(md5s)}"'


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def parse_xml(body: bytes, root_name: str) -> ET.Element:
    """The root element of a small XML request body, or ``MalformedXML``."""
    head = body[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in body.lower():
        raise S3Error("MalformedXML")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("MalformedXML") from None
    if _local(root.tag) != root_name:
        raise S3Error("MalformedXML")
    return root


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str) -> str | None:
    found = _children(element, name)
    return (found[0].text or "") if found else None


def _strip_etag(tag: str) -> str:
    tag = tag.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    return tag.strip('"')


def _check_small_body(ctx: S3Request) -> None:
    """Content-MD5 / x-amz-checksum-* of a buffered body (DeleteObjects, Complete)."""
    headers = ctx.http.headers
    body = ctx.http.body
    md5 = headers.get("content-md5")
    if md5 is not None:
        raw = decode_b64(md5, 16)
        if raw is None:
            raise S3Error("InvalidDigest")
        if hashlib.md5(body).digest() != raw:
            raise S3Error("BadDigest")
    for name in ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{name}")
        if value is None:
            continue
        want = decode_b64(value, DIGEST_SIZES[name])
        checksum = new_checksum(name)
        checksum.update(body)
        if want is None or checksum.digest() != want:
            raise S3Error("BadDigest", f"The {name.upper()} you specified did not match the "
                          "calculated checksum.")


class S3Writes:
    """The write handlers of one gateway."""

    def __init__(self, gateway: S3Gateway, client: ObjectWriter, staging_dir: Path) -> None:
        self.gw = gateway
        self.client = client
        self.staging = Staging(staging_dir)
        # Buckets made by CreateBucket that hold no file yet (object stores keep no empty
        # directories): writes accept them as existing.
        self.created: set[str] = set()

    def install(self) -> None:
        gw = self.gw
        gw.register("PutObject", self.put_object)
        gw.register("DeleteObject", self.delete_object)
        gw.register("DeleteObjects", self.delete_objects)
        gw.register("CreateMultipartUpload", self.create_multipart_upload)
        gw.register("UploadPart", self.upload_part)
        gw.register("CompleteMultipartUpload", self.complete_multipart_upload)
        gw.register("AbortMultipartUpload", self.abort_multipart_upload)
        gw.register("ListParts", self.list_parts)
        gw.register("ListMultipartUploads", self.list_multipart_uploads)
        gw.register("CreateBucket", self.create_bucket)
        gw.register("DeleteBucket", self.delete_bucket)

    # helpers ----------------------------------------------------------------------------------------
    async def _bucket(self, bucket: str) -> str:
        """The root of an existing bucket (or one CreateBucket made), else ``NoSuchBucket``."""
        try:
            return await self.gw._bucket_root(bucket)
        except S3Error as err:
            if err.code == "NoSuchBucket" and bucket in self.created:
                return self.gw.buckets.root(bucket)
            raise

    async def _object_path(self, ctx: S3Request, bucket: str | None = None, key: str | None = None) -> str:
        bucket = ctx.bucket if bucket is None else bucket
        key = ctx.key if key is None else key
        root = self.gw.buckets.root(bucket)
        try:
            path = join_key(root, key, bucket)
        except S3Error as err:
            if err.code != "NoSuchKey":
                raise
            raise S3Error("InvalidArgument", "depot keys must be canonical paths (no empty, '.' "
                          "or trailing segments)", ArgumentName="key", ArgumentValue=key[:200]) from None
        await self._bucket(bucket)
        return path

    def _key_path(self, bucket: str, key: str) -> str | None:
        """The path of ``key``; None for a non-canonical key (it names no object)."""
        try:
            return join_key(self.gw.buckets.root(bucket), key, bucket)
        except S3Error as err:
            if err.code != "NoSuchKey":
                raise
            return None

    def _headers(self, ctx: S3Request) -> list[tuple[str, str]]:
        return self.gw._base_headers(ctx.request_id)

    def _send_xml(self, ctx: S3Request, body: str) -> None:
        self.gw._send_xml(ctx, (XML_HEADER + body).encode("utf-8"))

    def _body(self, ctx: S3Request, digest: BodyDigest) -> AsyncIterator[bytes]:
        stream = ctx.body_reader()
        if stream is None or ctx.signed is None:
            raise S3Error("InvalidRequest", "this request needs a body")
        return verified_body(ctx.http.headers, stream, ctx.signed, digest)

    async def _writable(self, path: str) -> None:
        """AccessDenied now (not after the body) for paths under a read-only mount."""
        parent = posixpath.dirname(path)
        try:
            await self.client.mkdir(parent)
        except (AlreadyExists, NotFound):
            pass

    # PutObject / CopyObject ------------------------------------------------------------------------
    async def put_object(self, ctx: S3Request) -> None:
        if "x-amz-copy-source" in ctx.http.headers:
            await self.copy_object(ctx)
            return
        if ctx.key.endswith("/"):
            await self._put_folder(ctx)
            return
        attributes = request_attributes(ctx.http.headers)
        path = await self._object_path(ctx)
        digest = BodyDigest()
        body = await _small_or_stream(self._body(ctx, digest))
        await self.client.write(path, body, attributes=attributes)
        headers = self._headers(ctx)
        headers.append(("ETag", f'"{digest.etag_hex}"'))
        ctx.writer.start(200, headers, 0)

    async def _put_folder(self, ctx: S3Request) -> None:
        """``key/`` with an empty body: a folder marker (tools make them); a directory here."""
        key = ctx.key.rstrip("/")
        path = await self._object_path(ctx, key=key) if key else await self._bucket(ctx.bucket)
        digest = BodyDigest()
        async for _ in self._body(ctx, digest):
            pass
        if digest.size:
            raise S3Error("InvalidArgument", "depot cannot store data under a key ending in '/'",
                          ArgumentName="key", ArgumentValue=ctx.key[:200])
        try:
            await self.client.mkdir(path)
        except AlreadyExists:
            raise S3Error("InvalidArgument", "a file exists at this folder's path") from None
        headers = self._headers(ctx)
        headers.append(("ETag", f'"{digest.etag_hex}"'))
        ctx.writer.start(200, headers, 0)

    def _copy_source(self, ctx: S3Request) -> tuple[str, str]:
        raw = ctx.http.headers["x-amz-copy-source"]
        source, _, query = raw.partition("?")
        source = unquote(source).lstrip("/")
        if query:
            name, _, value = query.partition("=")
            if name != "versionId" or value != "null":
                raise S3Error("InvalidArgument", "depot keeps no versions: only versionId=null",
                              ArgumentName="x-amz-copy-source")
        bucket, _, key = source.partition("/")
        if not bucket or not key:
            raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key: "
                          "sourcebucket/sourcekey", ArgumentName="x-amz-copy-source")
        return bucket, key

    async def _source(
        self, ctx: S3Request, *, attributes: bool = False
    ) -> tuple[str, str, FileStatus]:
        bucket, key = self._copy_source(ctx)
        path = await self._object_path(ctx, bucket, key)
        try:
            status = await self.client.stat(path, attributes=attributes)
        except NotFound:
            raise S3Error("NoSuchKey", Key=key, BucketName=bucket) from None
        if status.is_dir:
            raise S3Error("NoSuchKey", Key=key, BucketName=bucket)
        headers = ctx.http.headers
        conditions = {
            name[len("x-amz-copy-source-"):]: value
            for name, value in headers.items()
            if name.startswith("x-amz-copy-source-if-")
        }
        if conditions and check_preconditions(conditions, s3_etag(status), status.mtime) is not None:
            raise S3Error("PreconditionFailed", Condition="x-amz-copy-source-If-*")
        return key, path, status

    async def _read_source(
        self, path: str, status: FileStatus, start: int, end: int, digest: BodyDigest
    ) -> AsyncIterator[bytes]:
        version = version_of(status)
        buf = bytearray(COPY_BLOCK)
        pos = start
        while pos < end:
            stop = min(end, pos + COPY_BLOCK)
            count = await self.client.read_range_into(
                path, pos, stop, memoryview(buf)[: stop - pos], version=version
            )
            if count != stop - pos:
                raise StaleVersion("the copy source changed while it was copied", path)
            piece = bytes(buf[:count])
            digest.md5.update(piece)
            digest.size += count
            pos = stop
            yield piece

    async def copy_object(self, ctx: S3Request) -> None:
        directive = ctx.http.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.",
                          ArgumentName="x-amz-metadata-directive", ArgumentValue=directive[:40])
        # COPY: the source's content headers and metadata; REPLACE: the request's only.
        replaced = request_attributes(ctx.http.headers) if directive == "REPLACE" else None
        _, src_path, status = await self._source(ctx, attributes=directive == "COPY")
        attributes = status.attributes if directive == "COPY" else replaced
        path = await self._object_path(ctx)
        if path == src_path and directive == "COPY":
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata, storage class, website redirect location "
                "or encryption attributes.",
            )
        digest = BodyDigest()
        new = await self.client.write(
            path, self._read_source(src_path, status, 0, status.size, digest),
            attributes=attributes,
        )
        self._send_xml(
            ctx,
            f'<CopyObjectResult xmlns="{NAMESPACE}"><LastModified>{iso8601(new.mtime)}'
            f'</LastModified><ETag>&quot;{digest.etag_hex}&quot;</ETag></CopyObjectResult>',
        )

    # deletes -------------------------------------------------------------------------------------
    async def _delete_path(self, path: str) -> None:
        """Delete a file; a missing key (or a directory) is not an error, as on S3."""
        try:
            status = await self.client.stat(path)
        except NotFound:
            await self._writable(path)  # a read-only mount still refuses
            return
        if status.is_dir:
            await self._writable(path)
            return
        try:
            await self.client.delete(path)
        except NotFound:
            pass

    async def delete_object(self, ctx: S3Request) -> None:
        version_id = ctx.params.get("versionId")
        if version_id is not None and version_id != "null":
            raise S3Error("InvalidArgument", "Invalid version id specified",
                          ArgumentName="versionId", ArgumentValue=version_id[:80])
        path = self._key_path(ctx.bucket, ctx.key)
        await self._bucket(ctx.bucket)
        if path is not None:
            await self._delete_path(path)
        ctx.writer.start(204, self._headers(ctx), None)

    async def delete_objects(self, ctx: S3Request) -> None:
        _check_small_body(ctx)
        root = parse_xml(ctx.http.body, "Delete")
        quiet = (_text(root, "Quiet") or "").strip().lower() == "true"
        objects = _children(root, "Object")
        if not objects or len(objects) > MAX_DELETE_KEYS:
            raise S3Error("MalformedXML")
        keys: list[str] = []
        for obj in objects:
            key = _text(obj, "Key")
            if not key:
                raise S3Error("MalformedXML")
            keys.append(key)
        await self._bucket(ctx.bucket)
        limit = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def one(key: str) -> S3Error | None:
            async with limit:
                try:
                    path = self._key_path(ctx.bucket, key)
                    if path is not None:
                        await self._delete_path(path)
                except S3Error as err:
                    return err
                except DepotError as exc:
                    return from_depot_error(exc, ctx.bucket, key)
                return None

        results = await asyncio.gather(*(one(key) for key in keys))
        parts = [f'<DeleteResult xmlns="{NAMESPACE}">']
        for key, err in zip(keys, results, strict=True):
            if err is None:
                if not quiet:
                    parts.append(f"<Deleted><Key>{xml_text(key)}</Key></Deleted>")
            else:
                parts.append(
                    f"<Error><Key>{xml_text(key)}</Key><Code>{xml_text(err.code)}</Code>"
                    f"<Message>{xml_text(err.message)}</Message></Error>"
                )
        parts.append("</DeleteResult>")
        self._send_xml(ctx, "".join(parts))

    # buckets --------------------------------------------------------------------------------------
    async def create_bucket(self, ctx: S3Request) -> None:
        bucket = ctx.bucket
        root = self.gw.buckets.root(bucket)  # InvalidBucketName; NoSuchBucket when not mapped
        if self.gw.buckets.mode == "mapped" and bucket not in self.gw.buckets.mapped:
            raise S3Error("AccessDenied", "buckets are the names of s3.buckets (bucket_mode: mapped)")
        exists = True
        try:
            await self.gw._bucket_root(bucket)
        except S3Error:
            exists = bucket in self.created
        if exists:
            if self.gw.region != "us-east-1":
                raise S3Error("BucketAlreadyOwnedByYou", BucketName=bucket)
        else:
            await self.client.mkdir(root)
            self.created.add(bucket)
        headers = self._headers(ctx)
        headers.append(("Location", f"/{bucket}"))
        ctx.writer.start(200, headers, 0)

    async def delete_bucket(self, ctx: S3Request) -> None:
        bucket = ctx.bucket
        if self.gw.buckets.mode == "mapped":
            raise S3Error("AccessDenied", "buckets are the names of s3.buckets (bucket_mode: mapped)")
        root = await self._bucket(bucket)
        try:
            entries = await self.client.list(root)
        except NotFound:
            entries = []
        if entries:
            raise S3Error("BucketNotEmpty", BucketName=bucket)
        await self._writable(root + "/x")
        try:
            await self.client.delete(root)
        except NotFound:
            pass
        except DepotError as exc:
            if not isinstance(exc, NotFound):
                raise
        self.created.discard(bucket)
        ctx.writer.start(204, self._headers(ctx), None)

    # multipart ------------------------------------------------------------------------------------
    async def create_multipart_upload(self, ctx: S3Request) -> None:
        attributes = request_attributes(ctx.http.headers)
        path = await self._object_path(ctx)
        await self._writable(path)
        upload = await self.staging.create(ctx.bucket, ctx.key, path, attributes)
        self._send_xml(
            ctx,
            f'<InitiateMultipartUploadResult xmlns="{NAMESPACE}"><Bucket>{xml_text(ctx.bucket)}'
            f"</Bucket><Key>{xml_text(ctx.key)}</Key><UploadId>{upload.upload_id}</UploadId>"
            "</InitiateMultipartUploadResult>",
        )

    async def _upload(self, ctx: S3Request) -> Upload:
        await self._bucket(ctx.bucket)
        return await self.staging.get(ctx.params.get("uploadId", ""), ctx.bucket, ctx.key)

    async def upload_part(self, ctx: S3Request) -> None:
        text = ctx.params.get("partNumber", "")
        if not text.isdigit() or not 1 <= int(text) <= MAX_PARTS:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and "
                          "10000, inclusive", ArgumentName="partNumber", ArgumentValue=text[:20])
        number = int(text)
        upload = await self._upload(ctx)
        digest = BodyDigest()
        if "x-amz-copy-source" in ctx.http.headers:
            _, src_path, status = await self._source(ctx)
            start, end = 0, status.size
            rng = ctx.http.headers.get("x-amz-copy-source-range")
            if rng is not None:
                parsed = parse_range(rng, status.size) if rng.startswith("bytes=") else None
                if parsed is None or rng.count("-") != 1 or rng.startswith("bytes=-"):
                    raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of "
                                  "the form bytes=first-last where first and last are the "
                                  "zero-based offsets of the first and last bytes to copy",
                                  ArgumentName="x-amz-copy-source-range")
                start, end = parsed
            chunks = self._read_source(src_path, status, start, end, digest)
            part = await self.staging.put_part(upload, number, chunks, lambda: digest.etag_hex)
            self._send_xml(
                ctx,
                f'<CopyPartResult xmlns="{NAMESPACE}"><LastModified>{iso8601(part.mtime)}'
                f"</LastModified><ETag>&quot;{part.md5}&quot;</ETag></CopyPartResult>",
            )
            return
        part = await self.staging.put_part(
            upload, number, self._body(ctx, digest), lambda: digest.etag_hex
        )
        headers = self._headers(ctx)
        headers.append(("ETag", part.etag))
        ctx.writer.start(200, headers, 0)

    async def complete_multipart_upload(self, ctx: S3Request) -> None:
        upload = await self._upload(ctx)
        _check_small_body(ctx)
        root = parse_xml(ctx.http.body, "CompleteMultipartUpload")
        wanted: list[tuple[int, str]] = []
        for element in _children(root, "Part"):
            number_text = (_text(element, "PartNumber") or "").strip()
            etag = _text(element, "ETag")
            if not number_text.isdigit() or etag is None:
                raise S3Error("MalformedXML")
            wanted.append((int(number_text), _strip_etag(etag)))
        if not wanted or len(wanted) > MAX_PARTS:
            raise S3Error("MalformedXML")
        for (a, _), (b, _) in itertools.pairwise(wanted):
            if b <= a:
                raise S3Error("InvalidPartOrder", UploadId=upload.upload_id)
        staged = {part.number: part for part in await self.staging.parts(upload)}
        chosen = []
        for number, etag in wanted:
            part = staged.get(number)
            if part is None or part.md5 != etag:
                raise S3Error("InvalidPart", UploadId=upload.upload_id, PartNumber=str(number),
                              ETag=etag[:64])
            chosen.append(part)
        for part in chosen[:-1]:
            if part.size < MIN_PART_SIZE:
                raise S3Error("EntityTooSmall", ProposedSize=str(part.size),
                              MinSizeAllowed=str(MIN_PART_SIZE), PartNumber=str(part.number),
                              ETag=part.etag)
        source = PartsFile([(self.staging.part_path(upload, p.number), p.size) for p in chosen])
        try:
            await self.client.write(upload.path, source, attributes=upload.attributes)
        finally:
            source.close()
        await self.staging.remove(upload)
        etag = multipart_etag([p.md5 for p in chosen])
        self._send_xml(
            ctx,
            f'<CompleteMultipartUploadResult xmlns="{NAMESPACE}"><Location>'
            f"{xml_text(ctx.http.path)}</Location><Bucket>{xml_text(ctx.bucket)}</Bucket>"
            f"<Key>{xml_text(ctx.key)}</Key><ETag>{xml_text(etag)}</ETag>"
            "</CompleteMultipartUploadResult>",
        )

    async def abort_multipart_upload(self, ctx: S3Request) -> None:
        upload = await self._upload(ctx)
        await self.staging.remove(upload)
        ctx.writer.start(204, self._headers(ctx), None)

    def _owner(self, ctx: S3Request) -> str:
        who = xml_text(ctx.principal or "anonymous")
        return (f"<Initiator><ID>{OWNER_ID}</ID><DisplayName>{who}</DisplayName></Initiator>"
                f"<Owner><ID>{OWNER_ID}</ID><DisplayName>{who}</DisplayName></Owner>")

    @staticmethod
    def _count(ctx: S3Request, name: str, cap: int = 1000) -> int:
        text = ctx.params.get(name)
        if text is None:
            return cap
        if not text.isdigit() or len(text) > 9:
            raise S3Error("InvalidArgument", f"Provided {name} not an integer or within integer "
                          "range", ArgumentName=name, ArgumentValue=text[:40])
        return min(int(text), cap)

    async def list_parts(self, ctx: S3Request) -> None:
        upload = await self._upload(ctx)
        max_parts = self._count(ctx, "max-parts")
        marker_text = ctx.params.get("part-number-marker", "0")
        marker = int(marker_text) if marker_text.isdigit() else 0
        parts = [p for p in await self.staging.parts(upload) if p.number > marker]
        page, truncated = parts[:max_parts], len(parts) > max_parts
        out = [
            f'<ListPartsResult xmlns="{NAMESPACE}"><Bucket>{xml_text(ctx.bucket)}</Bucket>'
            f"<Key>{xml_text(ctx.key)}</Key><UploadId>{upload.upload_id}</UploadId>",
            self._owner(ctx),
            f"<StorageClass>STANDARD</StorageClass><PartNumberMarker>{marker}</PartNumberMarker>",
            f"<NextPartNumberMarker>{page[-1].number if page else marker}</NextPartNumberMarker>",
            f"<MaxParts>{max_parts}</MaxParts><IsTruncated>{str(truncated).lower()}</IsTruncated>",
        ]
        for part in page:
            out.append(
                f"<Part><PartNumber>{part.number}</PartNumber><LastModified>{iso8601(part.mtime)}"
                f"</LastModified><ETag>&quot;{part.md5}&quot;</ETag><Size>{part.size}</Size></Part>"
            )
        out.append("</ListPartsResult>")
        self._send_xml(ctx, "".join(out))

    async def list_multipart_uploads(self, ctx: S3Request) -> None:
        await self._bucket(ctx.bucket)
        params = ctx.params
        prefix = params.get("prefix", "")
        key_marker = params.get("key-marker", "")
        max_uploads = self._count(ctx, "max-uploads")
        uploads = [
            u for u in await self.staging.uploads(ctx.bucket)
            if u.key.startswith(prefix) and u.key.encode() > key_marker.encode()
        ]
        page, truncated = uploads[:max_uploads], len(uploads) > max_uploads
        out = [
            f'<ListMultipartUploadsResult xmlns="{NAMESPACE}"><Bucket>{xml_text(ctx.bucket)}</Bucket>'
            f"<KeyMarker>{xml_text(key_marker)}</KeyMarker><UploadIdMarker></UploadIdMarker>"
            f"<NextKeyMarker>{xml_text(page[-1].key) if truncated else ''}</NextKeyMarker>"
            f"<NextUploadIdMarker>{page[-1].upload_id if truncated else ''}</NextUploadIdMarker>"
            f"<Prefix>{xml_text(prefix)}</Prefix><MaxUploads>{max_uploads}</MaxUploads>"
            f"<IsTruncated>{str(truncated).lower()}</IsTruncated>",
        ]
        for u in page:
            out.append(
                f"<Upload><Key>{xml_text(u.key)}</Key><UploadId>{u.upload_id}</UploadId>"
                f"{self._owner(ctx)}<StorageClass>STANDARD</StorageClass>"
                f"<Initiated>{iso8601(u.initiated)}</Initiated></Upload>"
            )
        out.append("</ListMultipartUploadsResult>")
        self._send_xml(ctx, "".join(out))


def install_writes(gateway: S3Gateway, client: ObjectWriter, staging_dir: Path) -> S3Writes:
    writes = S3Writes(gateway, client, staging_dir)
    writes.install()
    return writes


__all__ = ["ObjectWriter", "S3Writes", "install_writes", "multipart_etag", "parse_xml"]


async def _small_or_stream(chunks: AsyncIterator[bytes]) -> bytes | AsyncIterator[bytes]:
    """A small body as bytes (its size known: written in one request, no spool); a larger one as
    a stream of its bytes."""
    head: list[bytes] = []
    size = 0
    while size < SMALL_BODY:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return b"".join(head)
        head.append(chunk)
        size += len(chunk)

    async def stream() -> AsyncIterator[bytes]:
        for chunk in head:
            yield chunk
        async for chunk in chunks:
            yield chunk

    return stream()
