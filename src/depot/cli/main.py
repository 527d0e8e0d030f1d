"""The ``depot`` command: embedded node, worker daemon, file and cache commands.

Errors print one line on stderr and exit non-zero; ``--json`` prints one JSON document.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from depot import __version__
from depot.cli.errors import CliError, cli_errors
from depot.core.config import DEFAULT_PORT, DepotConfig, load_config

F = TypeVar("F", bound=Callable[..., Any])


def _overrides(**flags: Any) -> dict[str, Any]:
    """Map the common flags onto config keys (flags win over file and environment)."""
    out: dict[str, Any] = {}
    if flags.get("port") is not None:
        out.setdefault("worker", {})["port"] = flags["port"]
    if flags.get("host") is not None:
        out.setdefault("worker", {})["host"] = flags["host"]
    if flags.get("s3_port") is not None:
        out.setdefault("worker", {})["s3_port"] = flags["s3_port"]
    cluster = {
        key: flags[flag]
        for flag, key in (
            ("membership", "membership"),
            ("etcd", "etcd"),
            ("workers", "workers"),
            ("cluster", "name"),
            ("advertise", "advertise"),
        )
        if flags.get(flag) is not None
    }
    if cluster:
        out["cluster"] = cluster
    cache: dict[str, Any] = {}
    if flags.get("cache_dir") is not None or flags.get("cache_size") is not None:
        base = flags.get("base_cache")
        path = flags.get("cache_dir") or (base.path if base else ".depot/cache")
        entry: dict[str, Any] = {"path": str(path)}
        if flags.get("cache_size") is not None:
            entry["size"] = flags["cache_size"]
        elif base is not None:
            entry["size"] = base.size
        cache["dirs"] = [entry]
    if flags.get("page_size") is not None:
        cache["page_size"] = flags["page_size"]
    if cache:
        out["cache"] = cache
    return out


def _build_config(config_file: str | None, ufs: str | None, metadata: str | None = None, **flags: Any) -> DepotConfig:
    base = load_config(config_file)
    overrides = _overrides(base_cache=base.cache.dirs[0], **flags)
    if ufs is not None:
        uri = _ufs_uri(ufs)
        mounts = [m.model_dump() for m in base.mounts if m.path.rstrip("/") not in ("", "/")]
        root: dict[str, Any] = {"path": "/", "ufs": uri}
        if metadata:
            root["metadata"] = metadata
        overrides["mounts"] = [root, *mounts]
    return load_config(config_file, overrides=overrides)


def _ufs_uri(value: str) -> str:
    """A bare directory path means ``file://`` of its absolute path."""
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise CliError(f"not a directory: {value} (give a directory or a URI like s3://bucket/prefix)")
    return path.as_uri()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_worker(cfg: DepotConfig, banner: Callable[[str], None] | None) -> None:
    from depot.worker.daemon import Worker

    _setup_logging(cfg.log_level)
    worker = Worker(cfg)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await worker.start()
        gateway: Any = None
        client: Any = None
        gateway_metrics: Any = None
        try:
            if cfg.worker.s3_port is not None:
                # The gateway reads through a client (same routing and failover as any reader),
                # so it is started here, above both the worker and the client.
                from depot.client.client import CacheClient
                from depot.s3.server import advertised_endpoint, start_gateway

                client = CacheClient(worker.endpoint, config=cfg)
                gateway = await start_gateway(cfg, client, cfg.worker.host, cfg.worker.s3_port)
                # Its counters appear in the worker's GET /metrics (depot_s3_*).
                from depot.observability.metrics import GatewayMetrics

                gateway_metrics = GatewayMetrics(worker.metrics_registry, gateway.gateway.stats)
                # In the worker's membership entry: where redirected reads are sent.
                s3_url = advertised_endpoint(worker.advertised_endpoint, gateway.port)
                gateway.gateway.advertise(s3_url)
                if worker.cluster is not None:
                    await worker.cluster.advertise_s3(s3_url)
            if banner is not None:
                banner(worker.endpoint)
                if gateway is not None:
                    click.echo(f"  S3 API     {gateway.endpoint}")
                    sys.stdout.flush()
            await stop.wait()
        finally:
            if gateway_metrics is not None:
                gateway_metrics.close()
            if gateway is not None:
                await gateway.stop()
            if client is not None:
                await client.close()
            await worker.stop()

    asyncio.run(main())


