"""Open an under store from its URI: pick the backend by scheme and wrap it in retries.

=====================================================  =========================================
URI                                                    backend
=====================================================  =========================================
``s3://BUCKET[/PREFIX]``, ``s3a://``                   obstore S3 (AWS, MinIO, Ceph, OCI, moto)
``gs://BUCKET[/PREFIX]``, ``gcs://``                   obstore GCS
``az://CONTAINER[/PREFIX]``, ``azure://``, ``adl://``  obstore Azure Blob
``abfs[s]://CONTAINER[@ACCOUNT.dfs.core.windows.net]/PREFIX``  obstore Azure Blob
``file:///ABSOLUTE/DIR``                               obstore local directory (disks, NFS)
``memory://NAME[/PREFIX]``                             in-process store for tests
``fsspec+PROTOCOL://...``, ``hdfs://...``              any fsspec file system
=====================================================  =========================================

Options per backend are listed in ``depot.ufs.obstore_config`` and ``depot.ufs.fsspec_store``.
Percent-escapes in the path are decoded (``file:///data/my%20set``); a query string or fragment
is refused, since no backend would honour it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError, InvalidPath
from depot.ufs.base import UnderStore
from depot.ufs.fsspec_store import build_fsspec
from depot.ufs.keys import check_prefix
from depot.ufs.memory import MemoryUnderStore, memory_bucket
from depot.ufs.obstore_config import build_azure, build_gcs, build_local, build_s3
from depot.ufs.retry import RetryingUnderStore

S3_SCHEMES = ("s3", "s3a")
GCS_SCHEMES = ("gs", "gcs")
AZURE_SCHEMES = ("az", "azure", "adl", "abfs", "abfss")
FSSPEC_PREFIX = "fsspec+"
FSSPEC_SCHEMES = ("hdfs",)
SUPPORTED = (
    *S3_SCHEMES,
    *GCS_SCHEMES,
    *AZURE_SCHEMES,
    "file",
    "memory",
    *FSSPEC_SCHEMES,
    "fsspec+<protocol>",
)


@dataclass(frozen=True, slots=True)
class UfsUri:
    """A validated under-store URI: ``bucket`` is the bucket, container, memory store name or
    (for ``file``) empty; ``prefix`` the root inside it, without slashes at its ends; ``path``
    the absolute directory of a ``file`` URI; ``account`` an Azure account named in the host."""

    uri: str
    scheme: str
    bucket: str = ""
    prefix: str = ""
    path: str = ""
    account: str | None = None


def parse_ufs_uri(uri: str) -> UfsUri:
    """Validate ``uri`` without opening anything; ``ConfigError`` says what is wrong."""
    text = uri.strip()
    if text[:5].lower() == "file:" and "://" not in text:
        parts = urlsplit(text)  # file:/abs/dir (RFC 8089) or a relative path
        return _parse_file(text, parts.netloc, parts.path)
    if "://" not in text:
        raise ConfigError(
            "not an under-store URI (expected e.g. s3://bucket/prefix or file:///abs/dir)", uri
        )
    scheme = text.split("://", 1)[0].lower()
    if scheme.startswith(FSSPEC_PREFIX) or scheme in FSSPEC_SCHEMES:
        return UfsUri(text, scheme)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ConfigError("under-store URIs take no query string or fragment", uri)
    if scheme == "file":
        return _parse_file(text, parts.netloc, parts.path)
    if scheme not in (*S3_SCHEMES, *GCS_SCHEMES, *AZURE_SCHEMES, "memory"):
        raise ConfigError(
            f"unknown under-store scheme {scheme!r} (supported: {', '.join(SUPPORTED)})", uri
        )
    bucket, account = parts.netloc, None
    if scheme in ("abfs", "abfss") and "@" in bucket:
        bucket, host = bucket.split("@", 1)
        account = host.split(".", 1)[0] or None
    what = {"memory": "store name"}.get(
        scheme, "container" if scheme in AZURE_SCHEMES else "bucket"
    )
    if not bucket:
        raise ConfigError(f"missing {what} in {scheme}:// URI", uri)
    if any(ch in bucket for ch in "@:/\\ ") or any(ord(ch) < 0x20 for ch in bucket):
        raise ConfigError(f"invalid {what} name {bucket!r}", uri)
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            check_prefix(prefix + "/")
        except InvalidPath as exc:
            raise ConfigError(f"invalid prefix {prefix!r}: {exc.message}", uri) from None
    return UfsUri(text, scheme, bucket=bucket, prefix=prefix, account=account)


def _parse_file(uri: str, netloc: str, raw_path: str) -> UfsUri:
    if netloc not in ("", "localhost"):
        raise ConfigError(f"file:// URIs name a local path, not host {netloc!r}", uri)
    path = unquote(raw_path)
    if not path.startswith("/"):
        raise ConfigError("file:// URI must hold an absolute path (file:///abs/dir)", uri)
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ConfigError("file:// path must not contain '.' or '..' segments", uri)
    return UfsUri(uri, "file", path=path.rstrip("/") or "/")


def open_under_store(
    uri: str,
    options: Mapping[str, str] | None = None,
    ufs_config: UfsConfig | None = None,
) -> UnderStore:
    """The store behind ``uri``, configured by mount ``options``, retried per ``ufs_config``."""
    config = ufs_config if ufs_config is not None else UfsConfig()
    inner = open_backend(uri, options or {}, config)
    return RetryingUnderStore.from_config(inner, config)


def open_backend(uri: str, options: Mapping[str, str], ufs_config: UfsConfig) -> UnderStore:
    """The bare backend for ``uri``, without the retry wrapper."""
    parsed = parse_ufs_uri(uri)
    scheme = parsed.scheme
    if scheme.startswith(FSSPEC_PREFIX):
        return build_fsspec(parsed.uri, parsed.uri[len(FSSPEC_PREFIX) :], options, ufs_config)
    if scheme in FSSPEC_SCHEMES:
        return build_fsspec(parsed.uri, parsed.uri, options, ufs_config)
    if scheme == "file":
        return build_local(parsed.uri, parsed.path, options)
    if scheme == "memory":
        return MemoryUnderStore(
            memory_bucket(parsed.bucket, options), prefix=parsed.prefix, uri=parsed.uri
        )
    if scheme in S3_SCHEMES:
        return build_s3(parsed.uri, parsed.bucket, parsed.prefix, options, ufs_config)
    if scheme in GCS_SCHEMES:
        return build_gcs(parsed.uri, parsed.bucket, parsed.prefix, options, ufs_config)
    return build_azure(
        parsed.uri, parsed.bucket, parsed.prefix, options, ufs_config, account=parsed.account
    )
