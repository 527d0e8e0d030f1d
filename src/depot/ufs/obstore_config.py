"""Mount options of the obstore backends: friendly names mapped to obstore settings.

Options arrive as ``dict[str, str]`` (``MountConfig.options``). Each backend accepts the names
below (aliases in parentheses); an unknown name is a ``ConfigError`` that names it, so a typo
never silently falls back to a default or to ambient credentials.

Every HTTP backend (s3, gs, az):
    allow_http (bool; implied by an ``http://`` endpoint), allow_invalid_certificates (bool),
    connect_timeout, read_timeout, request_timeout (durations: ``5s``, ``2m``),
    proxy_url, user_agent, root_certificate (path of a PEM file to trust).

``s3://BUCKET[/PREFIX]`` (also ``s3a://``), for AWS, MinIO, Ceph RGW, OCI, moto:
    endpoint (endpoint_url, aws_endpoint), region (aws_region),
    access_key_id (aws_access_key_id), secret_access_key (aws_secret_access_key),
    session_token (aws_session_token, token), path_style (bool), virtual_hosted_style (bool),
    skip_signature (anonymous; bool), request_payer (bool), unsigned_payload (bool),
    checksum_algorithm, server_side_encryption, sse_kms_key_id, role_arn, role_session_name,
    web_identity_token_file, conditional_put, copy_if_not_exists.

``gs://BUCKET[/PREFIX]`` (also ``gcs://``):
    service_account (service_account_path: path of a service-account JSON file),
    service_account_key (the JSON itself), application_credentials (path),
    endpoint (base_url), bearer_token (token), skip_signature (anonymous; bool).

``az://CONTAINER[/PREFIX]``, ``azure://``, ``adl://``, ``abfs[s]://CONTAINER[@ACCOUNT.dfs...]/PREFIX``:
    account_name (account), account_key (access_key), sas_token (sas_key, sas),
    bearer_token (token), client_id, client_secret, tenant_id, endpoint,
    use_emulator (bool; the well-known Azurite account on 127.0.0.1:10000 unless endpoint and
    account are given), use_azure_cli (bool), use_fabric_endpoint (bool),
    skip_signature (anonymous; bool).

``file:///ABSOLUTE/DIR`` (local disks, NFS and other mounted file systems):
    mkdir (bool: create the directory if missing; otherwise a missing directory is an error).

Credentials not given as options come from the usual environment variables and instance
metadata of each cloud (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from obstore.store import AzureStore, GCSStore, LocalStore, S3Store

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError
from depot.core.types import parse_duration
from depot.ufs.errors import short_message
from depot.ufs.obstore_store import ObstoreUnderStore

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig

S3_MIN_PART = 5 * 1024 * 1024
GCS_MIN_PART = 5 * 1024 * 1024
AZURE_MIN_PART = 1
# A whole request (body included) may take this long; stalls are caught by read_timeout.
DEFAULT_REQUEST_TIMEOUT = timedelta(hours=1)
MAX_CONNECT_TIMEOUT = 10.0


def parse_bool(name: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"option {name!r} must be true or false, not {value!r}")


def _duration(name: str, value: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(value))
    except ValueError as exc:
        raise ConfigError(f"option {name!r}: {exc}") from None


def _text(name: str, value: str) -> str:
    if not value:
        raise ConfigError(f"option {name!r} must not be empty")
    return value


def _pem_file(name: str, value: str) -> str:
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ConfigError(f"option {name!r}: cannot read {value} ({exc.strerror})") from None


@dataclass(frozen=True, slots=True)
class Opt:
    """Where a friendly option goes: ``config`` (store settings) or ``client`` (HTTP client)."""

    target: str
    key: str
    convert: Callable[[str, str], Any] = _text
    invert: bool = False


def _aliases(opt: Opt, *names: str) -> dict[str, Opt]:
    return dict.fromkeys(names, opt)


CLIENT_OPTIONS: dict[str, Opt] = {
    "allow_http": Opt("client", "allow_http", parse_bool),
    "allow_invalid_certificates": Opt("client", "allow_invalid_certificates", parse_bool),
    "connect_timeout": Opt("client", "connect_timeout", _duration),
    "read_timeout": Opt("client", "read_timeout", _duration),
    "request_timeout": Opt("client", "timeout", _duration),
    "proxy_url": Opt("client", "proxy_url"),
    "user_agent": Opt("client", "user_agent"),
    "root_certificate": Opt("client", "root_certificate", _pem_file),
}

S3_OPTIONS: dict[str, Opt] = {
    **CLIENT_OPTIONS,
    **_aliases(Opt("config", "endpoint"), "endpoint", "endpoint_url", "aws_endpoint"),
    **_aliases(Opt("config", "region"), "region", "aws_region"),
    **_aliases(Opt("config", "access_key_id"), "access_key_id", "aws_access_key_id"),
    **_aliases(Opt("config", "secret_access_key"), "secret_access_key", "aws_secret_access_key"),
    **_aliases(Opt("config", "session_token"), "session_token", "aws_session_token", "token"),
    "path_style": Opt("config", "virtual_hosted_style_request", parse_bool, invert=True),
    "virtual_hosted_style": Opt("config", "virtual_hosted_style_request", parse_bool),
    **_aliases(Opt("config", "skip_signature", parse_bool), "skip_signature", "anonymous"),
    "request_payer": Opt("config", "request_payer", parse_bool),
    "unsigned_payload": Opt("config", "unsigned_payload", parse_bool),
    "checksum_algorithm": Opt("config", "checksum_algorithm"),
    "server_side_encryption": Opt("config", "server_side_encryption"),
    "sse_kms_key_id": Opt("config", "sse_kms_key_id"),
    "role_arn": Opt("config", "role_arn"),
    "role_session_name": Opt("config", "role_session_name"),
    "web_identity_token_file": Opt("config", "web_identity_token_file"),
    "conditional_put": Opt("config", "conditional_put"),
    "copy_if_not_exists": Opt("config", "copy_if_not_exists"),
}

GCS_OPTIONS: dict[str, Opt] = {
    **CLIENT_OPTIONS,
    **_aliases(
        Opt("config", "service_account"),
        "service_account",
        "service_account_path",
        "google_service_account",
    ),
    **_aliases(
        Opt("config", "service_account_key"), "service_account_key", "google_service_account_key"
    ),
    "application_credentials": Opt("config", "application_credentials"),
    **_aliases(Opt("config", "base_url"), "endpoint", "base_url"),
    **_aliases(Opt("config", "bearer_token"), "bearer_token", "token"),
    **_aliases(Opt("config", "skip_signature", parse_bool), "skip_signature", "anonymous"),
}

AZURE_OPTIONS: dict[str, Opt] = {
    **CLIENT_OPTIONS,
    **_aliases(Opt("config", "account_name"), "account_name", "account"),
    **_aliases(Opt("config", "account_key"), "account_key", "access_key"),
    **_aliases(Opt("config", "sas_key"), "sas_token", "sas_key", "sas"),
    **_aliases(Opt("config", "token"), "bearer_token", "token"),
    "client_id": Opt("config", "client_id"),
    "client_secret": Opt("config", "client_secret"),
    "tenant_id": Opt("config", "tenant_id"),
    "endpoint": Opt("config", "endpoint"),
    "use_emulator": Opt("config", "use_emulator", parse_bool),
    "use_azure_cli": Opt("config", "use_azure_cli", parse_bool),
    "use_fabric_endpoint": Opt("config", "use_fabric_endpoint", parse_bool),
    **_aliases(Opt("config", "skip_signature", parse_bool), "skip_signature", "anonymous"),
}

LOCAL_OPTIONS = ("mkdir",)


@dataclass(slots=True)
class StoreSettings:
    """Options sorted into obstore's store config and HTTP client config."""

    config: dict[str, Any]
    client: dict[str, Any]


