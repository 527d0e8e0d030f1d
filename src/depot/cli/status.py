"""``depot status``: the workers of the cluster, their state, capacity and usage.

Asks one worker (``--endpoint``, ``DEPOT_ENDPOINT``, the config file) for the cluster view
(``GET /api/v1/cluster``), then probes every worker of that view at once (``/healthz`` and
``/api/v1/cache/stats``, a short timeout each) and prints one table, or with ``--json`` one JSON
document::

    {"cluster": ..., "membership": "etcd", "generation": 7, "healthy": true, "endpoint": ...,
     "page_size": ..., "placement": {...},
     "summary": {"workers": 3, "live": 2, "unreachable": 1, "draining": 0},
     "workers": [{"worker_id", "id", "endpoint", "state", "membership_state", "reachable",
                  "capacity_bytes", "used_bytes", "pages", "hits", "misses", "hit_ratio",
                  "bytes_from_cache", "bytes_from_ufs", "dirty_bytes", "version", "started_at",
                  "error"}]}

``dirty_bytes`` is the worker's write-back bytes not yet in the under store (None if unknown).

A worker's ``state`` is ``unreachable`` when the probe fails, else the state membership gives it
(``live``, ``draining``, ``starting``). ``healthy`` is the answering worker's view of its
membership backend (False: etcd is unreachable and the view is the last known one). The command
exits 0 whenever the asked worker answers, whatever the state of the others.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

from depot.core.errors import DepotError, Unavailable
from depot.core.transport import (
    ConnectionPool,
    WorkerTimeout,
    WorkerUnreachable,
    error_from_response,
    parse_endpoint,
)

CLUSTER = "/api/v1/cluster"
STATS = "/api/v1/cache/stats"
HEALTH = "/healthz"
DEFAULT_TIMEOUT = 2.0

UNREACHABLE = "unreachable"


def _pool(endpoint: str, timeout: float) -> ConnectionPool:
    return ConnectionPool(
        parse_endpoint(endpoint), max_connections=2, connect_timeout=timeout, timeout=timeout
    )


async def _get(pool: ConnectionPool, route: str) -> Any:
    response = await pool.request(route)
    if response.status >= 300:
        raise error_from_response(response, None)
    return response.json()


async def _probe(entry: dict[str, Any], probe_timeout: float) -> dict[str, Any]:
    """One worker's row: its membership entry merged with what it answers now."""
    endpoint = str(entry.get("endpoint", ""))
    worker_id = str(entry.get("worker_id", ""))
    row: dict[str, Any] = {
        "worker_id": worker_id,
        "id": worker_id.rpartition(":")[2][:8],
        "endpoint": endpoint,
        "state": UNREACHABLE,
        "membership_state": entry.get("state", ""),
        "reachable": False,
        "capacity_bytes": int(entry.get("capacity_bytes") or 0),
        "used_bytes": int(entry.get("used_bytes") or 0),
        "pages": None,
        "hits": None,
        "misses": None,
        "hit_ratio": None,
        "bytes_from_cache": None,
        "bytes_from_ufs": None,
        "dirty_bytes": None,
        "version": entry.get("version", ""),
        "started_at": entry.get("started_at"),
        "error": None,
    }
    try:
        pool = _pool(endpoint, probe_timeout)
    except DepotError as exc:
        row["error"] = exc.message
        return row
    try:
        async with asyncio.timeout(probe_timeout * 2):
            health, stats = await asyncio.gather(_get(pool, HEALTH), _get(pool, STATS))
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise WorkerUnreachable(f"health check answered {health!r}")
        if not isinstance(stats, dict):
            raise WorkerUnreachable("malformed cache stats")
    except (DepotError, TimeoutError) as exc:
        row["error"] = exc.message if isinstance(exc, DepotError) else "timed out"
        return row
    finally:
        pool.close()
    row["reachable"] = True
    row["state"] = row["membership_state"] or "live"
    for key in ("pages", "hits", "misses", "hit_ratio", "bytes_from_cache", "bytes_from_ufs"):
        row[key] = stats.get(key)
    for key in ("capacity_bytes", "used_bytes"):
        if isinstance(stats.get(key), int):
            row[key] = stats[key]
    writeback = stats.get("writeback")
    if isinstance(writeback, dict) and isinstance(writeback.get("dirty_bytes"), int):
        row["dirty_bytes"] = writeback["dirty_bytes"]  # write-back bytes not yet uploaded
    return row


