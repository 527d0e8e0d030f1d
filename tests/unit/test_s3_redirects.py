"""Read redirects to the owner's gateway (``s3.redirect_reads``): who is redirected, where to, and
whether the owner accepts the Location (a presigned URL signed by the redirecting gateway).

Two gateways run on the real HTTP server over in-memory clients; the redirecting one gets a real
``WorkerRouter`` holding a hand-made cluster view (two workers, each advertising its gateway).
A real cluster with boto3 and raw HTTP is in tests/integration/test_s3_redirects.py.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from test_s3_gateway import FakeClient, Raw, error_code  # same directory (rootdir-less tests)

from depot.client.routing import WorkerRouter
from depot.core.config import DepotConfig, MountConfig, S3Config
from depot.core.errors import InvalidArgument
from depot.core.transport import WorkerUnreachable
from depot.placement.membership import WorkerInfo
from depot.placement.ring import PlacementPolicy
from depot.placement.view import ClusterView
from depot.s3.errors import S3Error, protocol_error
from depot.s3.gateway import S3Gateway
from depot.s3.redirects import (
    REDIRECT_PARAM,
    REDIRECT_TTL,
    SERVED_BY,
    Redirector,
    follows_redirects,
    host_header,
)
from depot.s3.sigv4 import (
    Credentials,
    SignedRequest,
    SigV4Verifier,
    parse_query,
    presign_query,
    sign_headers,
)
from depot.worker.http import HttpServer

AK, SK = "AK", "SK"
ID_A, ID_B = "a" * 32, "b" * 32
SEGMENT = 1000
SMALL = b"small object\n"
LARGE = bytes(range(256)) * 12  # 3072 bytes: segments [0, 1000), [1000, 2000), ...


def boto_ua() -> dict[str, str]:
    return {"User-Agent": "Boto3/1.43.0 md/Botocore#1.43.0 ua/2.1 os/linux"}


# --- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "follows"),
    [
        ({}, True),
        ({"user-agent": "curl/8.0"}, True),
        ({"user-agent": "object_store/0.12.1"}, True),
        ({"user-agent": "aws-sdk-cpp/1.11.900 ua/2.1 api/S3"}, True),
        ({"user-agent": "aiobotocore/3.1.0 md/Botocore#1.43.0 ua/2.1"}, True),
        ({"user-agent": "Boto3/1.43.0 md/Botocore#1.43.0 ua/2.1"}, False),
        ({"user-agent": "aws-cli/2.15.0 Python/3.11 Linux"}, False),
        ({"user-agent": "Botocore/1.43.0 ua/2.1"}, False),
        ({"user-agent": "Boto3/1.43.0 md/Botocore#1.43.0", "x-depot-redirects": "follow"}, True),
        ({"user-agent": "curl/8.0", "x-depot-redirects": "never"}, False),
    ],
)
def test_which_clients_follow(headers: dict[str, str], follows: bool) -> None:
    assert follows_redirects(headers) is follows


def test_host_header_leaves_default_ports_out() -> None:
    assert host_header("http://h:7071") == ("http", "h:7071")
    assert host_header("http://h:80/") == ("http", "h")
    assert host_header("https://h:443") == ("https", "h")
    assert host_header("http://[::1]:7071") == ("http", "[::1]:7071")


def verifier_request(url: str, headers: dict[str, str] | None = None) -> SignedRequest:
    parts = urlsplit(url)
    hdrs = {"host": parts.netloc, **{k.lower(): v for k, v in (headers or {}).items()}}
    return SignedRequest(
        "GET", parts.path, unquote(parts.path), parts.query, parse_query(parts.query), hdrs
    )


def test_presigned_query_verifies_and_keeps_parameters() -> None:
    query = presign_query(
        Credentials(AK, SK), "GET", "/b/dir/a b+c&d.txt",
        [("response-content-type", "text/plain"), (REDIRECT_PARAM, "1")],
        "h:7071", region="us-east-1", expires=60,
    )  # fmt: skip
    url = f"http://h:7071/b/dir/a%20b%2Bc%26d.txt?{query}"
    verifier = SigV4Verifier({AK: SK})
    assert verifier.verify(verifier_request(url)) == AK
    # Clients following it send their own x-amz-content-sha256 (the query's value wins) and,
    # some, the Authorization header they signed for the host they left (ignored then).
    extra = {"x-amz-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
             "authorization": "AWS4-HMAC-SHA256 Credential=AK/20200101/us-east-1/s3/aws4_request, "
                              "SignedHeaders=host, Signature=00"}
    assert verifier.verify(verifier_request(url, extra)) == AK
    # Another host, another parameter, another path: refused.
    for bad in (url.replace("h:7071/", "h:7072/"),
                url.replace("response-content-type=text%2Fplain", "response-content-type=x"),
                url.replace("/b/dir/", "/b/other/")):
        with pytest.raises(S3Error) as err:
            verifier.verify(verifier_request(bad))
        assert err.value.code == "SignatureDoesNotMatch"
    # Both mechanisms without the redirect marker are still refused, as S3 does.
    plain = presign_query(Credentials(AK, SK), "GET", "/b/k", [], "h:1", region="us-east-1",
                          expires=60)
    with pytest.raises(S3Error) as err:
        verifier.verify(verifier_request(f"http://h:1/b/k?{plain}", extra))
    assert err.value.code == "InvalidArgument"


def test_worker_info_carries_the_s3_endpoint_compatibly() -> None:
    plain = WorkerInfo(worker_id=ID_A, endpoint="http://a:7070", started_at=1.0)
    assert "s3_endpoint" not in plain.to_dict()  # entries without a gateway look as before
    withs3 = WorkerInfo(worker_id=ID_A, endpoint="http://a:7070", started_at=1.0,
                        s3_endpoint="http://a:7071")
    data = json.loads(withs3.to_json())
    assert data["s3_endpoint"] == "http://a:7071"
    assert WorkerInfo.from_json(withs3.to_json()) == withs3
    assert WorkerInfo.from_dict({"worker_id": ID_A, "endpoint": "http://a:7070"}).s3_endpoint == ""
    with pytest.raises(InvalidArgument):
        WorkerInfo(worker_id=ID_A, endpoint="http://a:7070", s3_endpoint="a:7071")


# --- the redirector's choice -------------------------------------------------------------------


def make_view(
    s3: dict[str, str], *, replication: int = 1, segment: int = SEGMENT, self_id: str = ID_A,
    states: dict[str, str] | None = None,
) -> ClusterView:
    workers = tuple(
        WorkerInfo(worker_id=wid, endpoint=f"http://{name}:7070", started_at=0.0,
                   s3_endpoint=s3.get(wid, ""), state=(states or {}).get(wid, "live"))
        for wid, name in ((ID_A, "wa"), (ID_B, "wb"))
    )  # fmt: skip
    return ClusterView(
        workers=workers,
        policy=PlacementPolicy(segment_size=segment, replication=replication, virtual_nodes=64),
        mounts=(MountConfig(path="/", ufs="file:///srv"),),
        self_id=self_id,
    )


def make_router(view: ClusterView) -> WorkerRouter:
    router = WorkerRouter("http://wa:7070", DepotConfig(), max_connections=1)
    router._view = view
    return router


def owned_path(view: ClusterView, owner: str, offset: int = 0, prefix: str = "/data/k") -> str:
    for i in range(10_000):
        path = f"{prefix}{i}"
        key = view.file_key(path)
        assert key is not None
        if view.route(key, offset)[0].worker_id == owner:
            return path
    raise AssertionError("no such path")


def test_owner_is_the_other_live_gateway_of_one_placement_key() -> None:
    view = make_view({ID_A: "http://wa:7071", ID_B: "http://wb:7071"})
    router = make_router(view)
    redirector = Redirector(router, {AK: SK}, "us-east-1")
    theirs = owned_path(view, ID_B)
    mine = owned_path(view, ID_A)
    assert redirector.owner(theirs, 0, 10) is not None
    assert redirector.owner(theirs, 0, 10).worker_id == ID_B  # type: ignore[union-attr]
    assert redirector.owner(mine, 0, 10) is None  # never to itself
    # A range over two segments is served here; one within segment 1 goes to its owner.
    assert redirector.owner(theirs, 900, 1100) is None
    late = owned_path(view, ID_B, offset=SEGMENT)
    assert redirector.owner(late, SEGMENT + 5, 2 * SEGMENT).worker_id == ID_B  # type: ignore[union-attr]
    assert redirector.owner(late, 0, 2 * SEGMENT) is None
    # The owner marked down in the client's view: served here.
    router.mark_down("http://wb:7070", WorkerUnreachable("gone"))
    assert redirector.owner(theirs, 0, 10) is None
    router.mark_up("http://wb:7070")
    assert redirector.owner(theirs, 0, 10) is not None
    # This gateway's own URL or worker id also counts as itself.
    redirector.endpoint = "http://wb:7071"
    assert redirector.owner(theirs, 0, 10) is None


def test_owner_needs_an_advertised_gateway_and_a_live_worker() -> None:
    for view in (
        make_view({ID_A: "http://wa:7071"}),  # an old worker entry: no s3_endpoint
        make_view({ID_B: "http://wb:7071"}, states={ID_B: "draining"}),
    ):
        redirector = Redirector(make_router(view), {AK: SK}, "us-east-1")
        path = owned_path(make_view({}), ID_B)
        assert redirector.owner(path, 0, 10) is None
    # Whole-file placement: any range is one key.
    view = make_view({ID_B: "http://wb:7071"}, segment=0)
    redirector = Redirector(make_router(view), {AK: SK}, "us-east-1")
    path = owned_path(view, ID_B)
    assert redirector.owner(path, 0, 10 * SEGMENT) is not None
    # With replication 2 this worker is a replica of every key: nothing is redirected.
    view = make_view({ID_A: "http://wa:7071", ID_B: "http://wb:7071"}, replication=2)
    redirector = Redirector(make_router(view), {AK: SK}, "us-east-1")
    assert redirector.owner(owned_path(view, ID_B), 0, 10) is None
    # No view yet (a single worker without a cluster view): served here.
    router = WorkerRouter("http://wa:7070", DepotConfig(), max_connections=1)
    assert Redirector(router, {AK: SK}, "us-east-1").owner("/data/x", 0, 1) is None


def test_location_expiry_follows_a_presigned_original() -> None:
    now = 1_700_000_000.0
    view = make_view({ID_B: "http://wb:7071"})
    redirector = Redirector(make_router(view), {AK: SK}, "us-east-1", clock=lambda: now)
    date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - 100))
    given = [("X-Amz-Date", date), ("X-Amz-Expires", "130"), ("X-Amz-Signature", "x"),
             ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"), ("partNumber", "1")]
    url = redirector.location("http://wb:7071", "/data/k", given, AK)
    assert url is not None and url.startswith("http://wb:7071/data/k?")
    params = dict(parse_qsl(urlsplit(url).query))
    assert params["X-Amz-Expires"] == "30" and params["partNumber"] == "1"
    assert params[REDIRECT_PARAM] == "1" and params["X-Amz-Signature"] != "x"
    url = redirector.location("http://wb:7071", "/data/k", [("X-Amz-Date", date),
                              ("X-Amz-Expires", "100")], AK)
    assert url is None  # about to expire: served here
    params = dict(parse_qsl(urlsplit(redirector.location("http://wb:7071", "/d/k", [], AK) or "").query))
    assert params["X-Amz-Expires"] == str(REDIRECT_TTL)
    anonymous = redirector.location("http://wb:80", "/d/a b", [("x", "1")], None)
    assert anonymous == f"http://wb/d/a%20b?x=1&{REDIRECT_PARAM}=1"
    assert redirector.location("http://wb:7071", "/d/k", [], "unknown-key") is None


# --- two gateways ---------------------------------------------------------------------------------


class Pair:
    """Gateway A (redirects on, worker ``wa``) and gateway B (``wb``), over the same files."""

    def __init__(self) -> None:
        self.servers: list[HttpServer] = []
        self.raw_a: Raw
        self.raw_b: Raw
        self.a: S3Gateway
        self.b: S3Gateway

    async def start(self, *, redirect: bool = True, anonymous: bool = False) -> Pair:
        files = {"/data/" + name: SMALL for name in (f"k{i}" for i in range(200))}
        files.update({f"/data/large{i}": LARGE for i in range(50)})
        gateways = []
        for name in ("a", "b"):
            client = FakeClient(files)
            settings = S3Config(anonymous=anonymous, redirect_reads=redirect)
            router = WorkerRouter(f"http://w{name}:7070", DepotConfig(), max_connections=1)
            client.router = router  # type: ignore[attr-defined]
            client.endpoint = f"http://w{name}:7070"  # type: ignore[misc]
            gateway = S3Gateway(client, settings, credentials={AK: SK})  # type: ignore[arg-type]
            server = HttpServer(gateway, protocol_error=protocol_error, head_timeout=2,
                                idle_timeout=5)
            port = await server.start("127.0.0.1", 0)
            gateway.advertise(f"http://127.0.0.1:{port}")
            self.servers.append(server)
            gateways.append((gateway, router, port))
        (self.a, router_a, port_a), (self.b, router_b, port_b) = gateways
        s3 = {ID_A: f"http://127.0.0.1:{port_a}", ID_B: f"http://127.0.0.1:{port_b}"}
        router_a._view = make_view(s3, self_id=ID_A)
        router_b._view = make_view(s3, self_id=ID_B)
        self.view = router_a._view
        self.port_a, self.port_b = port_a, port_b
        self.raw_a, self.raw_b = Raw(port_a), Raw(port_b)
        return self

    def signed(
        self, port: int, target: str, method: str = "GET", **headers: str
    ) -> dict[str, str]:
        path, _, query = target.partition("?")
        hdrs = {"host": f"127.0.0.1:{port}", **headers}
        return {**headers, **sign_headers(Credentials(AK, SK), method, path, query, hdrs)}

    async def close(self) -> None:
        await self.raw_a.close()
        await self.raw_b.close()
        for server in self.servers:
            await server.stop()


@pytest.fixture
async def pair() -> Any:
    p = await Pair().start()
    yield p
    await p.close()


async def follow(location: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET the Location as a following client does: no Authorization, other headers kept."""
    parts = urlsplit(location)
    raw = Raw(parts.port or 80)
    try:
        return await raw.request("GET", f"{parts.path}?{parts.query}", headers)
    finally:
        await raw.close()


