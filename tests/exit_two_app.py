"""An ASGI app module whose import exits 2: a worker failing the way hypercorn's supervisor ignores."""

raise SystemExit(2)
