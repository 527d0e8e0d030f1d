"""How every ``depot`` command fails: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from depot.core.errors import DepotError


class CliError(click.ClickException):
    """One clear line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"depot: error: {self.format_message()}", err=True)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn every expected failure into one line, never a traceback."""
    try:
        yield
    except click.ClickException:
        raise
    except DepotError as exc:
        raise CliError(str(exc)) from None
    except FileNotFoundError as exc:
        raise CliError(f"not found: {exc.filename or exc}") from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CliError(f"{exc.strerror or exc}{where}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
