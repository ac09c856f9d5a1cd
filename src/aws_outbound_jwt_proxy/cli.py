"""Console entry point: the proxy by default, or a named sub-command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name → module whose ``main(argv) -> int`` runs it
COMMANDS = {
    "sts-emulator": "aws_outbound_jwt_proxy.devtools.emulator.cli",
    "echo-upstream": "aws_outbound_jwt_proxy.devtools.echo",
    "demo": "aws_outbound_jwt_proxy.devtools.demo",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[args[0]])
        run: Callable[[list[str]], int] = module.main
        return run(args[1:])
    from .config import flags
    from .config import settings as config

    try:
        settings = config.load(args)
    except flags.ConfigError as exc:
        flags.fail(config.PROG, exc)
    # Imported only now: a config mistake is reported before the stack loads.
    from .server import serve

    return serve.main(settings)