def map_options(
    scheme: str, options: Mapping[str, str], table: Mapping[str, Opt], ufs_config: UfsConfig
) -> StoreSettings:
    """Translate mount options through ``table``; unknown or repeated settings are errors."""
    settings = StoreSettings(config={}, client={})
    given: dict[tuple[str, str], str] = {}
    for name, value in options.items():
        opt = table.get(name.lower())
        if opt is None:
            known = ", ".join(sorted(table))
            raise ConfigError(f"unknown option {name!r} for {scheme}:// (known: {known})")
        where = (opt.target, opt.key)
        if where in given:
            raise ConfigError(f"options {given[where]!r} and {name!r} set the same thing")
        given[where] = name
        converted = opt.convert(name, str(value))
        if opt.invert:
            converted = not converted
        target = settings.config if opt.target == "config" else settings.client
        target[opt.key] = converted
    endpoint = settings.config.get("endpoint") or settings.config.get("base_url")
    if isinstance(endpoint, str):
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint must be an http:// or https:// URL, not {endpoint!r}")
        if endpoint.startswith("http://"):
            settings.client.setdefault("allow_http", True)
    settings.client.setdefault(
        "connect_timeout", timedelta(seconds=min(ufs_config.timeout, MAX_CONNECT_TIMEOUT))
    )
    settings.client.setdefault("read_timeout", timedelta(seconds=ufs_config.timeout))
    settings.client.setdefault("timeout", DEFAULT_REQUEST_TIMEOUT)
    return settings