common_worker_options: list[Callable[[F], F]] = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file."),
    click.option("--ufs", help="Under store mounted at /: a directory or URI (file://, s3://, gs://, az://)."),
    click.option("--port", type=click.IntRange(0, 65535), help=f"HTTP port (default {DEFAULT_PORT})."),
    click.option("--s3-port", type=click.IntRange(0, 65535), help="Also serve the S3 API on this port."),
    click.option("--host", help="Address to listen on (default 127.0.0.1)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), help="Page store directory."),
    click.option("--cache-size", help="Page store quota, e.g. 10GiB."),
    click.option("--page-size", help="Page size, e.g. 4MiB."),
    click.option("--metadata", help="Metadata policy of the --ufs mount: immutable, max-age=60s, always."),
]


def worker_options(fn: F) -> F:
    for option in reversed(common_worker_options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="depot")
def cli() -> None:
    """depot: a distributed read-through cache for AI data."""


@cli.command()
@worker_options
def up(config_file: str | None, ufs: str | None, metadata: str | None, **flags: Any) -> None:
    """Start an embedded single node in the foreground (cache under ./.depot/)."""
    with cli_errors():
        base = load_config(config_file)
        if ufs is None and not base.mounts:
            ufs = os.getcwd()
            click.echo(f"depot: no --ufs given, serving the current directory {ufs}", err=True)
        cfg = _build_config(config_file, ufs, metadata, **flags)

        prog = "depot" if shutil.which("depot") else os.path.relpath(sys.argv[0])
        python = "python" if shutil.which("depot") else os.path.relpath(sys.executable)

        def banner(endpoint: str) -> None:
            mounts = "\n".join(f"    {m.path:<12} -> {m.ufs}" for m in cfg.mounts)
            click.echo(
                f"depot {__version__} is up (embedded single node)\n"
                f"  HTTP API   {endpoint}   (OpenAPI: {endpoint}/openapi.json)\n"
                f"  cache      {', '.join(str(d.path) for d in cfg.cache.dirs)} "
                f"({_human(cfg.cache.capacity)}, pages of {_human(cfg.cache.page_size)})\n"
                f"  mounts\n{mounts}\n"
                f"Try, in another shell:\n"
                f"  export DEPOT_ENDPOINT={endpoint}\n"
                f"  {prog} fs ls /\n"
                f"  {prog} fs head /<file>\n"
                f"  {prog} cache stats\n"
                f"  {python} -c \"import fsspec; print(fsspec.filesystem('depot').ls('/'))\"\n"
                f"Press Ctrl-C to stop.",
                err=False,
            )
            sys.stdout.flush()

        _run_worker(cfg, banner)


@cli.command()
@worker_options
@click.option("--membership", type=click.Choice(["embedded", "static", "etcd"]), help="How workers find each other (default embedded).")
@click.option("--etcd", help="etcd client URLs, comma-separated (membership etcd).")
@click.option("--workers", help="Worker URLs of a static cluster, comma-separated (membership static).")
@click.option("--cluster", help="Cluster name: workers of one cluster share a ring (default 'default').")
@click.option("--advertise", help="URL others reach this worker at (default http://HOST:PORT).")
def worker(config_file: str | None, ufs: str | None, metadata: str | None, **flags: Any) -> None:
    """Run a worker daemon from a config file (flags override it)."""
    with cli_errors():
        cfg = _build_config(config_file, ufs, metadata, **flags)

        def banner(endpoint: str) -> None:
            click.echo(f"depot worker listening on {endpoint}")
            sys.stdout.flush()

        _run_worker(cfg, banner)


