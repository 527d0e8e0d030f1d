"""Read redirects in a real cluster: etcd and 3 ``depot worker`` processes, each serving S3
(``worker.s3_port: 0``) with ``s3.redirect_reads: true``.

Every worker advertises its gateway in membership; a GET sent to a worker that does not own the
object's bytes is answered 307 to the owner's gateway with a presigned Location, which raw HTTP,
urllib (presigned URLs), boto3 (with ``depot.s3.redirects.follow_redirects``), s3fs, pyarrow and
obstore follow to the right bytes. Plain boto3, HEAD, marked requests, ranges over two segments,
a gateway with redirects off and an owner that just died are served where they arrive.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from depot.client.client import CacheClient
from depot.core.config import load_config
from depot.placement.view import ClusterView
from depot.s3.redirects import REDIRECT_PARAM, SERVED_BY, follow_redirects
from depot.s3.server import start_gateway
from depot.s3.sigv4 import Credentials, sign_headers
from depot.testing.cluster import LocalCluster, http_json

from .conftest import EtcdServer

pytestmark = pytest.mark.integration

AK = "DEPOTREDIRECTKEY"
SK = "redirect/test+secret"
REGION = "us-east-1"
MiB = 1024 * 1024
SEGMENT = 8 * MiB
BIG_SIZE = 3 * SEGMENT + 12345
SMALL_SIZE = 100_000


def data_of(name: str, size: int) -> bytes:
    block = hashlib.sha256(name.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


@dataclass
class Cluster:
    local: LocalCluster
    ufs: Path

    def view(self) -> ClusterView:
        return ClusterView.from_document(http_json(self.local.endpoint + "/api/v1/cluster"))

    def s3(self) -> dict[int, str]:
        """Every running worker's gateway URL, once every worker's entry advertises one."""
        deadline = time.monotonic() + 30
        while True:
            docs = self.local.wait_ready()
            found: dict[int, str] = {}
            for doc in docs.values():
                for w in doc["workers"]:
                    if w.get("s3_endpoint") and w["state"] == "live":
                        found[self.local.index_of(w["endpoint"])] = w["s3_endpoint"]
            if set(found) == {w.index for w in self.local.running}:
                return found
            assert time.monotonic() < deadline, f"gateways not advertised: {docs}"
            time.sleep(0.1)

    def owner(self, key: str, offset: int = 0) -> int:
        view = self.view()
        file_key = view.file_key(f"/bkt/{key}")
        assert file_key is not None
        return self.local.index_of(view.route(file_key, offset)[0].endpoint)

    def key_owned_by(self, index: int) -> str:
        for i in range(40):
            if self.owner(f"small{i}") == index:
                return f"small{i}"
        raise AssertionError(f"no small key owned by worker {index}")


@pytest.fixture(scope="module")
def cluster(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    etcd_server.ensure_running()
    workdir = tmp_path_factory.mktemp("s3redirect")
    ufs = workdir / "ufs"
    (ufs / "bkt").mkdir(parents=True)
    for i in range(40):
        (ufs / "bkt" / f"small{i}").write_bytes(data_of(f"small{i}", SMALL_SIZE))
    (ufs / "bkt" / "big.bin").write_bytes(data_of("big", BIG_SIZE))
    local = LocalCluster(
        workdir / "cluster", 3, ufs=ufs, etcd=etcd_server, page_size="1MiB",
        segment_size=SEGMENT,
        config={"worker": {"s3_port": 0},
                "s3": {"access_key": AK, "secret_key": SK, "redirect_reads": True}},
    )  # fmt: skip
    with local:
        local.start()
        c = Cluster(local, ufs)
        c.s3()
        try:
            yield c
        finally:
            print(local.describe())


def raw_get(
    url: str, *, sign: bool = True, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed; signed with SigV4 headers for its host."""
    parts = urlsplit(url)
    hdrs = dict(headers or {})
    if sign:
        hdrs.update(sign_headers(Credentials(AK, SK), method, parts.path, parts.query,
                                 {"host": parts.netloc, **hdrs}))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=hdrs)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def boto(endpoint: str) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
        region_name=REGION,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
    )  # fmt: skip


def test_a_non_owner_answers_307_to_the_owners_gateway(cluster: Cluster) -> None:
    s3 = cluster.s3()
    key = cluster.key_owned_by(1)
    want = data_of(key, SMALL_SIZE)
    status, headers, body = raw_get(f"{s3[0]}/bkt/{key}")
    assert status == 307, body
    assert b"<Code>TemporaryRedirect</Code>" in body
    location = headers["location"]
    assert location.startswith(f"{s3[1]}/bkt/{key}?")
    params = dict(parse_qsl(urlsplit(location).query))
    assert params[REDIRECT_PARAM] == "1" and params["X-Amz-Credential"].startswith(AK + "/")
    assert headers[SERVED_BY] == s3[0]
    # The Location is a presigned URL: the owner serves it with no Authorization header.
    status, headers, body = raw_get(location, sign=False, headers={"Range": "bytes=10-99"})
    assert status == 206 and body == want[10:100]
    assert headers[SERVED_BY] == s3[1]
    # A marked request is served where it arrives, and so is the owner's own key.
    status, headers, body = raw_get(f"{s3[0]}/bkt/{key}?{REDIRECT_PARAM}=1")
    assert status == 200 and body == want and headers[SERVED_BY] == s3[0]
    own = cluster.key_owned_by(0)
    status, headers, body = raw_get(f"{s3[0]}/bkt/{own}")
    assert status == 200 and body == data_of(own, SMALL_SIZE) and headers[SERVED_BY] == s3[0]
    # HEAD is not redirected; a missing key is answered here.
    status, headers, _ = raw_get(f"{s3[0]}/bkt/{key}", method="HEAD")
    assert status == 200 and headers["content-length"] == str(SMALL_SIZE)
    assert raw_get(f"{s3[0]}/bkt/nope")[0] == 404


