"""Typed command-line flags that fall back to environment variables, Go-flag style.

A command declares each setting once, as a row of its flag table: a
:class:`Flag` (one value) or a :class:`ListFlag` (repeatable) with its name,
default, help and a *parse* function turning the text into the typed value.
The same table builds the argparse parser (and so ``--help``) and, through
:func:`parse`, the typed values: command line first, then the environment
(``--upstream-host`` ↔ ``UPSTREAM_HOST``), then the default.

A parse function raises ``ValueError`` with a short message; :func:`parse`
turns it into a :class:`ConfigError` naming what the user set — the flag when
the value came from the command line, the environment variable when it came
from there — and :func:`fail` prints that as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields, replace
from typing import Any, Generic, NoReturn, TypeVar

EXIT_USAGE = 2

T = TypeVar("T")
D = TypeVar("D")


class ConfigError(Exception):
    """A configuration mistake, tied to what the user set.

    ``flag`` is the name to show: ``--upstream-timeout`` for a value from the
    command line (or a default), ``UPSTREAM_TIMEOUT`` for one from the environment.
    """

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


class _Names:
    """The spellings of one row: ``--name``, ``-name``, ``NAME`` and the argparse dest."""

    name: str
    no_env: bool
    env_name: str | None
    into: str | tuple[str, ...] | None

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return self.env_name or self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def targets(self) -> tuple[str, ...]:
        """Attribute(s) of the settings object the value goes to; a tuple value is spread over several."""
        if self.into is None:
            return (self.dest,)
        return (self.into,) if isinstance(self.into, str) else self.into


@dataclass(frozen=True)
class Flag(_Names, Generic[T]):
    """A flag taking one value; ``parse`` gets the text (flag, env var or ``default``)."""

    name: str  # without dashes: "upstream-host"
    default: str  # as a user would type it; shown in --help
    parse: Callable[[str], T]
    help: str
    _: KW_ONLY
    into: str | tuple[str, ...] | None = None
    boolean: bool = False  # "--name" alone means true
    metavar: str | None = None
    no_env: bool = False
    env_name: str | None = None  # when the env var is not the derived name


@dataclass(frozen=True)
class ListFlag(_Names, Generic[T]):
    """A repeatable flag; ``parse`` gets every value in order (the env var is a comma list)."""

    name: str
    default: str  # comma-separated, "" = none
    parse: Callable[[list[str]], T]
    help: str
    _: KW_ONLY
    into: str | tuple[str, ...] | None = None
    env_list: bool = True  # env value is a comma-separated list (else one item)
    metavar: str | None = None
    no_env: bool = False
    env_name: str | None = None


Row = Flag[Any] | ListFlag[Any]


def prefixed(prefix: str, rows: Sequence[Row]) -> tuple[Row, ...]:
    """The same flags reading ``PREFIX_NAME`` env vars, so a helper command never
    picks up the proxy's settings (``LISTEN_ADDR``, ``LOG_LEVEL``) from a shared environment."""
    return tuple(replace(row, env_name=prefix + row.env) for row in rows)


# ---- the parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus a line; we want exactly one line.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _help_for(row: Row) -> str:
    env = ""
    if not row.no_env:
        listed = ", comma-separated" if isinstance(row, ListFlag) and row.env_list else ""
        env = f" [env {row.env}{listed}]"
    default = f" (default {row.default!r})" if row.default != "" else ""
    many = " Repeatable." if isinstance(row, ListFlag) else ""
    return f"{row.help}{many}{env}{default}".replace("%", "%%")


def build_parser(
    prog: str,
    description: str,
    rows: Sequence[Row],
    *,
    usage: str | None = None,
    epilog: str | None = None,
    version: str | None = None,
) -> argparse.ArgumentParser:
    """One ``--name`` option per row (listed in ``--help``), plus Go's ``-name`` spelling (not listed)."""
    parser = _Parser(
        prog=prog,
        description=description,
        usage=usage,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for row in rows:
        kwargs: dict[str, Any] = {"dest": row.dest, "default": None}
        if isinstance(row, ListFlag):
            kwargs.update(action="append", metavar=row.metavar or "VALUE")
        elif row.boolean:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=row.metavar or "VALUE")
        parser.add_argument(row.option, help=_help_for(row), **kwargs)
        # Go's flag package accepts -name as well as --name: command lines written
        # for the Go tool keep working, but --help lists each flag once.
        parser.add_argument(f"-{row.name}", help=argparse.SUPPRESS, **kwargs)
    if version is not None:
        parser.add_argument("--version", action="version", version=version, help="print the version and exit")
    return parser


