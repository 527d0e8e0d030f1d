"""Starting the gateway: settings, credentials from the environment, ``depot s3``, raw garbage."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.config import DepotConfig, load_config
from depot.core.errors import ConfigError
from depot.s3.server import build_gateway, gateway_credentials, start_gateway


def config(**s3: object) -> DepotConfig:
    return load_config(environ={}, overrides={"s3": s3})


def test_s3_settings_validation_and_masking() -> None:
    cfg = config(access_key="AK", secret_key="SK", clock_skew="5m", region="eu-west-1")
    assert cfg.s3.clock_skew == 300 and cfg.s3.region == "eu-west-1"
    public = cfg.to_public_dict()["s3"]
    assert public["secret_key"] == "***" and public["access_key"] == "AK"
    assert "SK" not in repr(cfg.s3)
    for bad in (
        {"access_key": "AK"},
        {"bucket_mode": "mapped"},
        {"buckets": {"a/b": "/x"}},
        {"buckets": {"ok": "relative"}},
        {"region": "Not A Region"},
        {"max_keys": 0},
        {"unknown": 1},
    ):
        with pytest.raises(ConfigError):
            config(**bad)
    env = load_config(environ={"DEPOT_S3__ANONYMOUS": "true"})
    assert env.s3.anonymous


def test_credentials_from_environment_win() -> None:
    settings_ = config(access_key="FILEKEY", secret_key="FILESECRET").s3
    assert gateway_credentials(settings_, {}) == {"FILEKEY": "FILESECRET"}
    env = {"DEPOT_S3_ACCESS_KEY": "ENVKEY", "DEPOT_S3_SECRET_KEY": "ENVSECRET"}
    assert gateway_credentials(settings_, env) == {"ENVKEY": "ENVSECRET"}
    assert gateway_credentials(config().s3, {}) == {}
    with pytest.raises(ConfigError):
        gateway_credentials(config().s3, {"DEPOT_S3_ACCESS_KEY": "only-the-key"})


def test_gateway_refuses_to_let_nobody_in() -> None:
    with pytest.raises(ConfigError) as info:
        build_gateway(config(), object(), {})  # type: ignore[arg-type]
    assert "DEPOT_S3_ACCESS_KEY" in str(info.value)
    assert build_gateway(config(anonymous=True), object(), {}).verifier.anonymous  # type: ignore[arg-type]


async def test_start_and_stop_on_a_free_port() -> None:
    class Client:
        endpoint = "http://127.0.0.1:1"

    running = await start_gateway(config(anonymous=True), Client(), "127.0.0.1", 0, environ={})  # type: ignore[arg-type]
    assert running.port > 0 and running.endpoint == f"http://127.0.0.1:{running.port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"GET /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    assert data.startswith(b"HTTP/1.1 413") and b"<Code>EntityTooLarge</Code>" in data
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"GET /b?" + b"q" * 70000 + b" HTTP/1.1\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    assert data.startswith(b"HTTP/1.1 431") and b"RequestHeaderSectionTooLarge" in data
    writer.close()
    await running.stop()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_raw_garbage(garbage: bytes) -> None:
    class Client:
        endpoint = "http://127.0.0.1:1"

        async def stat(self, path: str, *, attributes: bool = False) -> object:
            raise ConnectionError("never reached in a sane test")

    async def run() -> None:
        running = await start_gateway(config(anonymous=False, access_key="A", secret_key="S"), Client(), "127.0.0.1", 0, environ={})  # type: ignore[arg-type]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(garbage + b"\r\n\r\n")
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            assert data == b"" or data.startswith(b"HTTP/1.1 ")
            if data.startswith(b"HTTP/1.1 2"):
                raise AssertionError(f"garbage was served: {data[:200]!r}")
            # still serving
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
            assert data.startswith(b"HTTP/1.1 403") and b"<Code>AccessDenied</Code>" in data
        finally:
            await running.stop()

    asyncio.run(run())


def test_cli_register_and_errors(tmp_path: object) -> None:
    import click

    from depot.cli.s3 import register

    group = click.Group()
    register(group)
    assert "s3" in group.commands
    runner = CliRunner()
    result = runner.invoke(group, ["s3", "--help"])
    assert result.exit_code == 0 and "--endpoint" in result.output and "--port" in result.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    result = runner.invoke(group, ["s3", "--port", "0"], env=env | {"DEPOT_CONFIG": "/nonexistent.yaml"})
    assert result.exit_code == 1 and "depot: error:" in result.output


def test_cli_serves_until_terminated() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    env |= {"DEPOT_S3_ACCESS_KEY": "AK", "DEPOT_S3_SECRET_KEY": "SK", "DEPOT_S3__ANONYMOUS": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from depot.cli.s3 import s3_command; s3_command()", "--port", "0",
         "--endpoint", "http://127.0.0.1:1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert "depot S3 gateway listening on http://127.0.0.1:" in banner
        endpoint = banner.split(" listening on ", 1)[1].split(" ", 1)[0]
        # no worker behind it and no mounts to fall back to: a retryable S3 error, not a crash
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{endpoint}/bucket/key", timeout=10)
        assert info.value.code == 503 and b"<Code>ServiceUnavailable</Code>" in info.value.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
