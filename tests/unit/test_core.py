"""Core value types, errors and config."""

from __future__ import annotations

import asyncio
import errno
import pickle
from pathlib import Path

import pytest

from depot.core import errors
from depot.core.config import load_config
from depot.core.singleflight import SingleFlight
from depot.core.types import (
    Attributes,
    ByteRange,
    FileId,
    FileStatus,
    parse_duration,
    parse_size,
)


class TestErrors:
    def test_not_found_is_file_not_found(self) -> None:
        exc = errors.NotFound("no such file", "/x")
        assert isinstance(exc, FileNotFoundError)
        assert isinstance(exc, errors.DepotError)
        assert exc.errno == errno.ENOENT
        assert exc.http_status == 404
        assert str(exc) == "no such file: /x"

    def test_roundtrip_through_code(self) -> None:
        for cls in (errors.NotFound, errors.StaleVersion, errors.Throttled, errors.InvalidPath):
            exc = cls("m", "/p")
            back = errors.error_from_code(exc.to_dict()["code"], "m", "/p")
            assert type(back) is cls

    def test_unknown_code_is_base(self) -> None:
        assert type(errors.error_from_code("Nope", "m")) is errors.DepotError

    def test_pickle(self) -> None:
        exc = pickle.loads(pickle.dumps(errors.Timeout("slow", "/a")))
        assert isinstance(exc, errors.Timeout) and exc.path == "/a"

    @pytest.mark.parametrize(
        ("status", "cls"),
        [(404, errors.NotFound), (403, errors.PermissionDenied), (412, errors.StaleVersion),
         (416, errors.InvalidRange), (429, errors.Throttled), (400, errors.InvalidArgument),
         (502, errors.Unavailable), (504, errors.Timeout)],
    )
    def test_http_status_mapping(self, status: int, cls: type[errors.DepotError]) -> None:
        assert type(errors.error_for_http_status(status, "m")) is cls


class TestByteRange:
    @pytest.mark.parametrize(
        ("header", "size", "expected"),
        [
            ("bytes=0-99", 1000, (0, 100)),
            ("bytes=100-", 1000, (100, 1000)),
            ("bytes=-100", 1000, (900, 1000)),
            ("bytes=-5000", 1000, (0, 1000)),
            ("bytes=990-5000", 1000, (990, 1000)),
            (" bytes=0-0 ", 10, (0, 1)),
        ],
    )
    def test_parse(self, header: str, size: int, expected: tuple[int, int]) -> None:
        rng = ByteRange.parse_http(header, size)
        assert rng is not None and (rng.start, rng.end) == expected

    @pytest.mark.parametrize(
        "header",
        ["bytes=", "bytes=a-b", "items=0-1", "bytes=5-2", "bytes=0-1,3-4", "bytes=-0",
         "bytes=1000-", "bytes=-", "bytes=--1", "bytes=+1-2", "bytes=0x10-"],
    )
    def test_bad(self, header: str) -> None:
        with pytest.raises(errors.InvalidRange):
            ByteRange.parse_http(header, 1000)

    def test_pages(self) -> None:
        assert list(ByteRange(0, 10).pages(4)) == [0, 1, 2]
        assert list(ByteRange(4, 8).pages(4)) == [1]
        assert list(ByteRange(3, 3).pages(4)) == []

    def test_invalid(self) -> None:
        with pytest.raises(errors.InvalidRange):
            ByteRange(5, 2)


def test_file_id_depends_on_version() -> None:
    a = FileId("s3://b/k", "e:1")
    b = FileId("s3://b/k", "e:2")
    assert a.key != b.key and len(a.key) == 32
    assert a.key == FileId("s3://b/k", "e:1").key


def test_version_tag_precedence() -> None:
    assert FileStatus("/a", 1, 2.0, etag="x", version="v").version_tag == "v:v"
    assert FileStatus("/a", 1, 2.0, etag="x").version_tag == "e:x"
    assert FileStatus("/a", 1, 2.5).version_tag == "s:1:2500000"
    status = FileStatus("/a", 1, 2.0, etag="x")
    assert FileStatus.from_dict(status.to_dict()) == status