async def gather_status(endpoint: str, probe_timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The status document of the cluster ``endpoint`` belongs to (see the module docstring)."""
    url = parse_endpoint(endpoint).url
    pool = _pool(url, probe_timeout)
    try:
        try:
            view = await _get(pool, CLUSTER)
        except (WorkerUnreachable, WorkerTimeout) as exc:
            raise Unavailable(f"cannot reach the worker at {url}: {exc.message}") from None
    finally:
        pool.close()
    if not isinstance(view, dict) or not isinstance(view.get("workers"), list):
        raise Unavailable(f"the worker at {url} sent a malformed cluster view")
    entries = [w for w in view["workers"] if isinstance(w, dict)]
    rows = await asyncio.gather(*(_probe(w, probe_timeout) for w in entries))
    rows = sorted(rows, key=lambda r: (r["endpoint"], r["worker_id"]))
    summary = {"workers": len(rows), "live": 0, UNREACHABLE: 0, "draining": 0}
    for row in rows:
        if row["state"] in summary:
            summary[row["state"]] += 1
    return {
        "cluster": view.get("cluster"),
        "membership": view.get("membership"),
        "generation": view.get("generation"),
        "healthy": view.get("healthy"),
        "endpoint": url,
        "self": view.get("self"),
        "page_size": view.get("page_size"),
        "placement": view.get("placement"),
        "time": time.time(),
        "summary": summary,
        "workers": rows,
    }


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"  # pragma: no cover


def render(status: dict[str, Any]) -> None:
    """Print the status document as a header line and a table of workers (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    summary = status["summary"]
    health = "healthy" if status.get("healthy") else "UNHEALTHY (serving the last known view)"
    console.print(
        f"cluster [bold]{status.get('cluster')}[/bold]  membership {status.get('membership')}  "
        f"generation {status.get('generation')}  {health}"
    )
    console.print(
        f"{summary['workers']} worker(s): {summary['live']} live, "
        f"{summary[UNREACHABLE]} unreachable, {summary['draining']} draining "
        f"(asked {status['endpoint']})"
    )
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in (
        ("id", "left"), ("endpoint", "left"), ("state", "left"), ("capacity", "right"),
        ("used", "right"), ("pages", "right"), ("hit ratio", "right"), ("dirty", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    styles = {"live": "green", UNREACHABLE: "red", "draining": "yellow"}
    for row in status["workers"]:
        state = row["state"]
        style = styles.get(state, "")
        ratio = row["hit_ratio"]
        table.add_row(
            row["id"],
            row["endpoint"],
            f"[{style}]{state}[/{style}]" if style else state,
            _size(row["capacity_bytes"]),
            _size(row["used_bytes"]),
            "-" if row["pages"] is None else str(row["pages"]),
            "-" if not isinstance(ratio, (int, float)) else f"{ratio:.1%}",
            _size(row.get("dirty_bytes")),
        )
    console.print(table)
    for row in status["workers"]:
        if row["error"]:
            console.print(f"  {row['id']} {row['endpoint']}: {row['error']}", style="dim")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option(
    "--endpoint",
    envvar="DEPOT_ENDPOINT",
    help="Any worker's URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070).",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.05),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each worker.",
)
def status_command(
    as_json: bool, endpoint: str | None, config_file: str | None, timeout: float
) -> None:
    """Workers of the cluster: state, capacity, usage, hit ratio."""
    from depot.cli.errors import cli_errors
    from depot.client.client import resolve_endpoint
    from depot.core.config import load_config

    with cli_errors():
        config = None if endpoint else load_config(config_file)
        url = resolve_endpoint(endpoint, config)
        status = asyncio.run(gather_status(url, timeout))
        if as_json:
            click.echo(json.dumps(status))
            return
        render(status)


def register(cli_group: click.Group) -> None:
    """Add ``depot status`` to the ``depot`` command group."""
    cli_group.add_command(status_command, "status")


__all__ = ["gather_status", "register", "render", "status_command"]