def _retry(max_retries: int, ufs_config: UfsConfig) -> RetryConfig:
    return {
        "max_retries": max_retries,
        "backoff": {
            "init_backoff": timedelta(seconds=max(ufs_config.backoff_base, 0.001)),
            "max_backoff": timedelta(seconds=max(ufs_config.backoff_max, 0.001)),
            "base": 2,
        },
        "retry_timeout": timedelta(seconds=max(ufs_config.timeout, 1.0) * 3),
    }


def _build(
    factory: Callable[[RetryConfig], ObjectStore], ufs_config: UfsConfig, what: str
) -> tuple[ObjectStore, ObjectStore]:
    """The store for ordinary calls (no internal retries: ``RetryingUnderStore`` owns them)
    and one for multipart uploads, whose parts obstore retries itself since a stream cannot
    be replayed from the top."""
    try:
        return factory(_retry(0, ufs_config)), factory(_retry(ufs_config.retries, ufs_config))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot configure {what}: {short_message(exc)}") from None


def build_s3(
    uri: str, bucket: str, prefix: str, options: Mapping[str, str], ufs_config: UfsConfig
) -> ObstoreUnderStore:
    s = map_options("s3", options, S3_OPTIONS, ufs_config)
    client: ClientConfig = s.client  # type: ignore[assignment]

    def factory(retry: RetryConfig) -> ObjectStore:
        return S3Store(
            bucket,
            prefix=prefix or None,
            config=s.config,  # type: ignore[arg-type]
            client_options=client,
            retry_config=retry,
        )

    store, upload = _build(factory, ufs_config, f"s3 bucket {bucket!r}")
    return ObstoreUnderStore(store, uri, upload_store=upload, min_part_size=S3_MIN_PART)


def build_gcs(
    uri: str, bucket: str, prefix: str, options: Mapping[str, str], ufs_config: UfsConfig
) -> ObstoreUnderStore:
    s = map_options("gs", options, GCS_OPTIONS, ufs_config)
    client: ClientConfig = s.client  # type: ignore[assignment]

    def factory(retry: RetryConfig) -> ObjectStore:
        return GCSStore(
            bucket,
            prefix=prefix or None,
            config=s.config,  # type: ignore[arg-type]
            client_options=client,
            retry_config=retry,
        )

    store, upload = _build(factory, ufs_config, f"gcs bucket {bucket!r}")
    return ObstoreUnderStore(store, uri, upload_store=upload, min_part_size=GCS_MIN_PART)


def build_azure(
    uri: str,
    container: str,
    prefix: str,
    options: Mapping[str, str],
    ufs_config: UfsConfig,
    *,
    account: str | None = None,
) -> ObstoreUnderStore:
    s = map_options("az", options, AZURE_OPTIONS, ufs_config)
    if account and "account_name" not in s.config:
        s.config["account_name"] = account
    client: ClientConfig = s.client  # type: ignore[assignment]

    def factory(retry: RetryConfig) -> ObjectStore:
        return AzureStore(
            container,
            prefix=prefix or None,
            config=s.config,  # type: ignore[arg-type]
            client_options=client,
            retry_config=retry,
        )

    store, upload = _build(factory, ufs_config, f"azure container {container!r}")
    return ObstoreUnderStore(
        store, uri, upload_store=upload, min_part_size=AZURE_MIN_PART, identifier_metadata=True
    )


def build_local(uri: str, path: str, options: Mapping[str, str]) -> ObstoreUnderStore:
    unknown = [name for name in options if name.lower() not in LOCAL_OPTIONS]
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} for file:// (known: {', '.join(LOCAL_OPTIONS)})"
        )
    mkdir = parse_bool("mkdir", options.get("mkdir", "false"))
    if mkdir:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create directory ({exc.strerror})", path) from None
    elif not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "directory does not exist"
        raise ConfigError(f"{what} (set option mkdir=true to create it)", path)
    try:
        store = LocalStore(path, automatic_cleanup=True)
    except Exception as exc:
        raise ConfigError(f"cannot open local directory: {short_message(exc)}", path) from None
    # A directory walk is not in key order; the local store lists whole and sorts.
    return ObstoreUnderStore(store, uri, ordered_listing=False, supports_attributes=False)