# client commands ---------------------------------------------------------------------------------

endpoint_option = click.option("--endpoint", envvar="DEPOT_ENDPOINT", help="Worker URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070).")
config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")


def _filesystem(endpoint: str | None, config_file: str | None) -> Any:
    from depot.client.fs import DepotFileSystem

    cfg = load_config(config_file)
    return DepotFileSystem(endpoint=endpoint, config=cfg, skip_instance_cache=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@cli.group()
def fs() -> None:
    """The depot namespace: ls, stat, cat, head, cp, rm, mkdir."""


@fs.command("ls")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: type, size, mtime.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@endpoint_option
@config_option
def fs_ls(path: str, long: bool, as_json: bool, endpoint: str | None, config_file: str | None) -> None:
    """List a directory."""
    with cli_errors():
        entries = _filesystem(endpoint, config_file).ls(path, detail=True)
        if as_json:
            click.echo(json.dumps(entries))
            return
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory":
                name += "/"
            if long:
                kind = "d" if entry["type"] == "directory" else "-"
                click.echo(f"{kind} {entry['size']:>14} {name}")
            else:
                click.echo(name)


@fs.command("stat")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@endpoint_option
@config_option
def fs_stat(path: str, as_json: bool, endpoint: str | None, config_file: str | None) -> None:
    """Show the status of a file or directory."""
    with cli_errors():
        info = _filesystem(endpoint, config_file).info(path)
        if as_json:
            click.echo(json.dumps(info))
            return
        for key in ("name", "type", "size", "mtime", "etag", "version"):
            if info.get(key) is not None:
                click.echo(f"{key:<8} {info[key]}")


def _stream(fs_obj: Any, path: str, start: int, end: int | None, out: Any) -> None:
    chunk = 8 * 1024 * 1024
    with fs_obj.open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else max(0, end - start)
        while remaining is None or remaining > 0:
            data = f.read(chunk if remaining is None else min(chunk, remaining))
            if not data:
                break
            out.write(data)
            if remaining is not None:
                remaining -= len(data)


@fs.command("cat")
@click.argument("path")
@click.option("--offset", type=click.IntRange(0), default=0, help="Start at this byte.")
@click.option("--length", type=click.IntRange(0), default=None, help="Read at most this many bytes.")
@endpoint_option
@config_option
def fs_cat(path: str, offset: int, length: int | None, endpoint: str | None, config_file: str | None) -> None:
    """Write a file's bytes to stdout."""
    with cli_errors():
        end = None if length is None else offset + length
        try:
            _stream(_filesystem(endpoint, config_file), path, offset, end, sys.stdout.buffer)
        except BrokenPipeError:
            sys.stderr.close()


@fs.command("head")
@click.argument("path")
@click.option("-c", "--bytes", "count", type=click.IntRange(0), default=1024, show_default=True, help="Bytes to print.")
@endpoint_option
@config_option
def fs_head(path: str, count: int, endpoint: str | None, config_file: str | None) -> None:
    """Print the first bytes of a file."""
    with cli_errors():
        try:
            _stream(_filesystem(endpoint, config_file), path, 0, count, sys.stdout.buffer)
        except BrokenPipeError:
            sys.stderr.close()


@fs.command("rm")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Delete a directory tree.")
@endpoint_option
@config_option
def fs_rm(path: str, recursive: bool, endpoint: str | None, config_file: str | None) -> None:
    """Delete a file (or a tree with -r) through the cluster."""
    with cli_errors():
        _filesystem(endpoint, config_file).rm(path, recursive=recursive)


@fs.command("mkdir")
@click.argument("path")
@endpoint_option
@config_option
def fs_mkdir(path: str, endpoint: str | None, config_file: str | None) -> None:
    """Make a directory (object stores keep none: it exists once a file is written under it)."""
    with cli_errors():
        _filesystem(endpoint, config_file).makedirs(path, exist_ok=True)


@fs.command("cp")
@click.argument("source")
@click.argument("dest", type=click.Path())
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory tree.")
@endpoint_option
@config_option
def fs_cp(source: str, dest: str, recursive: bool, endpoint: str | None, config_file: str | None) -> None:
    """Copy a depot file (or tree with -r) to a local path, or a local file to depot://PATH."""
    with cli_errors():
        fs_obj = _filesystem(endpoint, config_file)
        if dest.startswith("depot:"):  # upload
            local = Path(source)
            if local.is_dir():
                raise CliError(f"{source} is a directory (uploads take one file)")
            if not local.is_file():
                raise CliError(f"not found: {source}")
            remote = dest + local.name if dest.endswith("/") else dest
            fs_obj.put_file(str(local), remote)
            return
        info = fs_obj.info(source)
        if info["type"] == "directory":
            if not recursive:
                raise CliError(f"{source} is a directory (use -r)")
            root = info["name"].rstrip("/")
            for path in fs_obj.find(source):
                target = Path(dest) / path[len(root):].lstrip("/")
                _copy_one(fs_obj, path, target)
            return
        target = Path(dest)
        if target.is_dir():
            target = target / info["name"].rstrip("/").rsplit("/", 1)[-1]
        _copy_one(fs_obj, source, target)


def _copy_one(fs_obj: Any, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.depot-tmp")
    try:
        with open(tmp, "wb") as out:
            _stream(fs_obj, source, 0, None, out)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


@cli.group()
def cache() -> None:
    """Cache commands."""


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@endpoint_option
@config_option
def cache_stats(as_json: bool, endpoint: str | None, config_file: str | None) -> None:
    """Hits, misses, bytes from cache and from the UFS, usage."""
    with cli_errors():
        stats = _filesystem(endpoint, config_file).cache_stats()
        if as_json:
            click.echo(json.dumps(stats))
            return
        rows = [
            ("hits (pages)", stats["hits"]),
            ("misses (pages)", stats["misses"]),
            ("hit ratio", f"{stats['hit_ratio']:.1%}"),
            ("bytes from cache", _human(stats["bytes_from_cache"])),
            ("bytes from UFS", _human(stats["bytes_from_ufs"])),
            ("UFS reads", stats["ufs_reads"]),
            ("pages cached", stats["pages"]),
            ("used", f"{_human(stats['used_bytes'])} of {_human(stats['capacity_bytes'])}"),
            ("evictions", stats["evictions"]),
            ("corrupt pages dropped", stats["corrupt_dropped"]),
        ]
        if stats.get("memory_capacity_bytes"):
            rows.append((
                "memory tier",
                f"{_human(stats['memory_bytes'])} of {_human(stats['memory_capacity_bytes'])}, "
                f"{stats['memory_hits']} hits",
            ))
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            click.echo(f"{name:<{width}}  {value}")


@cli.group()
def config() -> None:
    """Configuration commands."""


@config.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def config_show(config_file: str | None) -> None:
    """Print the effective config (file, then DEPOT_* environment), secrets masked."""
    import yaml

    with cli_errors():
        cfg = load_config(config_file)
        click.echo(yaml.safe_dump(cfg.to_public_dict(), sort_keys=False).rstrip())


def _register_commands() -> None:
    """Commands that live in their own modules (each adds itself to the group)."""
    from depot.cli import jobs, mount, s3, status, sync

    s3.register(cli)
    status.register(cli)
    sync.register(cli)
    jobs.register(cli)
    mount.register(cli)


_register_commands()


def main() -> None:
    cli.main(prog_name="depot", standalone_mode=True)


if __name__ == "__main__":
    main()

__all__ = ["cli", "main"]
