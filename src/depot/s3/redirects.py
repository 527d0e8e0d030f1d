"""Redirects of reads to the gateway of the worker that owns their bytes (``s3.redirect_reads``).

A gateway reads through ``CacheClient``, which fetches every page from its owner on the ring: the
bytes cross the network twice (owner -> gateway -> client) and the gateway's NIC carries every
read. With ``s3.redirect_reads`` on, a GetObject whose bytes another live worker owns is answered
``307 Temporary Redirect`` to that worker's S3 gateway (``WorkerInfo.s3_endpoint``, advertised in
membership), so the client reads from the owner directly.

What is redirected (``Redirector.owner``): a GET (HEAD never: no bytes to move) of one placement
key, that is an object of up to one segment, or a range within one segment of a larger object;
only when the owner (or one of the key's replicas) is live, not marked down in the client's view,
not this gateway's own worker, and advertises a gateway. Anything else is served here.

Why the Location is a presigned URL: SigV4 signs the ``Host`` header, so a request signed for this
gateway cannot be verified by another one, and every client that follows redirects (curl, requests,
aiohttp/s3fs, the AWS C++ SDK under pyarrow, object_store/obstore, Go's net/http under rclone)
drops ``Authorization`` when the host changes. So the gateway, having verified the request, signs
the Location anew for the owner's host with the same access key (``X-Amz-Expires`` at most
``REDIRECT_TTL``, never past a presigned original's expiry): the owner verifies it like any
presigned URL. Anonymous requests get an unsigned Location.

Loop protection: the Location carries ``x-depot-redirected=1`` (signed with the rest); a gateway
never redirects a request that carries it, and never to itself.

botocore (boto3, the aws CLI) does not follow a 307 to its Location: it takes it for an S3 region
redirect, sends the request to the same endpoint again and fails with ``TemporaryRedirect``. Its
requests (recognised by their User-Agent) are served, not redirected, unless the client says it
follows (``x-depot-redirects: follow``), which :func:`follow_redirects` installs on a boto3 client.
Any client may opt out with ``x-depot-redirects: never``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from depot.client.routing import WorkerRouter
from depot.placement.membership import WorkerInfo
from depot.s3.sigv4 import (
    PRESIGN_PARAMS,
    REDIRECT_PARAM,
    Credentials,
    parse_amz_date,
    presign_query,
    uri_encode,
)

__all__ = [
    "FOLLOW_HEADER",
    "REDIRECT_PARAM",
    "REDIRECT_TTL",
    "SERVED_BY",
    "Redirector",
    "follow_redirects",
    "follows_redirects",
    "host_header",
]

FOLLOW_HEADER = "x-depot-redirects"
"""A request header: ``follow`` (redirect this request even from botocore) or ``never``."""
SERVED_BY = "x-depot-served-by"
"""A response header of GetObject/HeadObject with redirects on: the gateway that served it."""
REDIRECT_TTL = 120
"""Seconds a redirect's presigned Location stays valid (the client follows it at once; the
margin absorbs clock differences between workers)."""


def follows_redirects(headers: Mapping[str, str]) -> bool:
    """Whether the client of a request (lower-case header names) follows a 307 to its Location."""
    hint = headers.get(FOLLOW_HEADER)
    if hint is not None:
        return hint.strip().lower() == "follow"
    agent = headers.get("user-agent", "").lower()
    if agent.startswith("aiobotocore/"):
        return True  # aiohttp follows redirects (s3fs)
    return not (agent.startswith(("boto3/", "aws-cli/")) or "botocore" in agent)


def host_header(url: str) -> tuple[str, str]:
    """(scheme, Host header) of ``url``: what a client following it sends, default port left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and (parts.scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return parts.scheme, host


class Redirector:
    """Picks a read's owner gateway and builds the Location that sends a client there."""

    def __init__(
        self,
        router: WorkerRouter,
        credentials: Mapping[str, str],
        region: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.router = router
        self.credentials = dict(credentials)
        self.region = region
        self.endpoint: str | None = None  # this gateway's own advertised URL
        self.clock = clock
        self.sent = 0

    def _is_self(self, worker: WorkerInfo) -> bool:
        view = self.router.view
        return (
            worker.endpoint == self.router.seed
            or (view is not None and worker.worker_id == view.self_id)
            or (self.endpoint is not None and worker.s3_endpoint == self.endpoint)
        )

    def owner(self, path: str, start: int, end: int) -> WorkerInfo | None:
        """The worker whose gateway should serve bytes ``[start, end)`` of ``path``, or None
        (serve here): one placement key only, live owners only, never this gateway's worker."""
        view = self.router.view
        if view is None:
            return None
        file_key = view.file_key(path)
        if file_key is None:
            return None
        segment = view.policy.segment_size
        if segment > 0 and end > start and start // segment != (end - 1) // segment:
            return None  # spans segments owned by different workers: read them all here
        workers = view.route(file_key, start, spread=self.router.spread)
        owners = workers[: max(1, view.policy.replication)]
        if not owners or any(self._is_self(w) for w in owners):
            return None
        for worker in owners:
            if worker.s3_endpoint and worker.is_live and not self.router.is_down(worker.endpoint):
                return worker
        return None

    def location(
        self,
        target: str,
        path: str,
        params: list[tuple[str, str]],
        principal: str | None,
    ) -> str | None:
        """The Location of ``GET path?params`` at the gateway ``target``, or None when the
        request cannot be sent on (a presigned URL about to expire, an unknown key)."""
        scheme, host = host_header(target)
        pairs = [(n, v) for n, v in params if n not in PRESIGN_PARAMS and n != REDIRECT_PARAM]
        pairs.append((REDIRECT_PARAM, "1"))
        if principal is None:
            query = "&".join(f"{uri_encode(n)}={uri_encode(v)}" for n, v in sorted(pairs))
        else:
            secret = self.credentials.get(principal)
            if secret is None:
                return None
            ttl = REDIRECT_TTL
            given = dict(params)
            if "X-Amz-Expires" in given:
                when = parse_amz_date(given.get("X-Amz-Date", ""))
                if when is None or not given["X-Amz-Expires"].isdigit():
                    return None
                ttl = min(ttl, int(when + int(given["X-Amz-Expires"]) - self.clock()))
                if ttl < 1:
                    return None
            query = presign_query(
                Credentials(principal, secret), "GET", path, pairs, host,
                region=self.region, expires=ttl,
                amz_date=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock())),
            )  # fmt: skip
        return f"{scheme}://{host}{uri_encode(path, keep_slash=True)}?{query}"


def follow_redirects(s3_client: Any) -> Any:
    """Make a boto3 / botocore S3 client follow the gateway's read redirects; returns it.

    Its GetObject requests say ``x-depot-redirects: follow``; a ``307`` is followed once to its
    Location (a presigned URL: ``Authorization`` is not sent there), through the client's own
    HTTP session (its timeouts, proxies and TLS settings).
    """
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

    session = s3_client._endpoint.http_session

    def before_send(request: Any, **_: Any) -> Any:
        if request.method != "GET":
            return None
        request.headers[FOLLOW_HEADER] = "follow"
        response = session.send(request)
        location = response.headers.get("location")
        if response.status_code != 307 or not location:
            return response
        response.content  # noqa: B018 -- read the small error body, freeing the connection
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in ("authorization", "host")
        }
        follow = AWSRequest(method="GET", url=location, headers=headers).prepare()
        follow.stream_output = request.stream_output
        return session.send(follow)

    s3_client.meta.events.register("before-send.s3.GetObject", before_send)
    return s3_client