def test_large_objects_are_redirected_per_segment(cluster: Cluster) -> None:
    s3 = cluster.s3()
    want = data_of("big", BIG_SIZE)
    owners = [cluster.owner("big.bin", k * SEGMENT) for k in range(4)]
    for k, owner in enumerate(owners):
        lo, hi = k * SEGMENT + 5, min(BIG_SIZE, (k + 1) * SEGMENT) - 1
        entry = next(i for i in s3 if i != owner)
        status, headers, body = raw_get(f"{s3[entry]}/bkt/big.bin",
                                        headers={"Range": f"bytes={lo}-{hi - 1}"})
        assert status == 307, (k, status)
        assert headers["location"].startswith(s3[owner] + "/")
        status, headers, body = raw_get(headers["location"], sign=False,
                                        headers={"Range": f"bytes={lo}-{hi - 1}"})
        assert status == 206 and body == want[lo:hi] and headers[SERVED_BY] == s3[owner]
    # The whole object, or a range over a segment boundary: served where it arrives.
    status, headers, body = raw_get(f"{s3[0]}/bkt/big.bin")
    assert status == 200 and body == want and headers[SERVED_BY] == s3[0]
    rng = f"bytes={SEGMENT - 10}-{SEGMENT + 9}"
    status, headers, body = raw_get(f"{s3[0]}/bkt/big.bin", headers={"Range": rng})
    assert status == 206 and body == want[SEGMENT - 10 : SEGMENT + 10]


def test_boto3_is_served_unless_it_follows(cluster: Cluster, tmp_path: Path) -> None:
    s3 = cluster.s3()
    key = cluster.key_owned_by(2)
    want = data_of(key, SMALL_SIZE)
    # botocore does not follow 307s (it would retry here and fail): plain boto3 is served.
    plain = boto(s3[0])
    got = plain.get_object(Bucket="bkt", Key=key)
    assert got["Body"].read() == want
    assert got["ResponseMetadata"]["HTTPHeaders"][SERVED_BY] == s3[0]
    # With follow_redirects, the bytes come from the owner's gateway.
    following = follow_redirects(boto(s3[0]))
    got = following.get_object(Bucket="bkt", Key=key)
    assert got["Body"].read() == want
    assert got["ResponseMetadata"]["HTTPHeaders"][SERVED_BY] == s3[2]
    got = following.get_object(Bucket="bkt", Key=key, Range="bytes=100-199")
    assert got["Body"].read() == want[100:200] and got["ContentRange"].endswith(f"/{SMALL_SIZE}")
    head = following.head_object(Bucket="bkt", Key=key)
    assert head["ContentLength"] == SMALL_SIZE
    assert head["ResponseMetadata"]["HTTPHeaders"][SERVED_BY] == s3[0]
    # A large download: 8 MiB ranged GETs, each within one segment, from each segment's owner.
    following.download_file("bkt", "big.bin", str(tmp_path / "big"))
    assert (tmp_path / "big").read_bytes() == data_of("big", BIG_SIZE)


def test_presigned_urls_are_redirected(cluster: Cluster) -> None:
    s3 = cluster.s3()
    key = cluster.key_owned_by(1)
    url = boto(s3[0]).generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": key, "ResponseContentType": "text/x"},
        ExpiresIn=300,
    )  # fmt: skip
    status, headers, _ = raw_get(url, sign=False)
    assert status == 307 and headers["location"].startswith(s3[1] + "/")
    assert dict(parse_qsl(urlsplit(headers["location"]).query))["X-Amz-Expires"] == "120"
    with urllib.request.urlopen(url, timeout=30) as response:  # urllib follows the 307
        assert response.read() == data_of(key, SMALL_SIZE)
        assert response.headers[SERVED_BY] == s3[1]
        assert response.headers["Content-Type"] == "text/x"
    # The redirected URL is bound to the owner's host: another gateway refuses it.
    elsewhere = headers["location"].replace(s3[1], s3[2])
    status, _, body = raw_get(elsewhere, sign=False)
    assert status == 403 and b"SignatureDoesNotMatch" in body


