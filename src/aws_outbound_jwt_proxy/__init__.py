"""aws-outbound-jwt-proxy: outbound requests signed with AWS STS web identity JWTs."""

__version__ = "0.1.0"