def test_attributes_are_normalised_hashable_and_round_trip() -> None:
    attrs = Attributes.of(
        {"content-TYPE": "text/csv", "Cache-Control": "no-cache"},
        {"Owner": "a", "content-type": "user value"},
    )
    assert attrs.headers == (("Cache-Control", "no-cache"), ("Content-Type", "text/csv"))
    # A metadata name that is also a header's stays metadata: the two never mix.
    assert attrs.metadata == (("content-type", "user value"), ("owner", "a"))
    assert attrs.content_type == "text/csv" and attrs.header("cache-control") == "no-cache"
    assert attrs.header("Content-Language") is None and Attributes().content_type is None
    assert hash(attrs) == hash(Attributes.of(dict(attrs.headers), dict(attrs.metadata)))
    assert Attributes.from_dict(attrs.to_dict()) == attrs
    status = FileStatus("/a", 1, 2.0, etag="x", attributes=attrs)
    assert hash(status) and FileStatus.from_dict(status.to_dict()) == status
    assert "attributes" not in FileStatus("/a", 1, 2.0).to_dict()
    assert pickle.loads(pickle.dumps(status)) == status
    for bad in ({"headers": {"X-Other": "v"}}, {"metadata": {"k": 1}}, {"extra": {}}, []):
        with pytest.raises(ValueError):
            Attributes.from_dict(bad)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4MiB", 4 << 20), ("10G", 10 << 30), ("512k", 512 << 10), ("1.5GiB", int(1.5 * (1 << 30))),
     ("1MB", 1_000_000), (123, 123), ("77", 77)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "4XB", "-1", "1..2G"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_duration() -> None:
    assert parse_duration("60s") == 60
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    assert parse_duration(3) == 3.0
    with pytest.raises(ValueError):
        parse_duration("soon")


class TestConfig:
    def test_defaults(self) -> None:
        cfg = load_config(environ={})
        assert cfg.worker.port == 7070
        assert cfg.cache.page_size == 4 << 20

    def test_file_env_flags_precedence(self, tmp_path: Path) -> None:
        file = tmp_path / "depot.yaml"
        file.write_text(
            "worker: {port: 1000}\ncache: {page_size: 1MiB}\nclient: {endpoint: http://a:1}\n"
            "mounts:\n  - {path: /, ufs: 'file:///srv'}\n"
        )
        env = {"DEPOT_WORKER__PORT": "2000", "DEPOT_ENDPOINT": "http://b:2"}
        cfg = load_config(file, environ=env, overrides={"worker": {"port": 3000}})
        assert cfg.worker.port == 3000
        assert cfg.cache.page_size == 1 << 20
        assert cfg.client.endpoint == "http://b:2"
        cfg = load_config(file, environ=env)
        assert cfg.worker.port == 2000

    def test_config_env_var_names_file(self, tmp_path: Path) -> None:
        file = tmp_path / "c.yaml"
        file.write_text("worker: {port: 1234}\n")
        assert load_config(environ={"DEPOT_CONFIG": str(file)}).worker.port == 1234

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("worker: {port: 99999}", "worker.port"),
            ("worker: {prot: 1}", "worker.prot"),
            ("cache: {page_size: 1000}", "page_size"),
            ("cache: {page_size: lots}", "not a size"),
            ("cache: {dirs: []}", "at least one cache dir"),
            ("mounts: [{path: /, ufs: 'file:///a'}, {path: /, ufs: 'file:///b'}]", "defined twice"),
            ("- just\n- a list", "mapping"),
            ("worker: {port: [", "not valid YAML"),
        ],
    )
    def test_bad_config_is_one_clear_error(self, tmp_path: Path, text: str, fragment: str) -> None:
        file = tmp_path / "bad.yaml"
        file.write_text(text)
        with pytest.raises(errors.ConfigError) as info:
            load_config(file, environ={})
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(errors.ConfigError, match="not found"):
            load_config(tmp_path / "nope.yaml", environ={})

    def test_secrets_masked(self) -> None:
        cfg = load_config(
            environ={},
            overrides={"mounts": [{"path": "/", "ufs": "s3://b", "options": {
                "secret_access_key": "s3cr3t", "access_key_id": "AK", "region": "r"}}]},
        )
        shown = cfg.to_public_dict()["mounts"][0]["options"]
        assert shown["secret_access_key"] == "***"
        assert shown["access_key_id"] == "AK"


async def test_single_flight_shares_one_call() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 7

    results = await asyncio.gather(*(flight.do("k", work) for _ in range(10)))
    assert results == [7] * 10
    assert calls == 1
    assert flight.shared == 9
    assert len(flight) == 0


async def test_single_flight_error_reaches_all_and_clears() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise errors.Unavailable("down")

    results = await asyncio.gather(*(flight.do("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, errors.Unavailable) for r in results)

    async def ok() -> int:
        return 1

    assert await flight.do("k", ok) == 1


async def test_single_flight_cancel_one_caller_keeps_others() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def slow() -> int:
        await asyncio.sleep(0.05)
        return 3

    first = asyncio.ensure_future(flight.do("k", slow))
    second = asyncio.ensure_future(flight.do("k", slow))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == 3