async def test_non_owner_redirects_and_the_owner_serves_the_location(pair: Pair) -> None:
    key = owned_path(pair.view, ID_B)[len("/data/"):]
    target = f"/data/{key}"
    status, headers, body = await pair.raw_a.request("GET", target, pair.signed(pair.port_a, target))
    assert status == 307, body
    assert error_code(body) == "TemporaryRedirect"
    location = headers["location"]
    assert location.startswith(f"http://127.0.0.1:{pair.port_b}/data/{key}?")
    assert dict(parse_qsl(urlsplit(location).query))[REDIRECT_PARAM] == "1"
    assert headers[SERVED_BY] == f"http://127.0.0.1:{pair.port_a}"
    assert pair.a.redirector is not None and pair.a.redirector.sent == 1
    status, headers, body = await follow(location, {"Range": "bytes=2-6"})
    assert status == 206 and body == SMALL[2:7]
    assert headers[SERVED_BY] == f"http://127.0.0.1:{pair.port_b}"
    # The owner's own keys are served by A; B never redirects a marked request, even one of A's.
    mine = owned_path(pair.view, ID_A)
    status, headers, body = await pair.raw_a.request("GET", mine, pair.signed(pair.port_a, mine))
    assert status == 200 and body == SMALL and headers[SERVED_BY].endswith(str(pair.port_a))
    marked = f"{mine}?{REDIRECT_PARAM}=1"
    status, headers, body = await pair.raw_b.request("GET", marked, pair.signed(pair.port_b, marked))
    assert status == 200 and body == SMALL and headers[SERVED_BY].endswith(str(pair.port_b))
    unmarked = mine
    status, headers, _ = await pair.raw_b.request("GET", unmarked, pair.signed(pair.port_b, unmarked))
    assert status == 307 and headers["location"].startswith(f"http://127.0.0.1:{pair.port_a}/")


