"""Command-line flags that fall back to environment variables, Go-flag style.

Every command (the proxy, ``sts-emulator``, ``echo-upstream``, ``demo``)
declares its flags as :class:`Flag` rows. :func:`parse` reads argv, then the
environment (``--upstream-host`` ↔ ``UPSTREAM_HOST``), then the default, and
returns raw strings. Turning them into typed settings is each command's job;
a bad value raises :class:`ConfigError`, which :func:`fail` prints as one line
naming the flag before exiting with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

EXIT_USAGE = 2


class ConfigError(Exception):
    """A configuration mistake, tied to the flag that caused it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


@dataclass(frozen=True)
class Flag:
    """One flag: ``name`` without dashes (``upstream-host``)."""

    name: str
    default: str
    help: str
    repeatable: bool = False
    env_list: bool = False  # env value is a comma-separated list
    boolean: bool = False
    metavar: str | None = None
    no_env: bool = False
    env_name: str | None = None  # when the env var is not the derived name

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return self.env_name or self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def prefixed(prefix: str, rows: Sequence[Flag]) -> tuple[Flag, ...]:
    """The same flags reading ``PREFIX_NAME`` env vars, so a helper command never
    picks up the proxy's settings (``LISTEN_ADDR``, ``LOG_LEVEL``) from a shared environment."""
    return tuple(replace(row, env_name=prefix + row.env) for row in rows)


Raw = dict[str, "str | list[str]"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage plus a line; we want exactly one line.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _help_for(flag: Flag) -> str:
    env = "" if flag.no_env else f" [env {flag.env}" + (", comma-separated" if flag.env_list else "")
    if not flag.no_env:
        env += "]"
    default = f" (default {flag.default!r})" if flag.default != "" else ""
    many = " Repeatable." if flag.repeatable else ""
    return f"{flag.help}{many}{env}{default}".replace("%", "%%")


def build_parser(prog: str, description: str, flags: Sequence[Flag]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag in flags:
        # Go's flag package accepts -name as well as --name.
        names = [flag.option, f"-{flag.name}"]
        if flag.boolean:
            parser.add_argument(
                *names,
                dest=flag.dest,
                nargs="?",
                const="true",
                default=None,
                metavar="BOOL",
                help=_help_for(flag),
            )
        elif flag.repeatable:
            parser.add_argument(
                *names,
                dest=flag.dest,
                action="append",
                default=None,
                metavar=flag.metavar or "VALUE",
                help=_help_for(flag),
            )
        else:
            parser.add_argument(
                *names,
                dest=flag.dest,
                default=None,
                metavar=flag.metavar or "VALUE",
                help=_help_for(flag),
            )
    return parser


def parse(
    prog: str,
    description: str,
    flags: Sequence[Flag],
    argv: Sequence[str],
    env: Mapping[str, str],
) -> Raw:
    """Flag on the command line, else env var, else default: raw strings."""
    parser = build_parser(prog, description, flags)
    ns = parser.parse_args(list(argv))
    raw: Raw = {}
    for flag in flags:
        value = getattr(ns, flag.dest)
        if value is None and not flag.no_env and flag.env in env:
            env_value = env[flag.env]
            if flag.repeatable:
                value = split_list(env_value) if flag.env_list else [env_value]
            else:
                value = env_value
        if value is None:
            value = split_list(flag.default) if flag.repeatable else flag.default
        raw[flag.name] = value
    return raw


def split_list(value: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an empty string → ``[]``.

    Empty items are kept (``"a,,b"`` → ``["a", "", "b"]``) so validation can
    reject them instead of silently dropping what may be a typo.
    """
    if value.strip() == "":
        return []
    return [part.strip() for part in value.split(",")]


def parse_bool(flag: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise ConfigError(f"--{flag}", f"invalid boolean {value!r} (use true or false)")


def fail(prog: str, error: ConfigError) -> NoReturn:
    """Print the one-line configuration error and exit with status 2."""
    sys.stderr.write(f"{prog}: error: {error}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


def parse_listen_addr(flag: str, value: str, *, allow_empty_host: bool = True) -> tuple[str, int]:
    """``host:port`` / ``:port`` / ``[::1]:port`` → (host, port); ``""`` host = all interfaces."""
    v = value.strip()
    if not v:
        raise ConfigError(f"--{flag}", "must not be empty (use host:port, e.g. :8080)")
    if v.startswith("["):
        end = v.find("]")
        if end < 0 or not v[end + 1 :].startswith(":"):
            raise ConfigError(f"--{flag}", f"invalid address {value!r} (use [v6addr]:port)")
        host, port_s = v[1:end], v[end + 2 :]
    else:
        if ":" not in v:
            raise ConfigError(f"--{flag}", f"invalid address {value!r} (missing :port)")
        host, _, port_s = v.rpartition(":")
        if ":" in host:
            raise ConfigError(f"--{flag}", f"invalid address {value!r} (bracket IPv6 hosts)")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"--{flag}", f"invalid port in {value!r}")
    if not host and not allow_empty_host:
        raise ConfigError(f"--{flag}", f"missing host in {value!r}")
    return host, int(port_s)


def bind_string(host: str, port: int) -> str:
    """A hypercorn ``bind`` entry; empty host means every IPv4 interface."""
    if not host:
        host = "0.0.0.0"
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