def test_s3fs_pyarrow_obstore_follow(cluster: Cluster) -> None:
    s3 = cluster.s3()
    key = cluster.key_owned_by(1)
    want = data_of(key, SMALL_SIZE)
    big = data_of("big", BIG_SIZE)

    import s3fs  # type: ignore[import-untyped]

    fs = s3fs.S3FileSystem(key=AK, secret=SK, endpoint_url=s3[0], skip_instance_cache=True,
                           client_kwargs={"region_name": REGION})
    assert fs.cat_file(f"bkt/{key}") == want
    assert fs.cat_file("bkt/big.bin", start=SEGMENT, end=SEGMENT + 1000) == big[SEGMENT : SEGMENT + 1000]

    import pyarrow.fs as pafs

    pfs = pafs.S3FileSystem(access_key=AK, secret_key=SK, endpoint_override=s3[0],
                            scheme="http", region=REGION)
    with pfs.open_input_stream(f"bkt/{key}") as f:
        assert f.read() == want
    with pfs.open_input_file("bkt/big.bin") as f:
        assert f.read_at(1000, 2 * SEGMENT + 7) == big[2 * SEGMENT + 7 : 2 * SEGMENT + 1007]

    import obstore
    from obstore.store import S3Store

    store = S3Store("bkt", endpoint=s3[0], access_key_id=AK, secret_access_key=SK,
                    region=REGION, virtual_hosted_style_request=False,
                    client_options={"allow_http": True})
    assert bytes(obstore.get(store, key).bytes()) == want
    assert bytes(obstore.get_range(store, "big.bin", start=SEGMENT, end=SEGMENT + 99)) == big[SEGMENT : SEGMENT + 99]
    with io.BytesIO() as out:
        for chunk in obstore.get(store, "big.bin"):
            out.write(chunk)
        assert out.getvalue() == big


def test_a_standalone_gateway_with_redirects_on_and_off(cluster: Cluster) -> None:
    s3 = cluster.s3()
    theirs = cluster.key_owned_by(1)
    mine = cluster.key_owned_by(0)

    async def run(redirect: bool) -> list[tuple[int, dict[str, str], bytes]]:
        config = load_config(environ={}, overrides={
            "s3": {"access_key": AK, "secret_key": SK, "redirect_reads": redirect},
        })  # fmt: skip
        client = CacheClient(cluster.local.endpoints[0], config=config)
        gateway = await start_gateway(config, client, "127.0.0.1", 0, environ={})
        try:
            return [await asyncio.to_thread(raw_get, f"{gateway.endpoint}/bkt/{k}")
                    for k in (theirs, mine)]
        finally:
            await gateway.stop()
            await client.close()

    (status, headers, body), (status2, _, body2) = asyncio.run(run(False))
    assert status == 200 and body == data_of(theirs, SMALL_SIZE) and SERVED_BY not in headers
    assert status2 == 200 and body2 == data_of(mine, SMALL_SIZE)
    # On, in front of worker 0: worker 1's key goes to its gateway; worker 0's key is read
    # through worker 0 (the worker a gateway reads through counts as itself).
    (status, headers, _), (status2, _, body2) = asyncio.run(run(True))
    assert status == 307 and headers["location"].startswith(s3[1] + "/")
    assert status2 == 200 and body2 == data_of(mine, SMALL_SIZE)


def test_an_owner_that_died_is_not_redirected_to(cluster: Cluster) -> None:
    """Runs last: it kills worker 2 (restarted after)."""
    s3 = cluster.s3()
    key = cluster.key_owned_by(2)
    cluster.local.kill(2)
    try:
        # Its entry is still in etcd (until its lease ends), but worker 0's client finds it
        # unreachable on the stat and marks it down: the read is served by worker 0.
        status, headers, body = raw_get(f"{s3[0]}/bkt/{key}")
        assert status == 200 and body == data_of(key, SMALL_SIZE)
        assert headers[SERVED_BY] == s3[0]
    finally:
        cluster.local.restart(2)
        cluster.local.wait_ready()


def _s3_metrics(endpoint: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The depot_s3_* samples of a worker's GET /metrics: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("depot_s3_")
        for sample in family.samples
    }


def test_gateway_counters_in_the_workers_metrics(cluster: Cluster) -> None:
    s3 = cluster.s3()
    worker = cluster.local.workers[0].endpoint
    before = _s3_metrics(worker)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return _s3_metrics(worker).get(key, 0.0) - before.get(key, 0.0)

    key = cluster.key_owned_by(1)
    assert raw_get(f"{s3[0]}/bkt/{key}")[0] == 307
    own = cluster.key_owned_by(0)
    assert raw_get(f"{s3[0]}/bkt/{own}")[0] == 200
    assert raw_get(f"{s3[0]}/bkt/nope")[0] == 404
    assert raw_get(f"{s3[0]}/bkt/{own}", sign=False)[0] == 403  # anonymous: not allowed here
    assert moved("depot_s3_redirects_total") == 1
    assert moved("depot_s3_requests_total", operation="GetObject") == 3
    assert moved("depot_s3_errors_total", code="NoSuchKey") == 1
    assert moved("depot_s3_errors_total", code="AccessDenied") == 1
    assert _s3_metrics(worker)[("depot_s3_inflight_requests", ())] == 0
