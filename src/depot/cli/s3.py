"""``depot s3``: the S3 gateway as a process of its own, in front of any worker.

``depot s3 [--port N] [--host ADDR] [--endpoint URL] [--config FILE]``. Credentials come from
``DEPOT_S3_ACCESS_KEY`` / ``DEPOT_S3_SECRET_KEY`` or the ``s3:`` section of the config file
(docs/s3.md). ``register(cli)`` adds the command to the ``depot`` group.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from depot.cli.errors import CliError
from depot.core.config import load_config
from depot.core.errors import DepotError


@click.command("s3")
@click.option("--port", type=click.IntRange(0, 65535), help="Port of the gateway (default: worker.s3_port, else 7071).")
@click.option("--host", help="Address to listen on (default: worker.host, 127.0.0.1).")
@click.option("--endpoint", envvar="DEPOT_ENDPOINT", help="Worker URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def s3_command(port: int | None, host: str | None, endpoint: str | None, config_file: str | None) -> None:
    """Serve the namespace over the S3 API (read operations), reading through a worker."""
    from depot.client.client import CacheClient
    from depot.s3.server import DEFAULT_S3_PORT, start_gateway

    try:
        cfg = load_config(config_file)
        logging.basicConfig(
            level=getattr(logging, cfg.log_level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        listen_port = port if port is not None else (cfg.worker.s3_port or DEFAULT_S3_PORT)
        listen_host = host or cfg.worker.host

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            client = CacheClient(endpoint, config=cfg)
            try:
                running = await start_gateway(cfg, client, listen_host, listen_port)
                try:
                    click.echo(
                        f"depot S3 gateway listening on {running.endpoint} "
                        f"(reading through {client.endpoint})"
                    )
                    sys.stdout.flush()
                    await stop.wait()
                finally:
                    await running.stop()
            finally:
                await client.close()

        asyncio.run(main())
    except DepotError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.strerror or exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def register(group: click.Group) -> None:
    """Add ``depot s3`` to the ``depot`` command group."""
    group.add_command(s3_command, "s3")


__all__ = ["register", "s3_command"]