async def test_what_is_served_here(pair: Pair) -> None:
    theirs = owned_path(pair.view, ID_B)
    # HEAD is never redirected.
    status, headers, _ = await pair.raw_a.request(
        "HEAD", theirs, pair.signed(pair.port_a, theirs, "HEAD")
    )
    assert status == 200 and headers["content-length"] == str(len(SMALL))
    # botocore does not follow a 307: served, unless it says it follows.
    hdrs = pair.signed(pair.port_a, theirs, **boto_ua())
    status, _, body = await pair.raw_a.request("GET", theirs, hdrs)
    assert status == 200 and body == SMALL
    hdrs = pair.signed(pair.port_a, theirs, **boto_ua())
    hdrs["x-depot-redirects"] = "follow"
    assert (await pair.raw_a.request("GET", theirs, hdrs))[0] == 307
    # Missing keys, bad ranges, bad part numbers are answered here.
    missing = "/data/nope"
    status, _, body = await pair.raw_a.request("GET", missing, pair.signed(pair.port_a, missing))
    assert status == 404 and error_code(body) == "NoSuchKey"
    hdrs = pair.signed(pair.port_a, theirs, Range="bytes=999-")
    assert (await pair.raw_a.request("GET", theirs, hdrs))[0] == 416
    target = f"{theirs}?partNumber=2"
    assert (await pair.raw_a.request("GET", target, pair.signed(pair.port_a, target)))[0] == 416
    # A large object: ranges within one segment go to that segment's owner, others are served.
    large = owned_path(pair.view, ID_B, offset=SEGMENT, prefix="/data/large")
    hdrs = pair.signed(pair.port_a, large, Range=f"bytes={SEGMENT}-{2 * SEGMENT - 1}")
    status, headers, _ = await pair.raw_a.request("GET", large, hdrs)
    assert status == 307
    status, _, body = await follow(headers["location"], {"Range": f"bytes={SEGMENT}-{2 * SEGMENT - 1}"})
    assert status == 206 and body == LARGE[SEGMENT : 2 * SEGMENT]
    for rng in (None, f"bytes={SEGMENT - 1}-{SEGMENT}"):
        extra = {"Range": rng} if rng else {}
        status, _, body = await pair.raw_a.request("GET", large, pair.signed(pair.port_a, large, **extra))
        assert status in (200, 206)
        assert body == (LARGE if rng is None else LARGE[SEGMENT - 1 : SEGMENT + 1])


