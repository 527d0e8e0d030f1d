"""URI validation, backend choice and the mapping of mount options to obstore settings."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

from depot.core.config import MountConfig, UfsConfig
from depot.core.errors import ConfigError
from depot.ufs import (
    MemoryUnderStore,
    RetryingUnderStore,
    open_backend,
    open_under_store,
    parse_ufs_uri,
)
from depot.ufs.fsspec_store import FsspecUnderStore
from depot.ufs.obstore_config import S3_OPTIONS, map_options
from depot.ufs.obstore_store import ObstoreUnderStore

S3_CREDS = {"access_key_id": "AK", "secret_access_key": "SK", "region": "eu-west-1"}


# --- URIs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "prefix"),
    [
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/", "s3", "bucket", ""),
        ("s3://bucket/models/llama/", "s3", "bucket", "models/llama"),
        ("S3A://bucket/a", "s3a", "bucket", "a"),
        ("gs://b/data%20set", "gs", "b", "data set"),
        ("gcs://b", "gcs", "b", ""),
        ("az://container/p/q", "az", "container", "p/q"),
        ("abfss://fs@acct.dfs.core.windows.net/dir", "abfss", "fs", "dir"),
        ("memory://name/root", "memory", "name", "root"),
    ],
)
def test_parse_bucket_uris(uri: str, scheme: str, bucket: str, prefix: str) -> None:
    parsed = parse_ufs_uri(uri)
    assert (parsed.scheme, parsed.bucket, parsed.prefix) == (scheme, bucket, prefix)


def test_parse_abfs_account() -> None:
    assert parse_ufs_uri("abfs://fs@acct.dfs.core.windows.net/d").account == "acct"
    assert parse_ufs_uri("az://c/d").account is None


def test_parse_file_uris() -> None:
    assert parse_ufs_uri("file:///srv/data/").path == "/srv/data"
    assert parse_ufs_uri("file://localhost/srv/my%20data").path == "/srv/my data"
    assert parse_ufs_uri("file:///").path == "/"
    assert parse_ufs_uri("file:/srv/data").path == "/srv/data"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("bucket/path", "not an under-store URI"),
        ("ftp://host/x", "unknown under-store scheme 'ftp'"),
        ("s3://", "missing bucket"),
        ("s3:///prefix", "missing bucket"),
        ("gs://", "missing bucket"),
        ("az:///x", "missing container"),
        ("memory://", "missing store name"),
        ("s3://user@bucket/x", "invalid bucket name"),
        ("s3://bucket:9000/x", "invalid bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://bucket/x?versionId=1", "no query string"),
        ("file:relative/dir", "absolute path"),
        ("file://relative/dir", "not host 'relative'"),
        ("file:///srv/../etc", "'..'"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_ufs_uri(uri)


def test_unknown_scheme_lists_supported() -> None:
    with pytest.raises(ConfigError) as info:
        open_under_store("webdav://x/y", {}, UfsConfig())
    for scheme in ("s3", "gs", "az", "file", "memory", "fsspec+<protocol>"):
        assert scheme in str(info.value)


# --- backend choice --------------------------------------------------------------------------


def test_backends_by_scheme(tmp_path: Path) -> None:
    config = UfsConfig()
    assert isinstance(open_backend("s3://b/p", S3_CREDS, config).store, S3Store)  # type: ignore[attr-defined]
    assert isinstance(open_backend("gs://b", {"skip_signature": "true"}, config).store, GCSStore)  # type: ignore[attr-defined]
    az = open_backend("az://c", {"account_name": "a", "account_key": "a2V5"}, config)
    assert isinstance(az, ObstoreUnderStore) and isinstance(az.store, AzureStore)
    local = open_backend(tmp_path.as_uri(), {}, config)
    assert isinstance(local, ObstoreUnderStore) and isinstance(local.store, LocalStore)
    assert not local.ordered_listing
    assert isinstance(open_backend("memory://m", {}, config), MemoryUnderStore)
    assert isinstance(open_backend("fsspec+memory://x/y", {}, config), FsspecUnderStore)


def test_open_wraps_in_retries() -> None:
    config = UfsConfig.model_validate({"retries": 3, "backoff_base": "10ms", "backoff_max": "1s"})
    store = open_under_store("s3://bucket/prefix", S3_CREDS, config)
    assert isinstance(store, RetryingUnderStore)
    assert (store.retries, store.backoff_base, store.backoff_max) == (3, 0.01, 1.0)
    assert store.uri == "s3://bucket/prefix"
    inner = store.inner
    assert isinstance(inner, ObstoreUnderStore) and inner.min_part_size == 5 * 1024 * 1024


def test_mount_config_options_are_accepted() -> None:
    mount = MountConfig.model_validate(
        {
            "path": "/data",
            "ufs": "s3://bucket/data",
            "options": {"endpoint": "http://m:9000", "path_style": True},
        }
    )
    assert mount.options["path_style"] == "true"
    store = open_under_store(mount.ufs, mount.options, UfsConfig())
    assert isinstance(store, RetryingUnderStore)


# --- S3 options ------------------------------------------------------------------------------


def test_s3_options_reach_the_store() -> None:
    options = {
        **S3_CREDS,
        "endpoint": "http://127.0.0.1:9000",
        "path_style": "true",
        "session_token": "TOKEN",
        "request_timeout": "2m",
    }
    store = open_backend("s3://bkt/pre/fix", options, UfsConfig())
    assert isinstance(store, ObstoreUnderStore) and isinstance(store.store, S3Store)
    config = store.store.config
    assert config["endpoint"] == "http://127.0.0.1:9000"
    assert str(config["virtual_hosted_style_request"]).lower() == "false"
    assert config["access_key_id"] == "AK" and config["session_token"] == "TOKEN"
    assert config["region"] == "eu-west-1" and config["bucket"] == "bkt"
    assert store.store.prefix == "pre/fix"
    client = store.store.client_options or {}
    assert str(client["allow_http"]).lower() == "true"  # implied by an http:// endpoint
    assert client["timeout"] in ("2m", "120s", timedelta(minutes=2))


def test_s3_aliases_and_booleans() -> None:
    config = UfsConfig(timeout=30)
    s = map_options(
        "s3",
        {"aws_endpoint": "https://s3.example", "anonymous": "yes", "virtual_hosted_style": "1"},
        S3_OPTIONS,
        config,
    )
    assert s.config == {
        "endpoint": "https://s3.example",
        "skip_signature": True,
        "virtual_hosted_style_request": True,
    }
    assert "allow_http" not in s.client
    assert s.client["read_timeout"] == timedelta(seconds=30)
    assert s.client["connect_timeout"] == timedelta(seconds=10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpiont": "http://x"}, "unknown option 'endpiont' for s3://"),
        ({"path_style": "maybe"}, "'path_style' must be true or false"),
        ({"endpoint": "s3.example.com"}, "http:// or https://"),
        ({"endpoint": "http://a", "endpoint_url": "http://b"}, "set the same thing"),
        ({"path_style": "true", "virtual_hosted_style": "true"}, "set the same thing"),
        ({"connect_timeout": "soon"}, "'connect_timeout'"),
        ({"root_certificate": "/no/such/ca.pem"}, "'root_certificate': cannot read"),
        ({"access_key_id": ""}, "must not be empty"),
    ],
)
def test_bad_s3_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_under_store("s3://bucket", options, UfsConfig())


def test_root_certificate_is_read(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    s = map_options("s3", {"root_certificate": str(pem)}, S3_OPTIONS, UfsConfig())
    assert s.client["root_certificate"].startswith("-----BEGIN CERTIFICATE-----")


# --- GCS options (configuration only: no emulator) ---------------------------------------------


def test_gcs_options_reach_the_store() -> None:
    store = open_backend(
        "gs://bucket/some/prefix",
        {"endpoint": "http://127.0.0.1:4443", "anonymous": "true"},
        UfsConfig(),
    )
    assert isinstance(store, ObstoreUnderStore) and isinstance(store.store, GCSStore)
    assert store.store.config["base_url"] == "http://127.0.0.1:4443"
    assert str(store.store.config["skip_signature"]).lower() == "true"
    assert store.store.prefix == "some/prefix"
    assert str((store.store.client_options or {})["allow_http"]).lower() == "true"


def test_gcs_service_account_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="service account file"):
        open_under_store("gs://b", {"service_account": str(tmp_path / "none.json")}, UfsConfig())
    with pytest.raises(ConfigError, match="private_key"):
        open_under_store("gs://b", {"service_account_key": json.dumps({"x": 1})}, UfsConfig())
    with pytest.raises(ConfigError, match="unknown option 'region' for gs://"):
        open_under_store("gs://b", {"region": "us"}, UfsConfig())


# --- Azure options ---------------------------------------------------------------------------


def test_azure_account_from_abfs_host_and_options() -> None:
    store = open_backend(
        "abfss://fs@acct.dfs.core.windows.net/x", {"sas_token": "sv=1&sig=2"}, UfsConfig()
    )
    assert isinstance(store, ObstoreUnderStore) and isinstance(store.store, AzureStore)
    assert store.store.config["account_name"] == "acct"
    assert store.store.config["sas_key"] == "sv=1&sig=2"
    assert store.store.config["container_name"] == "fs"
    explicit = open_backend(
        "abfs://fs@acct.dfs.core.windows.net/x",
        {"account": "other", "account_key": "a2V5"},
        UfsConfig(),
    )
    assert isinstance(explicit, ObstoreUnderStore) and isinstance(explicit.store, AzureStore)
    assert explicit.store.config["account_name"] == "other"


def test_azure_without_account_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT", "AZURE_ACCOUNT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"(?i)account"):
        open_under_store("az://container", {}, UfsConfig())
    emulator = open_backend("az://container", {"use_emulator": "true"}, UfsConfig())
    assert isinstance(emulator, ObstoreUnderStore)


def test_unknown_azure_option_names_the_key() -> None:
    with pytest.raises(ConfigError, match="'acount_name'"):
        open_under_store("az://c", {"acount_name": "x"}, UfsConfig())
