"""``depot load`` and ``depot free``: distributed preload and free, as cluster jobs.

``register(cli)`` adds both commands to the ``depot`` group. A job runs on the workers (its state
lives in the cluster's store), so the command only submits it and follows its progress: Ctrl-C
leaves the job running, ``depot load --progress JOB`` attaches again, ``--stop JOB`` stops it.

Exit codes: 0 every file loaded (freed); 1 an error (one line on stderr), or the job failed as a
whole (its path vanished, ...); 2 a usage error; 3 the job completed but some files failed (a
table of them on stderr); 4 the job was stopped before it completed; 130 interrupted (the job
keeps running).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from depot.cli.errors import CliError, cli_errors
from depot.core.config import load_config
from depot.core.types import parse_rate

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_STOPPED = 4
EXIT_INTERRUPTED = 130

_ENDPOINT_HELP = "Worker URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070)."
POLL_INTERVAL = 0.5
STOP_WAIT = 30.0


class JobUsageError(CliError):
    exit_code = EXIT_USAGE


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _client(endpoint: str | None, config_file: str | None) -> Any:
    from depot.client.client import CacheClient

    return CacheClient(endpoint, config=load_config(config_file), ufs_fallback=False)


# progress ------------------------------------------------------------------------------------


class _Bar:
    """A rich progress bar on stderr (files, bytes, throughput, ETA, failures); a no-op when
    stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("files {task.fields[files]}"),
                TextColumn("{task.fields[bytes]}"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[failures]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "job", total=None, files="0/0", bytes="", rate="", eta="-", failures=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def update(self, doc: dict[str, Any]) -> None:
        if self._progress is None:
            return
        files, data = doc["files"], doc["bytes"]
        failed = files.get("failed", 0)
        eta = doc.get("eta")
        total = data["total"] if doc.get("walk_done") else None
        self._progress.update(
            self._task,
            description=f"{doc['kind']} {doc['id']} {doc.get('phase', doc['state'])}",
            total=total if total else (None if not doc.get("walk_done") else 1),
            completed=data["done"] if total else (1 if doc.get("walk_done") else 0),
            files=f"{files['done'] + failed}/{files['total']}",
            bytes=f"{_human(data['done'])}/{_human(data['total'])}",
            rate=f"{_human(doc.get('rate') or 0)}/s",
            eta="-" if eta is None else f"{eta:.0f}s",
            failures=f"[red]{failed} failed" if failed else "",
        )


def _follow(
    client: Any, job_id: str, bar: _Bar, as_json: bool
) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with client:
            doc: dict[str, Any] = await client.wait_job(job_id, bar.update, POLL_INTERVAL)
            return doc

    try:
        with bar:
            return asyncio.run(run())
    except KeyboardInterrupt:
        click.echo(
            f"depot: job {job_id} keeps running: 'depot load --progress {job_id}' follows it, "
            f"'depot load --stop {job_id}' stops it",
            err=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None


# reports --------------------------------------------------------------------------------------


def _summary(doc: dict[str, Any]) -> str:
    files, data = doc["files"], doc["bytes"]
    elapsed = doc.get("elapsed") or 0.0
    if doc["kind"] == "free":
        freed = doc.get("freed") or {}
        workers = doc.get("workers") or {}
        return (
            f"free {doc['id']} {doc['state']}: {freed.get('files', 0)} file version(s), "
            f"{freed.get('pages', 0)} pages ({_human(freed.get('bytes', 0))}) dropped on "
            f"{workers.get('done', 0)} worker(s)"
        )
    what = "stat'ed" if doc["options"].get("metadata_only") else "loaded"
    lines = [
        f"load {doc['id']} {doc['state']}: {files['done']} of {files['total']} file(s) {what}, "
        f"{_human(data['done'])} in {elapsed:.1f} s ({_human(doc.get('rate') or 0)}/s); "
        f"{_human(data['from_ufs'])} from the under store, {_human(data['cached_before'])} "
        "already cached"
    ]
    pages = doc.get("pages") or {}
    if pages.get("not_cached"):
        lines.append(
            f"warning: {pages['not_cached']} page(s) did not stay in the cache (too small?)"
        )
    verify = doc.get("verify")
    if verify:
        lines.append(
            f"verify: {verify['pages']} page(s) of {verify['files']} file(s) checked, "
            f"{verify['missing']} missing and loaded again"
            + (f", {verify['not_cached']} still not cached" if verify.get("not_cached") else "")
        )
    return "\n".join(lines)


def _failures_table(doc: dict[str, Any]) -> None:
    failures = doc.get("failures") or []
    failed = doc["files"].get("failed", 0) if doc["kind"] == "load" else len(failures)
    count = max(failed, len(failures))
    click.echo(f"depot: {count} failure(s):", err=True)
    if not failures:
        return
    width = min(60, max(len(f["path"]) for f in failures))
    code_width = max(len(f["code"]) for f in failures)
    for f in failures:
        click.echo(f"  {f['path']:<{width}}  {f['code']:<{code_width}}  {f['reason']}", err=True)
    if doc.get("failures_omitted"):
        click.echo(f"  ... and {doc['failures_omitted']} more", err=True)


def _finish(doc: dict[str, Any], as_json: bool) -> None:
    """Print the outcome and exit with the code the module docstring lists."""
    state = doc.get("state")
    if as_json:
        click.echo(json.dumps(doc))
    elif state != "failed":
        click.echo(_summary(doc))
    if state == "failed":
        error = doc.get("error") or {}
        raise CliError(f"job {doc['id']} failed: {error.get('reason', 'unknown error')}")
    if doc.get("failures"):
        _failures_table(doc)
        raise SystemExit(EXIT_PARTIAL)
    if doc["files"].get("failed") or (doc.get("workers") or {}).get("failed"):
        raise SystemExit(EXIT_PARTIAL)
    if state == "stopped":
        click.echo(f"depot: job {doc['id']} was stopped before it completed", err=True)
        raise SystemExit(EXIT_STOPPED)


def _run_job(
    submit: Callable[[Any], Any],
    endpoint: str | None,
    config_file: str | None,
    as_json: bool,
    detach: bool,
) -> None:
    with cli_errors():
        client = _client(endpoint, config_file)

        async def create() -> dict[str, Any]:
            async with client:
                doc: dict[str, Any] = await submit(client)
                return doc

        first = asyncio.run(create())
        if detach:
            click.echo(json.dumps(first) if as_json else first["id"])
            return
        doc = _follow(_client(endpoint, config_file), first["id"], _Bar(sys.stderr.isatty()),
                      as_json)
    _finish(doc, as_json)


# commands -------------------------------------------------------------------------------------


@click.command("load")
@click.argument("path", required=False)
@click.option("-r", "--recursive", is_flag=True, help="Load a whole tree (default: a file, or "
              "the files directly in a directory).")
@click.option("--verify", is_flag=True, help="Then check every page on its worker and load "
              "what is missing.")
@click.option("--bandwidth", metavar="RATE", help="Cap the load rate, e.g. 200MB or 1GiB/s.")
@click.option("--metadata-only", is_flag=True, help="Only warm stat/list on the owners.")
@click.option("--json", "as_json", is_flag=True, help="Print the final job document as JSON.")
@click.option("--progress", "progress_job", metavar="JOB", help="Follow a running job.")
@click.option("--stop", "stop_job", metavar="JOB", help="Stop a running job.")
@click.option("--detach", is_flag=True, help="Submit the job, print its id and return.")
@click.option("--endpoint", envvar="DEPOT_ENDPOINT", help=_ENDPOINT_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def load(
    path: str | None,
    recursive: bool,
    verify: bool,
    bandwidth: str | None,
    metadata_only: bool,
    as_json: bool,
    progress_job: str | None,
    stop_job: str | None,
    detach: bool,
    endpoint: str | None,
    config_file: str | None,
) -> None:
    """Preload PATH into the cluster's cache: every file's segments on the workers that own them.

    Exit codes: 0 all loaded, 1 error, 2 usage, 3 some files failed, 4 job stopped.
    """
    modes = sum(x is not None for x in (path, progress_job, stop_job))
    if modes != 1:
        raise JobUsageError("give exactly one of PATH, --progress JOB, --stop JOB")
    if path is None and (recursive or verify or bandwidth or metadata_only or detach):
        raise JobUsageError("--recursive, --verify, --bandwidth, --metadata-only and --detach "
                            "go with PATH")
    if progress_job is not None:
        with cli_errors():
            doc = _follow(_client(endpoint, config_file), progress_job,
                          _Bar(sys.stderr.isatty()), as_json)
        _finish(doc, as_json)
        return
    if stop_job is not None:
        job_id = stop_job
        with cli_errors():
            client = _client(endpoint, config_file)

            async def stop() -> dict[str, Any]:
                async with client:
                    doc: dict[str, Any] = await client.stop_job(job_id)
                    try:
                        async with asyncio.timeout(STOP_WAIT):
                            doc = await client.wait_job(job_id, None, POLL_INTERVAL)
                    except TimeoutError:
                        raise CliError(
                            f"job {job_id} did not stop within {STOP_WAIT:.0f} s (its "
                            "coordinator may be down: the job stops when it is resumed)"
                        ) from None
                    return doc

            doc = asyncio.run(stop())
        if as_json:
            click.echo(json.dumps(doc))
        else:
            click.echo(f"job {doc['id']} {doc['state']}")
        return
    assert path is not None
    with cli_errors():
        rate = parse_rate(bandwidth)
    target = path

    async def submit(client: Any) -> dict[str, Any]:
        doc: dict[str, Any] = await client.load(
            target, recursive=recursive, verify=verify, bandwidth=rate,
            metadata_only=metadata_only, wait=False,
        )
        return doc

    _run_job(submit, endpoint, config_file, as_json, detach)


@click.command("free")
@click.argument("path")
@click.option("-r", "--recursive", is_flag=True, help="Everything under PATH (default: a file, "
              "or the files directly in a directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the final job document as JSON.")
@click.option("--endpoint", envvar="DEPOT_ENDPOINT", help=_ENDPOINT_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def free(
    path: str, recursive: bool, as_json: bool, endpoint: str | None, config_file: str | None
) -> None:
    """Drop the cached pages and metadata of PATH on every worker of the cluster.

    Exit codes: 0 freed everywhere, 1 error, 2 usage, 3 some workers failed.
    """

    async def submit(client: Any) -> dict[str, Any]:
        doc: dict[str, Any] = await client.free(path, recursive, wait=False)
        return doc

    _run_job(submit, endpoint, config_file, as_json, False)


def register(cli: click.Group) -> None:
    """Add ``load`` and ``free`` to the ``depot`` group."""
    cli.add_command(load)
    cli.add_command(free)


__all__ = ["EXIT_PARTIAL", "EXIT_STOPPED", "free", "load", "register"]