async def test_presigned_urls_are_redirected_presigned() -> None:
    p = await Pair().start()
    try:
        key = owned_path(p.view, ID_B)
        # A presigned URL for gateway A, as a client's SDK makes it.
        query = presign_query(Credentials(AK, SK), "GET", key,
                              [("response-content-type", "text/x")],
                              f"127.0.0.1:{p.port_a}", region="us-east-1", expires=300)
        status, headers, body = await p.raw_a.request("GET", f"{key}?{query}")
        assert status == 307, body
        location = headers["location"]
        params = dict(parse_qsl(urlsplit(location).query))
        assert params["response-content-type"] == "text/x" and params["X-Amz-Expires"] == "120"
        status, headers, body = await follow(location)
        assert status == 200 and body == SMALL and headers["content-type"] == "text/x"
        # Tampering with the Location (dropping the marker) breaks its signature.
        bad = location.replace(f"{REDIRECT_PARAM}=1", "x-other=1")
        status, _, body = await follow(bad)
        assert status == 403 and error_code(body) == "SignatureDoesNotMatch"
    finally:
        await p.close()


async def test_anonymous_and_disabled() -> None:
    p = await Pair().start(anonymous=True)
    try:
        key = owned_path(p.view, ID_B)
        status, headers, _ = await p.raw_a.request("GET", key)
        assert status == 307 and "X-Amz-Signature" not in headers["location"]
        status, _, body = await follow(headers["location"])
        assert status == 200 and body == SMALL
    finally:
        await p.close()
    p = await Pair().start(redirect=False)
    try:
        key = owned_path(p.view, ID_B)
        status, headers, body = await p.raw_a.request("GET", key, p.signed(p.port_a, key))
        assert status == 200 and body == SMALL and SERVED_BY not in headers
        assert p.a.redirector is None
    finally:
        await p.close()


