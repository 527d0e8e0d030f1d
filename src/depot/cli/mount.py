"""``depot mount`` and ``depot unmount``: the namespace as a POSIX file system (FUSE).

``register(cli)`` adds both commands to the ``depot`` group. ``depot mount`` without
``--foreground`` starts the filesystem as a background process and returns once the mount is up
(or prints why it failed); ``--supervise`` puts a supervisor in front of it that remounts when the
filesystem process dies. See docs/fuse.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from depot.cli.errors import CliError, cli_errors
from depot.core.config import DepotConfig, load_config
from depot.core.errors import DepotError

_ENDPOINT_HELP = "Worker URL (else DEPOT_ENDPOINT, the config file, http://127.0.0.1:7070)."
_OPTIONS_HELP = (
    "Mount options, comma-separated (repeatable): attr_timeout=S, entry_timeout=S, "
    "negative_timeout=S, uid=N, gid=N, file_mode=0444, dir_mode=0555, allow_other, "
    "read_ahead_kb=N, kernel_cache / no_kernel_cache, concurrency=N, memory=SIZE, "
    "prefetch / no_prefetch, prefetch_segment=SIZE, random_threshold=N, shutdown_grace=S, "
    "staging_dir=DIR; kernel options ro, rw (enables writes), allow_root, auto_unmount, "
    "fsname=NAME."
)


def _setup_logging(level: str, stream: Any = None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,
    )


def _config_path(config_file: str | None) -> str | None:
    """The config file the command uses, as an absolute path (the background process runs in /)."""
    if config_file:
        return os.path.abspath(config_file)
    if os.environ.get("DEPOT_CONFIG"):
        return os.path.abspath(os.environ["DEPOT_CONFIG"])
    if Path("depot.yaml").is_file():
        return os.path.abspath("depot.yaml")
    return None


def _default_log(mount_point: str) -> str:
    digest = hashlib.blake2b(mount_point.encode(), digest_size=6).hexdigest()
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"depot-mount-{digest}.log")


def _child_command(
    mount_point: str,
    options: tuple[str, ...],
    endpoint: str | None,
    config_file: str | None,
    *,
    supervise: bool,
) -> list[str]:
    command = [sys.executable, "-m", "depot.cli.mount", "mount", mount_point, "--foreground"]
    if supervise:
        command.append("--supervise")
    for value in options:
        command += ["-o", value]
    if endpoint:
        command += ["--endpoint", endpoint]
    if config_file:
        command += ["--config", config_file]
    return command


@click.command("mount")
@click.argument("mount_point", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground (logs on stderr).")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]", help=_OPTIONS_HELP)
@click.option(
    "--supervise",
    is_flag=True,
    help="Run the filesystem under a supervisor that remounts it if its process dies.",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Log file of the background process (default: a file in $XDG_RUNTIME_DIR or /tmp).",
)
@click.option("--endpoint", envvar="DEPOT_ENDPOINT", help=_ENDPOINT_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
def mount(
    mount_point: str,
    foreground: bool,
    options: tuple[str, ...],
    supervise: bool,
    log_file: str | None,
    endpoint: str | None,
    config_file: str | None,
) -> None:
    """Mount the depot namespace on MOUNT_POINT (read-only unless -o rw)."""
    from depot.fuse.mounts import canonical, check_mount_point
    from depot.fuse.options import parse_options
    from depot.fuse.serve import MountRequest, import_pyfuse3, run
    from depot.fuse.supervise import READY_FD_ENV, read_ready, report_ready, start, stop_process
    from depot.fuse.supervise import supervise as run_supervisor

    with cli_errors():
        mount_point = canonical(mount_point)
        settings, kernel = parse_options(options)
        config_file = _config_path(config_file)
        config: DepotConfig = load_config(config_file, overrides={"fuse": settings})
        import_pyfuse3()
        try:
            check_mount_point(mount_point)
        except DepotError as exc:
            report_ready(str(exc))
            raise
        if not foreground:
            log_path = os.path.abspath(log_file or _default_log(mount_point))
            command = _child_command(
                mount_point, options, endpoint, config_file, supervise=supervise
            )
            with open(log_path, "ab") as log_out:
                proc, ready_fd = start(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_out,
                    stderr=log_out,
                    cwd="/",
                    start_new_session=True,
                )
            message = read_ready(ready_fd)
            if message != "ok":
                stop_process(proc)
                raise CliError(message or f"the mount process exited (log: {log_path})")
            shown = endpoint or os.environ.get("DEPOT_ENDPOINT") or config.client.endpoint
            click.echo(
                f"depot: mounted {shown or 'the cluster'} on {mount_point} "
                f"(pid {proc.pid}, log {log_path}); unmount with: depot unmount {mount_point}"
            )
            return
        _setup_logging(config.log_level)
        ready_fd_given = READY_FD_ENV in os.environ

        def ready(message: str | None) -> None:
            report_ready(message)
            if message is None and not ready_fd_given:
                click.echo(
                    f"depot: mounted on {mount_point}; press Ctrl-C (or run 'depot unmount "
                    f"{mount_point}') to unmount",
                    err=True,
                )

        if supervise:
            command = _child_command(mount_point, options, endpoint, config_file, supervise=False)
            code = run_supervisor(command, mount_point, ready)
            if code:
                raise CliError(f"mounting {mount_point} failed (see the log above)")
            return
        request = MountRequest(mount_point, config, endpoint, kernel)
        try:
            run(request, ready)
        except DepotError as exc:
            report_ready(str(exc))
            raise


@click.command("unmount")
@click.argument("mount_point", type=click.Path(file_okay=False))
@click.option(
    "-z",
    "--lazy",
    is_flag=True,
    help="Detach now even if files are open; they keep working until closed.",
)
def unmount(mount_point: str, lazy: bool) -> None:
    """Unmount a depot mount (also clears a stale one whose process died)."""
    from depot.fuse.mounts import canonical
    from depot.fuse.mounts import unmount as do_unmount

    with cli_errors():
        mount_point = canonical(mount_point)
        do_unmount(mount_point, lazy=lazy)
        click.echo(f"depot: unmounted {mount_point}" + (" (detached)" if lazy else ""))


def register(cli_group: click.Group) -> None:
    """Add ``mount`` and ``unmount`` to the ``depot`` command group."""
    cli_group.add_command(mount)
    cli_group.add_command(unmount)


def _main() -> None:
    group = click.Group("depot", context_settings={"help_option_names": ["-h", "--help"]})
    register(group)
    group.main(prog_name="depot", standalone_mode=True)


if __name__ == "__main__":
    _main()

__all__ = ["mount", "register", "unmount"]
