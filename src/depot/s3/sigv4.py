"""AWS Signature Version 4 for S3: verification of signed headers and presigned URLs.

The rules (AWS "Signature Version 4 signing process", S3 flavour):

- canonical request = method, canonical URI, canonical query string, canonical headers, the
  signed header names and the payload hash, joined by newlines;
- the canonical URI of S3 is the path as sent, URI-encoded once (S3 does not normalize ``.``
  segments or double-encode, unlike other services); each byte other than the unreserved
  ``A-Z a-z 0-9 - _ . ~`` (and ``/`` in the path) is ``%XX`` in upper case;
- the canonical query string is every parameter (but ``X-Amz-Signature`` of a presigned URL),
  name and value URI-encoded (``/`` too), sorted by name then value, ``name=value`` joined with
  ``&``; a parameter without a value is ``name=``;
- canonical headers are ``name:value`` lines for each signed header, names in lower case and
  sorted, values trimmed with inner runs of spaces folded into one;
- the payload hash is the ``x-amz-content-sha256`` header (a hex SHA-256, ``UNSIGNED-PAYLOAD``
  or ``STREAMING-...``), or ``UNSIGNED-PAYLOAD`` for a presigned URL;
- string to sign = ``AWS4-HMAC-SHA256``, the request time (``YYYYMMDDTHHMMSSZ``), the scope
  ``date/region/s3/aws4_request`` and the hex SHA-256 of the canonical request;
- signing key = HMAC chain of ``"AWS4" + secret`` over date, region, service, ``aws4_request``
  (cached per scope: it changes once a day).

Clients do not all encode the path and the query the same way, so when the signature does not
match the canonical forms, the forms exactly as the client sent them are tried too; a match on
any form proves the client holds the secret for that very request.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_tz
from urllib.parse import quote, unquote

from depot.s3.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SERVICE = "s3"
TERMINATOR = "aws4_request"
MAX_EXPIRES = 7 * 24 * 3600
MAX_QUERY_PARAMS = 100
# Set on the Location of a read redirected to its owner's gateway (depot.s3.redirects): that
# gateway serves it and never redirects again. Signed into the presigned Location, so a client
# that follows the redirect with its Authorization header too is verified by the query alone.
REDIRECT_PARAM = "x-depot-redirected"
# The query parameters of a presigned URL (dropped from a request before it is presigned anew).
PRESIGN_PARAMS = frozenset({
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
    "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token", "X-Amz-Content-Sha256",
})
_HEX = frozenset("0123456789abcdef")


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """Percent-encode every byte but ``A-Za-z0-9-_.~`` (and ``/`` if ``keep_slash``)."""
    return quote(text, safe="/~" if keep_slash else "~")


def parse_query(query: str) -> list[tuple[str, str]]:
    """The decoded (name, value) pairs of a query string, in order; ``InvalidArgument`` if bad.

    ``+`` is a literal plus (RFC 3986), as S3 SDKs encode spaces as ``%20``.
    """
    if not query:
        return []
    parts = [p for p in query.split("&") if p]
    if len(parts) > MAX_QUERY_PARAMS:
        raise S3Error("InvalidArgument", f"too many query parameters (more than {MAX_QUERY_PARAMS})")
    pairs: list[tuple[str, str]] = []
    try:
        for part in parts:
            name, _, value = part.partition("=")
            pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
    except UnicodeDecodeError:
        raise S3Error("InvalidArgument", "the query string is not valid UTF-8") from None
    return pairs


def canonical_query(pairs: list[tuple[str, str]], *, skip: str | None = None) -> str:
    encoded = sorted(
        (uri_encode(name), uri_encode(value)) for name, value in pairs if name != skip
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def raw_canonical_query(query: str, *, skip: str | None = None) -> str:
    """The query's pairs exactly as sent (still encoded), sorted: botocore's own form."""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if skip is not None and unquote(name) == skip:
            continue
        pairs.append((name, value))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_header_value(value: str) -> str:
    return " ".join(value.split())


def canonical_request(
    method: str,
    uri: str,
    query: str,
    headers: Mapping[str, str],
    signed_headers: list[str],
    payload_hash: str,
) -> str:
    lines = [f"{name}:{canonical_header_value(headers.get(name, ''))}\n" for name in signed_headers]
    return "\n".join(
        [method, uri, query, "".join(lines), ";".join(signed_headers), payload_hash]
    )


def string_to_sign(amz_date: str, scope: str, request: str) -> str:
    digest = hashlib.sha256(request.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def derive_signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    k_date = _hmac(("AWS4" + secret).encode("utf-8"), date)
    return _hmac(_hmac(_hmac(k_date, region), service), TERMINATOR)


def parse_amz_date(value: str) -> float | None:
    """Seconds since the epoch of ``20130524T000000Z``; None if malformed."""
    if len(value) != 16 or value[8] != "T" or value[15] != "Z":
        return None
    try:
        return float(calendar.timegm(time.strptime(value, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


def http_date_to_amz(value: str) -> str | None:
    """An RFC 1123 ``Date`` header in the ``YYYYMMDDTHHMMSSZ`` form of SigV4; None if bad."""
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    try:
        ts = calendar.timegm(parsed[:9]) - (parsed[9] or 0)
    except (OverflowError, ValueError):
        return None
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass(slots=True)
class SignedRequest:
    """What the verifier needs of one HTTP request."""

    method: str
    raw_path: str  # as sent, still percent-encoded
    path: str  # decoded once
    query: str  # raw query string
    params: list[tuple[str, str]]  # decoded query pairs
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""
    # The body streams to the handler after verification (writes): the payload hash is
    # checked by the handler as the bytes arrive (depot.s3.bodies), not here.
    streamed: bool = False
    # Set by a verified Authorization header: what aws-chunked chunk signatures chain from.
    signing_key: bytes | None = None
    seed_signature: str | None = None
    scope: str = ""
    amz_date: str = ""


class SigV4Verifier:
    """Checks SigV4 signatures against known keys; returns the caller's access key.

    ``anonymous`` lets requests without any signature through (as ``None``); a request that
    carries a signature is always verified, so a wrong key never reads data.
    """

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        anonymous: bool = False,
        clock_skew: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = dict(credentials)
        self.anonymous = anonymous
        self.clock_skew = clock_skew
        self._clock = clock
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def signing_key(self, secret: str, date: str, region: str, service: str) -> bytes:
        cache_key = (secret, date, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= 256:
                self._keys.clear()
            key = derive_signing_key(secret, date, region, service)
            self._keys[cache_key] = key
        return key

    # entry point ---------------------------------------------------------------------------------
    def verify(self, request: SignedRequest) -> str | None:
        auth = request.headers.get("authorization")
        names = {name for name, _ in request.params}
        presigned = "X-Amz-Algorithm" in names or "X-Amz-Signature" in names
        if auth is not None and presigned and REDIRECT_PARAM in names:
            # A presigned redirect (signed by a gateway) followed by a client that kept its
            # Authorization header, signed for the host it left: the query proves the request.
            auth = None
        if auth is not None and presigned:
            raise S3Error("InvalidArgument", "Only one auth mechanism allowed; only the "
                          "X-Amz-Algorithm query parameter or the Authorization header may be given")
        if auth is not None:
            return self._verify_header(request, auth)
        if presigned:
            return self._verify_query(request)
        if "Signature" in names and "AWSAccessKeyId" in names:
            raise _v2_unsupported()
        if self.anonymous:
            return None
        raise S3Error("AccessDenied", "Access Denied (anonymous access is not enabled)")

    # Authorization header --------------------------------------------------------------------------
    def _verify_header(self, request: SignedRequest, auth: str) -> str:
        if not auth.startswith(ALGORITHM + " "):
            if auth.startswith("AWS "):
                raise _v2_unsupported()
            raise S3Error(
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; the authorization mechanism must be "
                f"{ALGORITHM}.",
            )
        fields: dict[str, str] = {}
        for part in auth[len(ALGORITHM) + 1 :].split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name in fields:
                raise _malformed_header(f"bad component {part.strip()[:40]!r}")
            fields[name] = value.strip()
        for required in ("Credential", "SignedHeaders", "Signature"):
            if not fields.get(required):
                raise _malformed_header(f"missing {required}")
        headers = request.headers
        amz_date = headers.get("x-amz-date")
        if amz_date is None:
            date_header = headers.get("date")
            amz_date = http_date_to_amz(date_header) if date_header else None
            if amz_date is None:
                raise S3Error(
                    "AccessDenied",
                    "AWS authentication requires a valid Date or x-amz-date header",
                )
        when = parse_amz_date(amz_date)
        if when is None:
            raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
        access_key, scope, secret = self._scope(fields["Credential"], amz_date, header=True)
        now = self._clock()
        if abs(now - when) > self.clock_skew:
            raise S3Error(
                "RequestTimeTooSkewed",
                RequestTime=amz_date,
                ServerTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                MaxAllowedSkewMilliseconds=str(int(self.clock_skew * 1000)),
            )
        signed = _signed_header_list(fields["SignedHeaders"], header=True)
        for name in headers:
            if name.startswith("x-amz-") and name not in signed:
                raise S3Error(
                    "AccessDenied",
                    f"There were headers present in the request which were not signed: {name}",
                )
        payload = headers.get("x-amz-content-sha256")
        if payload is None:
            if request.streamed:
                raise S3Error("MissingSecurityHeader", "Missing required header for this "
                              "request: x-amz-content-sha256", MissingHeaderName="x-amz-content-sha256")
            payload = hashlib.sha256(request.body).hexdigest()
        else:
            self._check_payload(payload, None if request.streamed else request.body)
        self._check_signature(
            request, signed, payload, amz_date, (access_key, scope, secret), fields["Signature"],
            skip=None,
        )
        date, region, service, _ = scope.split("/")
        request.signing_key = self.signing_key(secret, date, region, service)
        request.seed_signature = fields["Signature"].strip().lower()
        request.scope = scope
        request.amz_date = amz_date
        return access_key

    # presigned URL -----------------------------------------------------------------------------------
    def _verify_query(self, request: SignedRequest) -> str:
        params: dict[str, str] = {}
        for name, value in request.params:
            if name.startswith("X-Amz-") and name in params:
                raise _query_error(f"{name} is given more than once")
            params[name] = value
        if params.get("X-Amz-Algorithm") != ALGORITHM:
            raise _query_error(f"X-Amz-Algorithm only supports {ALGORITHM}")
        for required in ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature"):
            if not params.get(required):
                raise _query_error(f"missing query parameter {required}")
        amz_date = params["X-Amz-Date"]
        when = parse_amz_date(amz_date)
        if when is None:
            raise _query_error("X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"")
        expires_text = params["X-Amz-Expires"]
        if not expires_text.isdigit() or len(expires_text) > 9:
            raise _query_error("X-Amz-Expires should be a number")
        expires = int(expires_text)
        if expires > MAX_EXPIRES:
            raise _query_error("X-Amz-Expires must be less than a week (in seconds) that is 604800")
        access_key, scope, secret = self._scope(params["X-Amz-Credential"], amz_date, header=False)
        now = self._clock()
        if when - now > self.clock_skew:
            raise S3Error("AccessDenied", "Request is not valid yet")
        if now > when + expires:
            raise S3Error(
                "AccessDenied",
                "Request has expired",
                Expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when + expires)),
                ServerTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            )
        signed = _signed_header_list(params["X-Amz-SignedHeaders"], header=False)
        payload = params.get("X-Amz-Content-Sha256") or request.headers.get(
            "x-amz-content-sha256", UNSIGNED_PAYLOAD
        )
        self._check_payload(payload, None if request.streamed else request.body)
        self._check_signature(
            request, signed, payload, amz_date, (access_key, scope, secret),
            params["X-Amz-Signature"], skip="X-Amz-Signature",
        )
        return access_key

    # shared ------------------------------------------------------------------------------------------
    def _scope(self, credential: str, amz_date: str, *, header: bool) -> tuple[str, str, str]:
        """(access key, credential scope, secret) of a ``Credential`` value."""
        parts = credential.split("/")
        bad = _malformed_header if header else _query_error
        if len(parts) != 5 or not parts[0]:
            raise bad(f"the Credential is mal-formed; expecting \"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/{TERMINATOR}\"")
        access_key, date, region, service, terminator = parts
        if terminator != TERMINATOR:
            raise bad(f"the Credential has an incorrect terminal \"{terminator}\"; expecting \"{TERMINATOR}\"")
        if service != SERVICE:
            raise bad(f"the Credential has an incorrect service \"{service}\"; expecting \"{SERVICE}\"")
        if not region:
            raise bad("the Credential has no region")
        if date != amz_date[:8]:
            raise bad(f"the Credential's date \"{date}\" is not the date of the request \"{amz_date[:8]}\"")
        secret = self._secrets.get(access_key)
        if secret is None:
            raise S3Error("InvalidAccessKeyId", AWSAccessKeyId=access_key)
        return access_key, f"{date}/{region}/{service}/{terminator}", secret

    @staticmethod
    def _check_payload(payload: str, body: bytes | None) -> None:
        """``body`` None: streamed, only the form of ``payload`` is checked here."""
        if payload == UNSIGNED_PAYLOAD or payload.startswith("STREAMING-"):
            return
        if len(payload) != 64 or not set(payload) <= _HEX:
            raise S3Error(
                "InvalidArgument",
                "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-... or a SHA256 value.",
                ArgumentName="x-amz-content-sha256",
                ArgumentValue=payload[:80],
            )
        if body is None:
            return
        computed = EMPTY_SHA256 if not body else hashlib.sha256(body).hexdigest()
        if payload != computed:
            raise S3Error(
                "XAmzContentSHA256Mismatch",
                ClientComputedContentSHA256=payload,
                S3ComputedContentSHA256=computed,
            )

    def _check_signature(
        self,
        request: SignedRequest,
        signed: list[str],
        payload: str,
        amz_date: str,
        who: tuple[str, str, str],
        signature: str,
        *,
        skip: str | None,
    ) -> None:
        access_key, scope, secret = who
        date, region, service, _ = scope.split("/")
        key = self.signing_key(secret, date, region, service)
        given = signature.strip().lower()
        given_bytes = given.encode("utf-8", "replace")  # compare_digest refuses non-ASCII str
        first_sts = first_creq = ""
        for uri in _candidates(request.raw_path, uri_encode(request.path, keep_slash=True)):
            for query in _candidates(
                canonical_query(request.params, skip=skip),
                raw_canonical_query(request.query, skip=skip),
            ):
                creq = canonical_request(request.method, uri, query, request.headers, signed, payload)
                sts = string_to_sign(amz_date, scope, creq)
                if not first_sts:
                    first_sts, first_creq = sts, creq
                expected = hmac.new(key, sts.encode("utf-8"), hashlib.sha256).hexdigest()
                if hmac.compare_digest(expected.encode("ascii"), given_bytes):
                    return
        raise S3Error(
            "SignatureDoesNotMatch",
            AWSAccessKeyId=access_key,
            StringToSign=first_sts,
            SignatureProvided=given[:80],
            CanonicalRequest=first_creq,
        )


def _candidates(first: str, second: str) -> tuple[str, ...]:
    return (first,) if first == second else (first, second)


def _signed_header_list(value: str, *, header: bool) -> list[str]:
    names = value.split(";")
    if not all(names) or any(n != n.lower() or n.strip() != n for n in names):
        raise (_malformed_header if header else _query_error)("SignedHeaders is malformed")
    if "host" not in names:
        raise (_malformed_header if header else _query_error)("SignedHeaders must include host")
    return sorted(set(names))


def _malformed_header(detail: str) -> S3Error:
    return S3Error(
        "AuthorizationHeaderMalformed", f"The authorization header is malformed; {detail}."
    )


def _query_error(detail: str) -> S3Error:
    return S3Error(
        "AuthorizationQueryParametersError",
        f"Query-string authentication parameters are malformed: {detail}.",
    )


def _v2_unsupported() -> S3Error:
    return S3Error(
        "InvalidRequest",
        f"The authorization mechanism you have provided is not supported. Please use {ALGORITHM}.",
    )


# signing (tests, benchmarks, tools) ---------------------------------------------------------------


def sign_headers(
    creds: Credentials,
    method: str,
    raw_path: str,
    query: str,
    headers: Mapping[str, str],
    *,
    region: str = "us-east-1",
    amz_date: str | None = None,
    payload_hash: str = EMPTY_SHA256,
) -> dict[str, str]:
    """Headers to add to a request so that it carries a SigV4 signature (host must be given)."""
    amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    all_headers = {k.lower(): v for k, v in headers.items()}
    all_headers["x-amz-date"] = amz_date
    all_headers["x-amz-content-sha256"] = payload_hash
    signed = sorted(all_headers)
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/{TERMINATOR}"
    creq = canonical_request(
        method, raw_path, canonical_query(_parse_raw(query)), all_headers, signed, payload_hash
    )
    key = derive_signing_key(creds.secret_key, amz_date[:8], region)
    sig = hmac.new(key, string_to_sign(amz_date, scope, creq).encode(), hashlib.sha256).hexdigest()
    return {
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (
            f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={sig}"
        ),
    }


def presign_query(
    creds: Credentials,
    method: str,
    path: str,
    params: list[tuple[str, str]],
    host: str,
    *,
    region: str,
    expires: int,
    amz_date: str | None = None,
) -> str:
    """The query string of a presigned URL for ``method`` on ``path`` (decoded) at ``host``.

    ``params`` (decoded pairs) are kept and signed; every pair is in canonical encoding and
    order, so the URL's query is its own canonical form. The payload is ``UNSIGNED-PAYLOAD``,
    named in the query so that an ``x-amz-content-sha256`` header a client sends along does
    not change what is verified; only ``host`` is a signed header.
    """
    amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/{TERMINATOR}"
    pairs = [
        *params,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Content-Sha256", UNSIGNED_PAYLOAD),
        ("X-Amz-Credential", f"{creds.access_key}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    query = canonical_query(pairs)
    creq = canonical_request(
        method, uri_encode(path, keep_slash=True), query, {"host": host}, ["host"],
        UNSIGNED_PAYLOAD,
    )
    key = derive_signing_key(creds.secret_key, amz_date[:8], region)
    sig = hmac.new(key, string_to_sign(amz_date, scope, creq).encode(), hashlib.sha256).hexdigest()
    return f"{query}&X-Amz-Signature={sig}"


def _parse_raw(query: str) -> list[tuple[str, str]]:
    return [(unquote(n), unquote(v)) for n, _, v in (p.partition("=") for p in query.split("&") if p)]
