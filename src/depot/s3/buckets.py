"""Buckets and keys onto depot paths.

Two modes (``s3.bucket_mode``):

- ``top-level`` (default): every top-level directory of the namespace is a bucket, so
  ``s3://models/llama/config.json`` is the depot path ``/models/llama/config.json``. Files at
  the root of the namespace belong to no bucket.
- ``mapped``: only the buckets named in ``s3.buckets`` exist, each over a namespace path
  (``{"data": "/", "ckpt": "/checkpoints/run1"}``).

A key is the path below its bucket. Keys that are not canonical depot paths are refused here,
before any lookup: ``..`` and its disguises (percent-encoded, Unicode lookalikes) and control
characters are ``InvalidArgument`` (they could name something outside the bucket); keys that are
merely spelled differently from a canonical path (``a//b``, ``./a``, ``a/``) name no object of the
namespace, so they are ``NoSuchKey`` rather than an alias of another key.
"""

from __future__ import annotations

from collections.abc import Mapping

from depot.core.errors import InvalidPath
from depot.namespace.paths import normalize_path
from depot.s3.errors import S3Error

MAX_KEY_BYTES = 1024
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_bucket_name(name: str) -> bool:
    """Path-style bucket names depot can serve: 1-255 of ``A-Za-z0-9._-``, not ``.``/``..``."""
    return (
        0 < len(name) <= 255
        and set(name) <= _BUCKET_CHARS
        and name not in (".", "..")
        and name[0] not in "._-"
    )


class BucketMap:
    """Where each bucket lives in the namespace."""

    def __init__(self, mode: str = "top-level", buckets: Mapping[str, str] | None = None) -> None:
        if mode not in ("top-level", "mapped"):
            raise ValueError(f"unknown bucket mode {mode!r}")
        self.mode = mode
        self.mapped: dict[str, str] = {
            name: normalize_path(path) for name, path in (buckets or {}).items()
        }

    def root(self, bucket: str) -> str:
        """The namespace path of ``bucket`` (whether it exists is the caller's question)."""
        if not valid_bucket_name(bucket):
            raise S3Error("InvalidBucketName", BucketName=bucket[:300])
        if self.mode == "mapped":
            path = self.mapped.get(bucket)
            if path is None:
                raise S3Error("NoSuchBucket", BucketName=bucket)
            return path
        return "/" + bucket

    def object_path(self, bucket: str, key: str) -> str:
        """The depot path of ``key`` in ``bucket``."""
        root = self.root(bucket)
        return join_key(root, key, bucket)

    def key_of(self, root: str, path: str) -> str:
        """The key of depot ``path`` below bucket ``root``."""
        return path[1:] if root == "/" else path[len(root) + 1 :]


def check_key(key: str, bucket: str) -> str:
    """The canonical depot form (``/a/b``) of ``key``, or the S3 error for it."""
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", BucketName=bucket, Size=str(len(key.encode("utf-8", "surrogatepass"))), MaxSizeAllowed=str(MAX_KEY_BYTES))
    try:
        canonical = normalize_path(key)
    except InvalidPath as exc:
        raise S3Error(
            "InvalidArgument",
            f"The key is not allowed: {exc.message}",
            ArgumentName="key",
            BucketName=bucket,
        ) from None
    if canonical[1:] != key:
        raise S3Error("NoSuchKey", Key=key, BucketName=bucket)
    return canonical


def join_key(root: str, key: str, bucket: str) -> str:
    canonical = check_key(key, bucket)
    return canonical if root == "/" else root + canonical
