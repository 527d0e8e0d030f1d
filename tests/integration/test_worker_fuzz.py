"""Random requests against a real worker: never a 5xx, a hang or a wrong byte."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.testing.local import LocalWorker

ROUTES = ["/api/v1/read", "/api/v1/stat", "/api/v1/list", "/api/v1/info", "/api/v1/cache/stats", "/healthz", "/nope"]
SIZE = 3 * 65536 + 5


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalWorker, bytes]]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "ufs" / "d").mkdir(parents=True)
    data = os.urandom(SIZE)
    (root / "ufs" / "f.bin").write_bytes(data)
    (root / "ufs" / "d" / "g.txt").write_text("g")
    with LocalWorker((root / "ufs").as_uri(), root / "cache", page_size=65536) as w:
        yield w, data


path_text = st.one_of(
    st.sampled_from(["/f.bin", "/d", "/d/g.txt", "/", "/missing", "f.bin", "/d/../f.bin", "//f.bin", "/f.bin/"]),
    st.text(max_size=40),
)
range_text = st.one_of(
    st.none(),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, SIZE + 10), st.integers(0, SIZE + 10)),
    st.builds(lambda a: f"bytes={a}-", st.integers(0, SIZE + 10)),
    st.builds(lambda a: f"bytes=-{a}", st.integers(0, SIZE + 10)),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), path=path_text, rng=range_text,
       if_match=st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)),
       method=st.sampled_from(["GET", "GET", "HEAD", "POST", "DELETE"]))
def test_random_requests(worker: tuple[LocalWorker, bytes], route: str, path: str, rng: str | None,
                         if_match: str | None, method: str) -> None:
    w, data = worker
    host, port = w.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {}
    if rng is not None:
        headers["Range"] = rng
    if if_match is not None:
        headers["If-Match"] = if_match
    conn.request(method, f"{route}?path={quote(path, safe='')}", headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status < 500, (resp.status, body)
    if resp.status >= 400 and method != "HEAD":
        assert json.loads(body)["error"]["code"]
    if route == "/api/v1/read" and resp.status in (200, 206) and method == "GET":
        content_range = resp.getheader("Content-Range")
        if content_range and path in ("/f.bin", "f.bin", "//f.bin", "/f.bin/"):
            first, last = content_range.split(" ")[1].split("/")[0].split("-")
            assert body == data[int(first) : int(last) + 1]
        elif path in ("/f.bin", "f.bin", "//f.bin", "/f.bin/"):
            assert body == data


def test_worker_still_healthy_after_fuzz(worker: tuple[LocalWorker, bytes]) -> None:
    host, port = worker[0].endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200


def test_raw_garbage_connections(worker: tuple[LocalWorker, bytes], tmp_path: Path) -> None:
    import socket

    host, port = worker[0].endpoint.removeprefix("http://").split(":")
    for payload in [b"\x00" * 100, os.urandom(2000), b"GET / HTTP/1.1\r\n" * 5000, b"\r\n\r\n", b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n"]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:100]
    test_worker_still_healthy_after_fuzz(worker)
