"""``python -m aws_outbound_jwt_proxy`` — same as the console script."""

from .cli import main

raise SystemExit(main())
