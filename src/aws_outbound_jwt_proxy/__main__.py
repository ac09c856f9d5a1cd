"""``python -m aws_outbound_jwt_proxy`` — same as the console script."""

from .cli import main

if __name__ == "__main__":  # not when a --workers process re-imports this module as __mp_main__
    raise SystemExit(main())
