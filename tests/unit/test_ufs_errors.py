"""Error mapping: what obstore really raises for each HTTP answer, and fsspec/OS errors."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import obstore as obs
import pytest

from depot.core.config import UfsConfig
from depot.core.errors import (
    AlreadyExists,
    ConfigError,
    DepotError,
    InvalidArgument,
    InvalidPath,
    InvalidRange,
    NoSpace,
    NotFound,
    PermissionDenied,
    ReadOnly,
    StaleVersion,
    Throttled,
    Timeout,
    Unavailable,
    Unsupported,
)
from depot.ufs import open_backend
from depot.ufs.errors import map_error, short_message
from depot.ufs.obstore_store import ObstoreUnderStore

S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>m</Message></Error>'
)


class _QuietServer(ThreadingHTTPServer):
    """Client disconnects are part of these tests (stalls, truncated bodies): no tracebacks."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    """Answers ``/bucket/<status>[-<code>]`` with that status; ``/bucket/hang`` stalls;
    ``/bucket/short`` promises more body than it sends."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        name = self.path.rsplit("/", 1)[-1].split("?")[0]
        if name == "hang":
            time.sleep(2.0)
            name = "200"
        if name == "short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.send_header("ETag", '"x"')
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            self.end_headers()
            self.wfile.write(b"only a little")
            self.wfile.flush()
            self.close_connection = True
            return
        status_text, _, code = name.partition("-")
        status = int(status_text) if status_text.isdigit() else 404
        body = S3_ERROR.format(code=code or "Error").encode() if status >= 300 else b"ok"
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"x"')
        self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(True)


@pytest.fixture(scope="module")
def stub_endpoint() -> Iterator[str]:
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def s3_store(endpoint: str, **extra: str) -> ObstoreUnderStore:
    options = {
        "endpoint": endpoint,
        "access_key_id": "k",
        "secret_access_key": "s",
        "region": "us-east-1",
        **extra,
    }
    store = open_backend("s3://bucket", options, UfsConfig())
    assert isinstance(store, ObstoreUnderStore)
    return store


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("404", NotFound),
        ("403-AccessDenied", PermissionDenied),
        ("401", PermissionDenied),
        ("400-InvalidRequest", InvalidArgument),
        ("416-InvalidRange", InvalidRange),
        ("429", Throttled),
        ("503-SlowDown", Throttled),
        ("500-InternalError", Unavailable),
        ("502", Unavailable),
        ("504", Timeout),
    ],
)
async def test_http_status_of_a_real_obstore_get(
    stub_endpoint: str, name: str, expected: type[DepotError]
) -> None:
    store = s3_store(stub_endpoint)
    with pytest.raises(Exception) as info:
        result = await obs.get_async(store.store, name)
        await result.bytes_async()
    mapped = map_error(info.value, name)
    assert type(mapped) is expected
    assert mapped.path == name
    assert "\n" not in mapped.message and "<?xml" not in mapped.message
    # The store methods raise the same mapping.
    with pytest.raises(expected):
        await store.get(name)


async def test_precondition_failure_is_stale(stub_endpoint: str) -> None:
    store = s3_store(stub_endpoint)
    with pytest.raises(Exception) as info:
        await obs.get_async(store.store, "412-PreconditionFailed", options={"if_match": '"y"'})
    assert type(map_error(info.value)) is StaleVersion


async def test_retryability_follows_the_class(stub_endpoint: str) -> None:
    store = s3_store(stub_endpoint)
    with pytest.raises(Throttled) as throttled:
        await store.head("503-SlowDown")
    assert throttled.value.retryable
    with pytest.raises(NotFound) as missing:
        await store.head("404")
    assert not missing.value.retryable


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = s3_store(f"http://127.0.0.1:{port}")
    with pytest.raises(Unavailable) as info:
        await store.head("anything")
    assert info.value.retryable


async def test_stalled_response_is_timeout(stub_endpoint: str) -> None:
    store = s3_store(stub_endpoint, request_timeout="300ms")
    started = time.monotonic()
    with pytest.raises(Timeout):
        await store.get("hang")
    assert time.monotonic() - started < 1.9


async def test_truncated_body_is_unavailable(stub_endpoint: str) -> None:
    store = s3_store(stub_endpoint)
    with pytest.raises(Unavailable):
        await store.get("short")


def test_messages_hide_query_strings() -> None:
    exc = Exception(
        "Error performing GET https://acct.blob.core.windows.net/c/k?sv=2021&sig=SECRET in 2ms"
        " - Server returned non-2xx status code: 403 Forbidden: <?xml version='1.0'?><Error/>"
        "\n\nDebug source: ..."
    )
    message = short_message(exc)
    assert "SECRET" not in message
    assert message.endswith("403 Forbidden")
    assert type(map_error(exc)) is DepotError  # a plain Exception is not an obstore error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (FileNotFoundError(errno.ENOENT, "gone"), NotFound),
        (NotADirectoryError(errno.ENOTDIR, "x"), NotFound),
        (PermissionError(errno.EACCES, "no"), PermissionDenied),
        (FileExistsError(errno.EEXIST, "there"), AlreadyExists),
        (OSError(errno.EROFS, "ro"), ReadOnly),
        (OSError(errno.ENOSPC, "full"), NoSpace),
        (OSError(errno.ESTALE, "stale nfs handle"), Unavailable),
        (OSError(errno.EIO, "io"), Unavailable),
        (OSError(errno.ENAMETOOLONG, "long"), InvalidPath),
        (ConnectionResetError(errno.ECONNRESET, "reset"), Unavailable),
        (TimeoutError("slow"), Timeout),
        (NotImplementedError(), Unsupported),
        (ValueError("bad range requested"), InvalidRange),
        (ValueError("nonsense"), InvalidArgument),
        (RuntimeError("who knows"), DepotError),
    ],
)
def test_os_and_python_errors(exc: BaseException, expected: type[DepotError]) -> None:
    mapped = map_error(exc, "k")
    assert type(mapped) is expected
    assert mapped.path == "k"


class _HttpClientError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (404, NotFound),
        (403, PermissionDenied),
        (429, Throttled),
        (503, Throttled),
        (500, Unavailable),
        (412, StaleVersion),
        (400, InvalidArgument),
    ],
)
def test_http_client_errors_with_status(status: int, expected: type[DepotError]) -> None:
    assert type(map_error(_HttpClientError(status))) is expected


def test_depot_errors_pass_through() -> None:
    original = ConfigError("bad")
    assert map_error(original) is original


def test_unknown_generic_error_is_not_retryable() -> None:
    mapped = map_error(RuntimeError("strange"))
    assert not mapped.retryable
