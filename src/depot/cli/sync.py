"""``depot sync [PATH]``: make write-back writes durable in the under store.

Without ``--wait`` it reports what is still pending (dirty bytes, queued writes, failures) and
returns at once; with ``--wait`` it returns once every write pending now (of ``PATH``, or of
every worker) is uploaded. Exit codes: 0 synced (or, without ``--wait``, nothing pending); 1 an
error (one line on stderr: a write that failed permanently, the deadline passed...); 3 without
``--wait``: writes are still pending.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from depot.cli.errors import CliError, cli_errors

EXIT_PENDING = 3


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


async def run_sync(
    endpoint: str | None, config_file: str | None, path: str | None, wait: bool,
    deadline: float | None,
) -> dict[str, Any]:
    from depot.client.client import CacheClient
    from depot.core.config import load_config

    async with CacheClient(
        endpoint, config=load_config(config_file), ufs_fallback=False
    ) as client:
        return await client.sync(path, wait=wait, deadline=deadline)


@click.command("sync")
@click.argument("path", required=False)
@click.option("--wait", is_flag=True, help="Wait until the pending writes are uploaded.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="With --wait: give up after this many seconds (default: wait as long as it takes).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option(
    "--endpoint",
    envvar="DEPOT_ENDPOINT",
    help="Worker URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070).",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def sync_command(
    path: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
    endpoint: str | None,
    config_file: str | None,
) -> None:
    """Upload pending write-back writes (of PATH, or all) to the under store."""
    with cli_errors():
        doc = asyncio.run(run_sync(endpoint, config_file, path, wait, timeout))
    if as_json:
        click.echo(json.dumps(doc))
    else:
        what = path or "all paths"
        if doc["synced"]:
            click.echo(f"synced: {what}")
        else:
            click.echo(
                f"pending: {doc['queue_length']} write(s), {_human(doc['dirty_bytes'])} "
                f"not yet in the under store ({what})"
            )
        for failure in doc["failures"]:
            click.echo(
                f"  failed #{failure.get('seq')} {failure.get('path')}: "
                f"{failure.get('code')} {failure.get('message')}",
                err=True,
            )
    if not doc["synced"] and not wait:
        raise SystemExit(EXIT_PENDING)
    if not doc["synced"]:
        raise CliError("writes are still pending")


def register(cli_group: click.Group) -> None:
    """Add ``depot sync`` to the ``depot`` command group."""
    cli_group.add_command(sync_command, "sync")


__all__ = ["register", "run_sync", "sync_command"]
