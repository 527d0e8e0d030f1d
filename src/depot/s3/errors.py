"""S3 errors: the code, HTTP status and message that S3 clients expect, and their XML body.

The gateway raises ``S3Error`` for everything it refuses itself (authentication, malformed
requests, missing buckets) and maps the ``DepotError`` hierarchy of the layers below onto S3 codes
with ``from_depot_error``; nothing else reaches a client (an unexpected exception is an
``InternalError`` and is logged).
"""

from __future__ import annotations

import os
from email.utils import formatdate

from depot.core.errors import (
    DepotError,
    InvalidArgument,
    InvalidPath,
    InvalidRange,
    IsADirectory,
    NotADirectory,
    NotFound,
    PermissionDenied,
    RequestTooLarge,
    StaleVersion,
    Throttled,
    Unavailable,
    Unsupported,
)
from depot.s3.responses import XML_HEADER, xml_text

# code -> (HTTP status, AWS's own message)
CODES: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (
        400,
        "Error parsing the X-Amz-Credential parameter; the query-string authentication "
        "parameters are malformed.",
    ),
    "BadDigest": (400, "The Content-MD5 you specified did not match what was received."),
    "EntityTooLarge": (413, "Your proposed upload exceeds the maximum allowed object size."),
    "BucketAlreadyOwnedByYou": (
        409,
        "Your previous request to create the named bucket succeeded and you already own it.",
    ),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty"),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed object size."),
    "IncompleteBody": (
        400,
        "You did not provide the number of bytes specified by the Content-Length HTTP header",
    ),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidDigest": (400, "The Content-MD5 you specified was invalid."),
    "InvalidPart": (
        400,
        "One or more of the specified parts could not be found. The part might not have been "
        "uploaded, or the specified entity tag might not have matched the part's entity tag.",
    ),
    "InvalidPartOrder": (
        400,
        "The list of parts was not in ascending order. Parts must be ordered by part number.",
    ),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "NoSuchUpload": (
        404,
        "The specified upload does not exist. The upload ID may be invalid, or the upload may "
        "have been aborted or completed.",
    ),
    "InvalidAccessKeyId": (
        403,
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidPartNumber": (416, "The requested partnumber is not satisfiable"),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "KeyTooLongError": (400, "Your key is too long"),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate."),
    "MetadataTooLarge": (
        400,
        "Your metadata headers exceed the maximum allowed metadata size.",
    ),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingSecurityHeader": (400, "Your request is missing a required header."),
    "NoSuchBucket": (404, "The specified bucket does not exist"),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NotImplemented": (
        501,
        "A header you provided implies functionality that is not implemented",
    ),
    "NotModified": (304, "Not Modified"),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold"),
    "RequestHeaderSectionTooLarge": (400, "Your request header section exceeds the maximum allowed size."),
    "RequestTimeout": (
        400,
        "Your socket connection to the server was not read from or written to within the "
        "timeout period.",
    ),
    "RequestTimeTooSkewed": (
        403,
        "The difference between the request time and the current time is too large.",
    ),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
    "SignatureDoesNotMatch": (
        403,
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    ),
    "SlowDown": (503, "Please reduce your request rate."),
    "TemporaryRedirect": (
        307,
        "Please re-send this request to the specified temporary endpoint. Continue to use the "
        "original request endpoint for future requests.",
    ),
    "XAmzContentSHA256Mismatch": (
        400,
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    ),
}


class S3Error(Exception):
    """An S3 error response: ``code``, ``status``, ``message`` and extra XML fields."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        headers: list[tuple[str, str]] | None = None,
        extra: dict[str, str] | None = None,
        **fields: str,
    ) -> None:
        default_status, default_message = CODES.get(code, (500, code))
        self.code = code
        self.status = status if status is not None else default_status
        self.message = message if message is not None else default_message
        self.fields = {**(extra or {}), **fields}
        self.headers = headers or []
        super().__init__(f"{code}: {self.message}")

    def to_xml(self, resource: str, request_id: str, host_id: str) -> bytes:
        parts = [
            XML_HEADER,
            "<Error><Code>",
            xml_text(self.code),
            "</Code><Message>",
            xml_text(self.message),
            "</Message>",
        ]
        for name, value in self.fields.items():
            parts.append(f"<{name}>{xml_text(value)}</{name}>")
        parts.append(f"<Resource>{xml_text(resource)}</Resource>")
        parts.append(f"<RequestId>{request_id}</RequestId><HostId>{host_id}</HostId></Error>")
        return "".join(parts).encode("utf-8")


def from_depot_error(error: DepotError, bucket: str | None, key: str | None) -> S3Error:
    """The S3 error a failure of the layers below stands for, for an operation on bucket/key."""
    fields: dict[str, str] = {}
    if bucket:
        fields["BucketName"] = bucket
    if isinstance(error, (NotFound, IsADirectory, NotADirectory)):
        if key:
            return S3Error("NoSuchKey", Key=key, extra=fields)
        return S3Error("NoSuchBucket", extra=fields)
    if isinstance(error, InvalidRange):
        return S3Error("InvalidRange", extra=fields)
    if isinstance(error, InvalidPath):
        return S3Error("InvalidArgument", f"key is not allowed: {error.message}", extra=fields)
    if isinstance(error, RequestTooLarge):
        return S3Error("InvalidRequest", error.message, extra=fields)
    if isinstance(error, InvalidArgument):
        return S3Error("InvalidArgument", error.message, extra=fields)
    if isinstance(error, PermissionDenied):
        return S3Error("AccessDenied", extra=fields)
    if isinstance(error, Throttled):
        return S3Error("SlowDown", headers=[("Retry-After", "1")])
    if isinstance(error, StaleVersion):
        # The object changed under a read twice in a row: ask the client to retry.
        return S3Error(
            "ServiceUnavailable", "The object changed while it was read; retry.",
            headers=[("Retry-After", "1")],
        )
    if isinstance(error, Unavailable):
        return S3Error(
            "ServiceUnavailable", "The storage behind the gateway is unavailable; retry.",
            headers=[("Retry-After", "1")],
        )
    if isinstance(error, Unsupported):
        return S3Error("NotImplemented", error.message)
    return S3Error("InternalError")


# Statuses the HTTP server itself answers (malformed requests) -> S3 codes.
PROTOCOL_CODES = {
    400: "InvalidRequest",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    411: "MissingContentLength",
    413: "EntityTooLarge",
    431: "RequestHeaderSectionTooLarge",
    501: "NotImplemented",
    505: "InvalidRequest",
}


def protocol_error(status: int, message: str) -> tuple[bytes, list[tuple[str, str]]]:
    """The S3 XML answer to a request the HTTP server refused before any handler ran."""
    error = S3Error(PROTOCOL_CODES.get(status, "InvalidRequest"), message, status=status)
    request_id = os.urandom(8).hex().upper()
    body = error.to_xml("", request_id, "depot")
    return body, [
        ("x-amz-request-id", request_id),
        ("Date", formatdate(usegmt=True)),
        ("Content-Type", "application/xml"),
    ]
