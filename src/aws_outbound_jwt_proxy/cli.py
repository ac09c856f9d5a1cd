"""Console entry point: the proxy by default, or a named sub-command.

Only what the chosen command needs is imported: a sub-command never loads the
proxy, and a configuration mistake is reported before the serving stack loads.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

PROG = "aws-outbound-jwt-proxy"

# name → ("module:function" taking the remaining argv and returning the exit status, summary).
# The proxy's usage line and --help list these, so a new command is one row here.
COMMANDS: dict[str, tuple[str, str]] = {
    "sts-emulator": (
        "aws_outbound_jwt_proxy.devtools.emulator.cli:main",
        "local STS emulator for development and tests",
    ),
    "echo-upstream": (
        "aws_outbound_jwt_proxy.devtools.echo:main",
        "test upstream that echoes requests and verifies their JWT",
    ),
    "demo": (
        "aws_outbound_jwt_proxy.devtools.demo:main",
        "emulator + verifying upstream + proxy, one request through",
    ),
    "dev-ca": (
        "aws_outbound_jwt_proxy.devtools.devca:main",
        "create a local CA for HTTPS interception (--intercept-ca-cert)",
    ),
    "version": ("aws_outbound_jwt_proxy.cli:version", "print the version and exit (also --version)"),
}

log = logging.getLogger("aws_outbound_jwt_proxy.cli")


def version_line() -> str:
    from . import __version__

    return f"{PROG} {__version__}"


def version(argv: list[str]) -> int:
    """``aws-outbound-jwt-proxy version``: print ``aws-outbound-jwt-proxy <version>``."""
    from .config import flags

    flags.parse(f"{PROG} version", "Print the version and exit.", (), argv, {})
    sys.stdout.write(version_line() + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, _, function = COMMANDS[args[0]][0].partition(":")
        run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return run(args[1:])
    from .config import envcheck, flags
    from .config import settings as config

    try:
        settings = config.load(
            args,
            os.environ,
            commands={name: summary for name, (_, summary) in COMMANDS.items()},
            version=version_line(),
        )
    except flags.ConfigError as exc:
        flags.fail(config.PROG, exc)
    # Imported only now: a config mistake is reported before the stack loads.
    from .observe import logs

    logs.setup(settings.log_level, settings.log_format)
    envcheck.warn(os.environ, log)
    if settings.workers > 1:
        from .server import workers  # the supervisor: the serving stack loads in the workers only

        return workers.main(settings)
    from .server import serve

    return serve.main(settings)  # sets logging up again, the same way
