"""STS error codes: each code's HTTP status and fault type, and the exception that carries one."""

from __future__ import annotations

# code → (HTTP status, Type). Unknown codes are 400 Sender.
CODES: dict[str, tuple[int, str]] = {
    "ValidationError": (400, "Sender"),
    "InvalidAction": (400, "Sender"),
    "MissingAction": (400, "Sender"),
    "InvalidParameterValue": (400, "Sender"),
    "IncompleteSignature": (400, "Sender"),
    "MissingAuthenticationToken": (403, "Sender"),
    "InvalidClientTokenId": (403, "Sender"),
    "SignatureDoesNotMatch": (403, "Sender"),
    "ExpiredToken": (403, "Sender"),
    "AccessDenied": (403, "Sender"),
    "OutboundWebIdentityFederationDisabledException": (403, "Sender"),
    "OutboundWebIdentityFederationDisabled": (403, "Sender"),
    "SessionDurationEscalationException": (403, "Sender"),
    "JWTPayloadSizeExceededException": (400, "Sender"),
    "Throttling": (400, "Sender"),
    "ThrottlingException": (400, "Sender"),
    "InternalFailure": (500, "Receiver"),
    "ServiceUnavailable": (503, "Receiver"),
}

# What AWS says for each code when a fault gives no message of its own.
MESSAGES: dict[str, str] = {
    "AccessDenied": "User is not authorized to perform: sts:GetWebIdentityToken",
    "OutboundWebIdentityFederationDisabledException": "Outbound web identity federation is disabled",
    "OutboundWebIdentityFederationDisabled": "Outbound web identity federation is disabled",
    "SessionDurationEscalationException": "The requested token duration would extend the session",
    "JWTPayloadSizeExceededException": "The requested token payload size exceeds the maximum allowed size",
    "Throttling": "Rate exceeded",
    "ThrottlingException": "Rate exceeded",
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the signature you provided.",
    "ExpiredToken": "The security token included in the request is expired",
    "InternalFailure": "The request processing has failed because of an unknown error.",
    "ServiceUnavailable": "Service is unable to handle request.",
}


def status_and_type(code: str) -> tuple[int, str]:
    """HTTP status and ``Sender``/``Receiver`` for an AWS error code."""
    return CODES.get(code, (400, "Sender"))


class StsError(Exception):
    """An STS error response: ``code`` (``ValidationError``), HTTP ``status``, ``type``, ``message``."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message or MESSAGES.get(code, code)
        self.status, self.type = status_and_type(code)
