"""SigV4 verification: AWS's published examples, botocore's own signer, and every way to fail."""

from __future__ import annotations

import calendar
import datetime
import time
from urllib.parse import unquote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.s3.errors import S3Error
from depot.s3.sigv4 import (
    EMPTY_SHA256,
    Credentials,
    SignedRequest,
    SigV4Verifier,
    canonical_query,
    derive_signing_key,
    parse_query,
    sign_headers,
    uri_encode,
)

# The example keys of the AWS documentation ("Signature Calculations for the Authorization Header").
AK = "AKIAIOSFODNN7EXAMPLE"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
T0 = float(calendar.timegm((2013, 5, 24, 0, 0, 0)))
HOST = "examplebucket.s3.amazonaws.com"


def verifier(now: float = T0, **kw: object) -> SigV4Verifier:
    return SigV4Verifier({AK: SK}, clock=lambda: now, **kw)  # type: ignore[arg-type]


def req(
    method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> SignedRequest:
    raw_path, _, query = target.partition("?")
    return SignedRequest(
        method, raw_path, unquote(raw_path), query, parse_query(query),
        {k.lower(): v for k, v in headers.items()}, body,
    )


def auth(signed_headers: str, signature: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed_headers},Signature={signature}"
    )


# --- AWS documentation examples -------------------------------------------------------------------