# ---- parsing ---------------------------------------------------------------------------


class Values:
    """Typed values of one command's flags, and where each came from."""

    def __init__(
        self, rows: Sequence[Row], values: dict[str, Any], names: dict[str, str], from_env: dict[str, bool]
    ) -> None:
        self._rows = {row.name: row for row in rows}  # as parsed: with their env prefix
        self._values = values
        self._names = names
        self._from_env = from_env

    def __getitem__(self, row: Flag[T] | ListFlag[T]) -> T:
        value: T = self._values[row.name]
        return value

    def name(self, row: Row, *, like: Row | None = None) -> str:
        """How the user set ``row``: ``--flag``, or ``ENV_VAR`` if it came from the environment.

        A value left at its default is named the way ``like`` was set, so an
        error about a pair (``--tls-cert`` without ``--tls-key``) speaks the
        user's language: ``TLS_KEY`` when they used environment variables.
        """
        if row.name in self._names:
            return self._names[row.name]
        parsed = self._rows[row.name]
        if like is not None and self._from_env.get(like.name) and not parsed.no_env:
            return parsed.env
        return parsed.option

    def fields(self) -> dict[str, Any]:
        """Keyword arguments for the settings object: each row's value under its field name(s)."""
        out: dict[str, Any] = {}
        for row in self._rows.values():
            value = self._values[row.name]
            if len(row.targets) == 1:
                out[row.targets[0]] = value
            else:
                out.update(zip(row.targets, value, strict=True))
        return out

    def build(self, make: Callable[..., D]) -> D:
        """``make(**fields)`` with the fields ``make`` (a dataclass) declares; the others are left out."""
        taken = {f.name for f in fields(make)}  # type: ignore[arg-type]
        return make(**{k: v for k, v in self.fields().items() if k in taken})


def parse(
    prog: str,
    description: str,
    rows: Sequence[Row],
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    usage: str | None = None,
    epilog: str | None = None,
    version: str | None = None,
) -> Values:
    """Flag on the command line, else env var, else default; each parsed into its typed value.

    argparse itself exits 2 on an unknown flag; a bad value raises
    :class:`ConfigError` naming the flag or the env var it came from.
    """
    parser = build_parser(prog, description, rows, usage=usage, epilog=epilog, version=version)
    ns = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    from_env: dict[str, bool] = {}
    for row in rows:
        given = _dashes_restored(getattr(ns, row.dest), isinstance(row, ListFlag))
        if given is not None:
            text, name = given, row.option
        elif not row.no_env and row.env in env:
            text, name = env[row.env], row.env
            if isinstance(row, ListFlag):
                text = split_list(text) if row.env_list else [text]
            from_env[row.name] = True
        else:
            text, name = row.default, None
            if isinstance(row, ListFlag):
                text = split_list(text)
        try:
            values[row.name] = row.parse(text)
        except ValueError as exc:
            raise ConfigError(name or row.option, str(exc)) from None
        if name is not None:
            names[row.name] = name
    return Values(rows, values, names, from_env)


def _dashes_restored(given: Any, repeatable: bool) -> Any:
    """argparse (3.11) turns the value of ``--flag=--`` into ``[]``; it was ``--``.

    Put it back, so the flag's own check refuses it with a one-line error instead
    of the parser getting a list where it expects text.
    """
    if repeatable and isinstance(given, list):
        return ["--" if item == [] else item for item in given]
    if given == []:
        return "--"
    return given


def split_list(value: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an empty string → ``[]``.

    Empty items are kept (``"a,,b"`` → ``["a", "", "b"]``) so validation can
    reject them instead of silently dropping what may be a typo.
    """
    if value.strip() == "":
        return []
    return [part.strip() for part in value.split(",")]


def print_error(prog: str, error: ConfigError) -> None:
    """Print the one-line configuration error to stderr."""
    sys.stderr.write(f"{prog}: error: {error}\n")
    sys.stderr.flush()


def fail(prog: str, error: ConfigError) -> NoReturn:
    """Print the one-line configuration error and exit with status 2."""
    print_error(prog, error)
    raise SystemExit(EXIT_USAGE)


def bind_string(host: str, port: int) -> str:
    """A hypercorn ``bind`` entry; empty host means every IPv4 interface."""
    if not host:
        host = "0.0.0.0"
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
