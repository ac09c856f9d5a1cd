"""aws-outbound-jwt-proxy: outbound requests signed with AWS STS web identity JWTs.

``__version__`` is the installed distribution's version, looked up on first
use: importing the package stays cheap (every sub-command and the hypercorn
worker import it; few of them need the version).
"""

DISTRIBUTION = "aws-outbound-jwt-proxy"
_version: str | None = None


def __getattr__(name: str) -> str:
    if name == "__version__":
        global _version
        if _version is None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                _version = version(DISTRIBUTION)
            except PackageNotFoundError:  # a source tree that was never installed
                _version = "0+unknown"
        return _version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