# --- advertising --------------------------------------------------------------------------------


async def test_a_worker_advertises_its_gateway_in_membership() -> None:
    from depot.core.config import ClusterConfig
    from depot.placement.membership import EmbeddedMembership, EmbeddedRegistry
    from depot.worker.cluster import ClusterNode

    registry = EmbeddedRegistry()
    node = ClusterNode(
        ClusterConfig(), worker_uuid="0" * 31 + "1", endpoint="http://10.0.0.5:7070",
        page_size=4096, mounts=[], usage=lambda: (0, 0),
        membership=EmbeddedMembership(registry),
    )  # fmt: skip
    other = EmbeddedMembership(registry)
    await node.start()
    await other.start()
    try:
        assert "s3_endpoint" not in node.view.to_document()["workers"][0]
        await node.advertise_s3("http://10.0.0.5:7071")
        (entry,) = await other.workers()
        assert entry.s3_endpoint == "http://10.0.0.5:7071"
        doc = node.view.to_document()
        assert doc["workers"][0]["s3_endpoint"] == "http://10.0.0.5:7071"
        assert ClusterView.from_document(doc).workers[0].s3_endpoint == "http://10.0.0.5:7071"
    finally:
        await other.close()
        await node.stop()


def test_advertised_endpoint_is_the_workers_host_and_the_gateways_port() -> None:
    from depot.s3.server import advertised_endpoint

    assert advertised_endpoint("http://10.0.0.5:7070", 7071) == "http://10.0.0.5:7071"
    assert advertised_endpoint("https://node-3.example:443/", 9000) == "http://node-3.example:9000"
    assert advertised_endpoint("http://[fd00::5]:7070", 7071) == "http://[fd00::5]:7071"


async def test_own_hot_small_objects_keep_the_speculative_read(pair: Pair) -> None:
    mine = owned_path(pair.view, ID_A)
    client = pair.a.client
    assert isinstance(client, FakeClient)
    client.stat_delay = 0.02
    assert (await pair.raw_a.request("GET", mine, pair.signed(pair.port_a, mine)))[2] == SMALL
    assert client.events == [("stat", mine), ("stat-done", mine), ("read", mine)]
    client.events.clear()
    assert (await pair.raw_a.request("GET", mine, pair.signed(pair.port_a, mine)))[2] == SMALL
    # Known here (by its last size): routed without a stat first, read beside the stat.
    assert client.events == [("stat", mine), ("read", mine), ("stat-done", mine)]
    # A key of B's, even one read here before, is stat'ed and redirected.
    theirs = owned_path(pair.view, ID_B)
    hdrs = pair.signed(pair.port_a, theirs, **boto_ua())
    assert (await pair.raw_a.request("GET", theirs, hdrs))[0] == 200  # botocore: served here
    client.events.clear()
    status, _, _ = await pair.raw_a.request("GET", theirs, pair.signed(pair.port_a, theirs))
    assert status == 307 and client.events == [("stat", theirs), ("stat-done", theirs)]
