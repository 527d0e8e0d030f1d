"""Start the S3 gateway: in a worker (``worker.s3_port``) or standalone (``depot s3``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from depot.core.config import DepotConfig, S3Config
from depot.core.errors import ConfigError
from depot.s3.errors import protocol_error
from depot.s3.gateway import ObjectReader, S3Gateway
from depot.worker.http import HttpServer

log = logging.getLogger(__name__)

ACCESS_KEY_ENV = "DEPOT_S3_ACCESS_KEY"
SECRET_KEY_ENV = "DEPOT_S3_SECRET_KEY"
DEFAULT_S3_PORT = 7071
# Buffered bodies: the XML of DeleteObjects (1000 keys) and CompleteMultipartUpload (10,000
# parts). PUT bodies (objects, parts) stream instead, up to S3's 5 GiB (plus aws-chunked framing).
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PUT_BYTES = 5 * 1024**3 + 64 * 1024**2


def _streamed(method: str, path: str) -> bool:
    return method == "PUT"


def staging_dir(config: DepotConfig) -> Path:
    """Where multipart parts are staged: ``s3.staging_dir``, else under the first cache dir."""
    if config.s3.staging_dir is not None:
        return config.s3.staging_dir
    return config.cache.dirs[0].path / "s3-staging"


def gateway_credentials(
    settings: S3Config, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Access key -> secret key, from ``DEPOT_S3_ACCESS_KEY``/``..._SECRET_KEY`` or the config."""
    env = os.environ if environ is None else environ
    access = env.get(ACCESS_KEY_ENV) or settings.access_key
    secret = env.get(SECRET_KEY_ENV) or settings.secret_key
    if bool(access) != bool(secret):
        raise ConfigError(
            f"S3 gateway: give both the access key and the secret key ({ACCESS_KEY_ENV} and "
            f"{SECRET_KEY_ENV}, or s3.access_key and s3.secret_key), or neither"
        )
    return {access: secret} if access and secret else {}


def build_gateway(
    config: DepotConfig, client: ObjectReader, environ: Mapping[str, str] | None = None
) -> S3Gateway:
    """The gateway app for ``config``; ``ConfigError`` when it would let nobody in."""
    credentials = gateway_credentials(config.s3, environ)
    if not credentials and not config.s3.anonymous:
        raise ConfigError(
            f"S3 gateway: no credentials ({ACCESS_KEY_ENV} / {SECRET_KEY_ENV} or s3.access_key /"
            " s3.secret_key) and anonymous access is off (s3.anonymous: true)"
        )
    if config.s3.anonymous:
        log.warning("S3 gateway: anonymous access is enabled")
    gateway = S3Gateway(client, config.s3, credentials=credentials)
    from depot.s3.writes import ObjectWriter, install_writes

    if isinstance(client, ObjectWriter):
        install_writes(gateway, client, staging_dir(config))
    return gateway


def advertised_endpoint(worker_endpoint: str, port: int) -> str:
    """The URL of a worker's gateway as the cluster sees it: the host the worker advertises
    (``cluster.advertise``, else its own URL) and the gateway's port (plain http)."""
    host = urlsplit(worker_endpoint).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass(slots=True)
class GatewayServer:
    """A running gateway: its HTTP server, app and port."""

    server: HttpServer
    gateway: S3Gateway
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.server.stop()


async def start_gateway(
    config: DepotConfig,
    client: ObjectReader,
    host: str,
    port: int,
    *,
    environ: Mapping[str, str] | None = None,
) -> GatewayServer:
    """Serve S3 on ``host:port`` (0: any free port) over ``client``; stop it with ``.stop()``.

    The worker daemon calls this with a client of its own endpoint when ``worker.s3_port`` is
    set; ``depot s3`` calls it with a client of any worker. The client is not closed on stop.
    """
    gateway = build_gateway(config, client, environ)
    server = HttpServer(
        gateway,
        max_body_bytes=MAX_BODY_BYTES,
        protocol_error=protocol_error,
        streaming=_streamed,
        max_stream_bytes=MAX_PUT_BYTES,
        chunked_streams=True,
    )
    bound = await server.start(host, port)
    log.info("S3 gateway listening on %s:%d (reads through %s)", host, bound, client.endpoint)
    running = GatewayServer(server, gateway, host, bound)
    gateway.advertise(running.endpoint)
    return running
