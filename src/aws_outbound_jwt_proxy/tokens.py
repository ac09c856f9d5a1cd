"""Tokens: the interface request handlers use to get a JWT for an audience set.

(The supervisor, cache and STS client land here; see issue 4.)
"""

from __future__ import annotations

from typing import Protocol


class TokenUnavailable(Exception):
    """No valid token for the set. ``error_class`` is the AWS error code or ``transport``.

    The message never carries AWS error text or token material: handlers answer
    ``502 token unavailable`` and log ``error_class``.
    """

    def __init__(self, error_class: str) -> None:
        super().__init__(error_class)
        self.error_class = error_class


class TokenSource(Protocol):
    async def get(self, audiences: tuple[str, ...]) -> str:
        """A valid JWT for the normalized (sorted, de-duplicated) audience set.

        Raises :class:`TokenUnavailable`. Cancel-safe.
        """
        ...