def test_signing_key_example() -> None:
    # The key derivation example of the SigV4 documentation (service iam, 20120215).
    key = derive_signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_aws_example_get_object() -> None:
    headers = {
        "Host": HOST,
        "Range": "bytes=0-9",
        "x-amz-content-sha256": EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "Authorization": auth(
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
    }
    assert verifier().verify(req("GET", "/test.txt", headers)) == AK


def test_aws_example_put_object() -> None:
    body = b"Welcome to Amazon S3."
    headers = {
        "Host": HOST,
        "Date": "Fri, 24 May 2013 00:00:00 GMT",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
        "Authorization": auth(
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
    }
    assert verifier().verify(req("PUT", "/test%24file.text", headers, body)) == AK


def test_aws_example_get_bucket_lifecycle() -> None:
    headers = {
        "Host": HOST,
        "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": EMPTY_SHA256,
        "Authorization": auth(
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
    }
    assert verifier().verify(req("GET", "/?lifecycle", headers)) == AK


def test_aws_example_list_objects() -> None:
    headers = {
        "Host": HOST,
        "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": EMPTY_SHA256,
        "Authorization": auth(
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    }
    assert verifier().verify(req("GET", "/?max-keys=2&prefix=J", headers)) == AK


def presigned_example(expires: str = "86400") -> str:
    return (
        "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={AK}%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        f"&X-Amz-Date=20130524T000000Z&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_aws_example_presigned_url() -> None:
    assert verifier().verify(req("GET", presigned_example(), {"Host": HOST})) == AK
    # valid for its whole lifetime, then expired
    assert verifier(T0 + 86400).verify(req("GET", presigned_example(), {"Host": HOST})) == AK
    with pytest.raises(S3Error) as info:
        verifier(T0 + 86401).verify(req("GET", presigned_example(), {"Host": HOST}))
    assert info.value.code == "AccessDenied" and "expired" in info.value.message


def test_presigned_not_valid_yet_and_bad_expiry() -> None:
    with pytest.raises(S3Error) as info:
        verifier(T0 - 3600).verify(req("GET", presigned_example(), {"Host": HOST}))
    assert info.value.code == "AccessDenied"
    for bad in ("604801", "-1", "abc"):
        with pytest.raises(S3Error) as info:
            verifier().verify(req("GET", presigned_example(bad), {"Host": HOST}))
        assert info.value.code == "AuthorizationQueryParametersError"


def test_presigned_tampered() -> None:
    target = presigned_example().replace("/test.txt", "/test2.txt")
    with pytest.raises(S3Error) as info:
        verifier().verify(req("GET", target, {"Host": HOST}))
    assert info.value.code == "SignatureDoesNotMatch"
    # an extra query parameter is part of the signed request too
    with pytest.raises(S3Error) as info:
        verifier().verify(req("GET", presigned_example() + "&response-content-type=x", {"Host": HOST}))
    assert info.value.code == "SignatureDoesNotMatch"


# --- failures ----------------------------------------------------------------------------------------


def example_headers() -> dict[str, str]:
    return {
        "Host": HOST,
        "Range": "bytes=0-9",
        "x-amz-content-sha256": EMPTY_SHA256,
        "x-amz-date": "20130524T000000Z",
        "Authorization": auth(
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
    }


def code_of(v: SigV4Verifier, request: SignedRequest) -> str:
    with pytest.raises(S3Error) as info:
        v.verify(request)
    return info.value.code


def test_wrong_secret_unknown_key_and_tampering() -> None:
    wrong = SigV4Verifier({AK: "not-the-secret"}, clock=lambda: T0)
    assert code_of(wrong, req("GET", "/test.txt", example_headers())) == "SignatureDoesNotMatch"
    other = SigV4Verifier({"SOMEONEELSE": SK}, clock=lambda: T0)
    assert code_of(other, req("GET", "/test.txt", example_headers())) == "InvalidAccessKeyId"
    headers = example_headers() | {"Range": "bytes=0-99"}
    assert code_of(verifier(), req("GET", "/test.txt", headers)) == "SignatureDoesNotMatch"
    assert code_of(verifier(), req("HEAD", "/test.txt", example_headers())) == "SignatureDoesNotMatch"
    assert code_of(verifier(), req("GET", "/test.txt?acl", example_headers())) == "SignatureDoesNotMatch"


def test_clock_skew() -> None:
    assert verifier(T0 + 899).verify(req("GET", "/test.txt", example_headers())) == AK
    assert code_of(verifier(T0 + 901), req("GET", "/test.txt", example_headers())) == "RequestTimeTooSkewed"
    assert code_of(verifier(T0 - 901), req("GET", "/test.txt", example_headers())) == "RequestTimeTooSkewed"
    assert verifier(T0 + 1800, clock_skew=3600).verify(req("GET", "/test.txt", example_headers())) == AK


def test_anonymous() -> None:
    plain = req("GET", "/test.txt", {"Host": HOST})
    assert code_of(verifier(), plain) == "AccessDenied"
    assert verifier(anonymous=True).verify(plain) is None
    # a signed request is verified even when anonymous access is on
    wrong = SigV4Verifier({AK: "nope"}, anonymous=True, clock=lambda: T0)
    assert code_of(wrong, req("GET", "/test.txt", example_headers())) == "SignatureDoesNotMatch"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("AWS AKIAIOSFODNN7EXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=", "InvalidRequest"),
        ("Bearer xyz", "AuthorizationHeaderMalformed"),
        ("AWS4-HMAC-SHA256 ", "AuthorizationHeaderMalformed"),
        ("AWS4-HMAC-SHA256 Credential=a/b/c, SignedHeaders=host, Signature=00", "AuthorizationHeaderMalformed"),
        (f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request, SignedHeaders=range, Signature=00", "AuthorizationHeaderMalformed"),
        (f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00", "AuthorizationHeaderMalformed"),
        (f"AWS4-HMAC-SHA256 Credential={AK}/20130523/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00", "AuthorizationHeaderMalformed"),
        (f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request, SignedHeaders=Host, Signature=00", "AuthorizationHeaderMalformed"),
        (f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00", "AccessDenied"),
    ],
)
def test_malformed_authorization(header: str, code: str) -> None:
    headers = example_headers() | {"Authorization": header}
    # the last case: x-amz-* headers present but not signed
    assert code_of(verifier(), req("GET", "/test.txt", headers)) == code


def test_missing_date_and_payload_checks() -> None:
    headers = example_headers()
    del headers["x-amz-date"]
    assert code_of(verifier(), req("GET", "/test.txt", headers)) in ("AccessDenied", "SignatureDoesNotMatch")
    bad_hash = example_headers() | {"x-amz-content-sha256": "0" * 64}
    assert code_of(verifier(), req("GET", "/test.txt", bad_hash)) == "XAmzContentSHA256Mismatch"
    garbage = example_headers() | {"x-amz-content-sha256": "whatever"}
    assert code_of(verifier(), req("GET", "/test.txt", garbage)) == "InvalidArgument"


def test_non_ascii_signature_is_a_mismatch_not_a_crash() -> None:
    headers = example_headers()
    headers["Authorization"] = headers["Authorization"][:-8] + "é\xff\u00e9abcd"
    assert code_of(verifier(), req("GET", "/test.txt", headers)) == "SignatureDoesNotMatch"
    target = presigned_example().replace("X-Amz-Signature=aee", "X-Amz-Signature=%C3%A9ee")
    assert code_of(verifier(), req("GET", target, {"Host": HOST})) == "SignatureDoesNotMatch"


def test_both_mechanisms_and_v2_query() -> None:
    target = presigned_example()
    assert code_of(verifier(), req("GET", target, example_headers())) == "InvalidArgument"
    v2 = "/test.txt?AWSAccessKeyId=AK&Expires=1&Signature=abc"
    assert code_of(verifier(), req("GET", v2, {"Host": HOST})) == "InvalidRequest"


def test_query_parsing_limits() -> None:
    with pytest.raises(S3Error):
        parse_query("&".join(f"a{i}=1" for i in range(101)))
    with pytest.raises(S3Error):
        parse_query("prefix=%ff%fe")
    assert parse_query("a=1&&b&c=%2F+x") == [("a", "1"), ("b", ""), ("c", "/+x")]
    assert canonical_query([("b", "2"), ("a", "x y"), ("a", "1")]) == "a=1&a=x%20y&b=2"
    assert uri_encode("a b/c~d*é", keep_slash=True) == "a%20b/c~d%2A%C3%A9"


# --- botocore signs, depot verifies -----------------------------------------------------------------

BOTO = BotoCredentials("AKIDEXAMPLE", "secret/with+chars")
ENDPOINT = "http://127.0.0.1:9000"


def from_botocore(request: AWSRequest) -> SignedRequest:
    parts = urlsplit(request.url)
    headers = {k.lower(): str(v) for k, v in request.headers.items()}
    headers.setdefault("host", parts.netloc)
    return SignedRequest(
        request.method, parts.path, unquote(parts.path), parts.query, parse_query(parts.query),
        headers, request.body or b"",
    )


def boto_verifier(now: float | None = None) -> SigV4Verifier:
    return SigV4Verifier({"AKIDEXAMPLE": "secret/with+chars"}, clock=(lambda: now) if now else time.time)


key_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
)
param_value = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=key_text,
    params=st.dictionaries(st.sampled_from(["prefix", "marker", "delimiter", "max-keys", "x y", "a+b", "ü"]), param_value, max_size=4),
    region=st.sampled_from(["us-east-1", "eu-west-3", "auto"]),
    presign=st.booleans(),
)
def test_botocore_signatures_verify(key: str, params: dict[str, str], region: str, presign: bool) -> None:
    from urllib.parse import quote, urlencode

    url = f"{ENDPOINT}/bucket/{quote(key, safe='/~')}"
    if params:
        url += "?" + urlencode(params, quote_via=quote)
    request = AWSRequest(method="GET", url=url, headers={"Range": "bytes=1-2"})
    if presign:
        S3SigV4QueryAuth(BOTO, "s3", region, expires=300).add_auth(request)
    else:
        request.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        S3SigV4Auth(BOTO, "s3", region).add_auth(request)
    signed = from_botocore(request)
    assert boto_verifier().verify(signed) == "AKIDEXAMPLE"
    # the same request for another key must fail
    signed.path += "x"
    signed.raw_path += "x"
    with pytest.raises(S3Error) as info:
        boto_verifier().verify(signed)
    assert info.value.code == "SignatureDoesNotMatch"


def test_depot_signer_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    # One clock for both signers: botocore stamps the request itself when it signs.
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: now)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    ours = sign_headers(
        Credentials("AKIDEXAMPLE", "secret/with+chars"), "GET", "/b/k%20x", "list-type=2&prefix=a",
        {"host": "127.0.0.1:9000"}, amz_date=amz_date,
    )
    request = AWSRequest(method="GET", url=f"{ENDPOINT}/b/k%20x?list-type=2&prefix=a")
    request.context["timestamp"] = amz_date
    request.headers["x-amz-content-sha256"] = EMPTY_SHA256
    S3SigV4Auth(BOTO, "s3", "us-east-1").add_auth(request)
    assert ours["Authorization"].rsplit("Signature=", 1)[1] == request.headers["Authorization"].rsplit("Signature=", 1)[1]


@settings(max_examples=300, deadline=None)
@given(
    authorization=st.one_of(
        st.none(),
        st.text(max_size=200),
        st.builds(
            lambda cred, signed, sig: f"AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={signed}, Signature={sig}",
            st.text(max_size=60), st.text(max_size=40), st.text(max_size=70),
        ),
    ),
    params=st.lists(
        st.tuples(
            st.sampled_from(["X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                             "X-Amz-SignedHeaders", "X-Amz-Signature", "AWSAccessKeyId", "Signature", "x"]),
            st.text(max_size=40),
        ),
        max_size=7,
    ),
    headers=st.dictionaries(
        st.sampled_from(["x-amz-date", "date", "x-amz-content-sha256", "host", "x-amz-meta-a"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
        max_size=4,
    ),
)
def test_verifier_only_raises_s3_errors(
    authorization: str | None, params: list[tuple[str, str]], headers: dict[str, str]
) -> None:
    if authorization is not None:
        headers = headers | {"authorization": authorization}
    request = SignedRequest("GET", "/b/k", "/b/k", "", params, headers)
    for v in (verifier(), verifier(anonymous=True)):
        try:
            v.verify(request)
        except S3Error as err:
            assert 400 <= err.status < 500
