"""Ops endpoints, metrics and the access log, on the real app over a real port."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from botocore.exceptions import ClientError, EndpointConnectionError
from prometheus_client.parser import text_string_to_metric_families

from app.auth.webhook import AuthRequest, Grant
from app.config import Config, config_from_mapping, replace
from app.errors import Forbidden
from app.http import keys
from app.ops.logs import JsonFormatter
from app.ops.metrics import Metrics
from app.service import create_app
from app.stores.s3.client import observe_client_calls
from tests.relay import TcpRelay

MIB = 1024 * 1024


@asynccontextmanager
async def serve(config: Config, **options: Any) -> AsyncIterator[tuple[str, web.Application]]:
    app = create_app(config, **options)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def fs_config(tmp_path: Path) -> Config:
    return config_from_mapping({"storage": {"filesystem": {"root": str(tmp_path / "data"),
                                                           "fsync": False}}})


def s3_config(endpoint: str, bucket: str) -> Config:
    return config_from_mapping({"storage": {"backend": "s3", "s3": {
        "bucket": bucket, "endpoint_url": endpoint, "prefix": "uploads/",
        "addressing_style": "path", "max_attempts": 1, "connect_timeout": "2s",
        "read_timeout": "5s"}}})


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def metrics_of(http: aiohttp.ClientSession, url: str) -> dict[Any, float]:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return scrape(await resp.text())


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((f"upload_proxy_{name}", tuple(sorted(labels.items()))), 0.0)


def requests(samples: dict[Any, float], action: str, status: str) -> float:
    """Requests of our own dialect with this action and status."""
    return value(samples, "http_requests_total", dialect="upload", action=action, status=status)


# -- health -------------------------------------------------------------------------


async def test_healthz_and_readyz_on_the_filesystem_store(tmp_path, http) -> None:
    async with serve(fs_config(tmp_path)) as (url, _):
        assert await get_json(http, f"{url}/healthz") == (200, {"status": "ok"})
        assert await get_json(http, f"{url}/readyz") == (200, {"status": "ok"})
        async with http.head(f"{url}/healthz") as resp:
            assert resp.status == 200


async def test_readyz_follows_s3_through_a_cut(tmp_path, http, relay: TcpRelay, bucket) -> None:
    async with serve(s3_config(relay.url, bucket), readiness_ttl=0) as (url, _):
        assert await get_json(http, f"{url}/readyz") == (200, {"status": "ok"})
        relay.stop()
        status, doc = await get_json(http, f"{url}/readyz")
        assert status == 503
        assert doc["error"] == "storage_unavailable"
        assert "S3 PutObject failed" in doc["message"]
        # Liveness does no I/O: the process is fine, only storage is not.
        assert await get_json(http, f"{url}/healthz") == (200, {"status": "ok"})
        relay.start()
        assert await get_json(http, f"{url}/readyz") == (200, {"status": "ok"})


async def test_readyz_answer_is_cached(tmp_path, http, relay: TcpRelay, bucket) -> None:
    async with serve(s3_config(relay.url, bucket), readiness_ttl=60) as (url, _):
        assert (await get_json(http, f"{url}/readyz"))[0] == 200
        relay.stop()
        # Within the TTL the last answer stands, without touching storage.
        assert (await get_json(http, f"{url}/readyz"))[0] == 200
        relay.start()


async def test_readyz_is_503_while_shutting_down(tmp_path, http) -> None:
    async with serve(fs_config(tmp_path), readiness_ttl=0) as (url, app):
        await app.on_shutdown.send(app)
        status, doc = await get_json(http, f"{url}/readyz")
        assert (status, doc["error"]) == (503, "shutting_down")


# -- metrics ------------------------------------------------------------------------


class Refuses:
    async def authorize(self, request: AuthRequest) -> Grant:
        if request.name.startswith("private/"):
            raise Forbidden("not yours")
        return Grant()


async def test_metrics_count_a_known_upload(tmp_path, http) -> None:
    data = os.urandom(3 * MIB + 5)
    async with serve(fs_config(tmp_path), authorizer=Refuses()) as (url, app):
        before = await metrics_of(http, url)
        assert value(before, "bytes_received_total") == 0
        assert value(before, "uploads_in_progress") == 0

        # Three chunks, the second resent once (its overlap is received, not stored).
        target = f"{url}/upload/videos/known.mp4"
        spans = [(0, MIB), (MIB, 2 * MIB), (MIB, 2 * MIB), (2 * MIB, len(data))]
        for start, end in spans:
            async with http.put(target, data=data[start:end], allow_redirects=False, headers={
                "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}) as resp:
                assert resp.status == (200 if end == len(data) else 308)
        # Repeat requests to the completed upload are not completions.
        async with http.put(target, headers={"Content-Range": "bytes */*"}) as resp:
            assert resp.status == 200
        async with http.put(f"{url}/upload/gone.bin", data=b"abc",
                            headers={"Content-Range": "bytes 0-2/10"}) as resp:
            assert resp.status == 308
        async with http.delete(f"{url}/upload/gone.bin") as resp:
            assert resp.status == 204
        async with http.put(f"{url}/upload/private/x", data=b"no") as resp:
            assert resp.status == 403

        after = await metrics_of(http, url)
        assert value(after, "bytes_received_total") == len(data) + MIB + 3
        assert value(after, "bytes_stored_total") == len(data) + 3
        assert value(after, "uploads_started_total") == 2
        assert value(after, "uploads_completed_total") == 1
        assert value(after, "uploads_cancelled_total") == 1
        assert value(after, "uploads_failed_total") == 0
        assert value(after, "uploads_in_progress") == 0
        assert value(after, "buffered_bytes") == 0
        assert value(after, "writer_takeovers_total") == 0
        assert requests(after, "create", "308") == 2
        assert requests(after, "append", "308") == 2
        assert requests(after, "append", "200") == 1
        assert requests(after, "status", "200") == 1
        assert requests(after, "cancel", "204") == 1
        assert value(after, "http_requests_total",
                     dialect="none", action="metrics", status="200") == 1
        assert value(after, "auth_decisions_total", outcome="allowed") == 7
        assert value(after, "auth_decisions_total", outcome="forbidden") == 1
        assert value(after, "auth_duration_seconds_count") == 8
        assert value(after, "http_request_duration_seconds_count",
                     dialect="upload", action="append") == 3
        # Each app owns its registry: a second app starts from zero.
        assert app[keys.METRICS].registry is not Metrics().registry
    async with serve(fs_config(tmp_path)) as (url, _):
        assert value(await metrics_of(http, url), "uploads_completed_total") == 0


async def test_storage_failures_count_as_failed_uploads(tmp_path, http, relay, bucket) -> None:
    async with serve(s3_config(relay.url, bucket)) as (url, _):
        relay.stop()
        async with http.put(f"{url}/upload/a.bin", data=b"abc") as resp:
            assert resp.status == 503
        samples = await metrics_of(http, url)
        assert value(samples, "uploads_failed_total") == 1
        assert requests(samples, "create", "503") == 1
        relay.start()


async def test_instrumented_s3_client_records_latency_and_errors(
    moto_endpoint: str, bucket: str, relay: TcpRelay
) -> None:
    metrics = Metrics()
    config = AioConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2,
                       s3={"addressing_style": "path"})
    async with get_session().create_client("s3", endpoint_url=moto_endpoint,
                                           region_name="us-east-1", config=config) as client:
        observe_client_calls(client, metrics.s3_calls)
        observe_client_calls(client, metrics.s3_calls)  # twice: still counted once
        await client.put_object(Bucket=bucket, Key="k", Body=b"x")
        with pytest.raises(ClientError):
            await client.get_object(Bucket=bucket, Key="missing")
    async with get_session().create_client("s3", endpoint_url=relay.url,
                                           region_name="us-east-1", config=config) as client:
        observe_client_calls(client, metrics.s3_calls)
        relay.stop()
        with pytest.raises(EndpointConnectionError):
            await client.head_object(Bucket=bucket, Key="k")
        relay.start()
    samples = scrape(metrics.render()[0].decode())
    assert value(samples, "s3_request_duration_seconds_count", operation="PutObject") == 1
    assert value(samples, "s3_request_duration_seconds_count", operation="GetObject") == 1
    assert value(samples, "s3_request_duration_seconds_count", operation="HeadObject") == 1
    assert value(samples, "s3_errors_total", operation="GetObject", code="NoSuchKey") == 1
    assert value(samples, "s3_errors_total", operation="HeadObject",
                 code="EndpointConnectionError") == 1
    assert value(samples, "s3_errors_total", operation="PutObject", code="NoSuchKey") == 0


# -- access log -----------------------------------------------------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "app.access"]


async def test_access_log_fields_and_no_credentials(tmp_path, http, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="app")
    secret = "Bearer sk_live_TOPSECRET_abc123"
    data = os.urandom(2 * MIB)
    async with serve(fs_config(tmp_path)) as (url, _):
        target = f"{url}/upload/logs/a.bin"
        for i, (start, end) in enumerate([(0, MIB), (MIB, 2 * MIB)]):
            async with http.put(target, data=data[start:end], allow_redirects=False, headers={
                "Content-Range": f"bytes {start}-{end - 1}/{len(data)}",
                "Authorization": secret, "Cookie": "session=COOKIESECRET",
                "X-Request-Id": f"req-{i}",
            }) as resp:
                assert resp.headers["X-Request-Id"] == f"req-{i}"
        async with http.put(target, headers={"Content-Range": "bytes */*",
                                             "X-Request-Id": "bad id with spaces"}) as resp:
            generated = resp.headers["X-Request-Id"]
            assert len(generated) == 32 and " " not in generated
        async with http.get(f"{url}/healthz") as resp:
            assert resp.headers["X-Request-Id"]

    records = access_records(caplog)
    first, second, probe, health = records
    assert (first.request_id, first.action, first.status, first.bytes) == (  # type: ignore[attr-defined]
        "req-0", "create", 308, MIB)
    assert (first.offset_before, first.offset) == (0, MIB)  # type: ignore[attr-defined]
    assert (second.action, second.status, second.received) == (  # type: ignore[attr-defined]
        "append", 200, MIB)
    assert (second.offset_before, second.offset) == (MIB, 2 * MIB)  # type: ignore[attr-defined]
    assert second.upload_name == "logs/a.bin"  # type: ignore[attr-defined]
    assert second.duration_ms >= 0  # type: ignore[attr-defined]
    assert probe.request_id == generated  # type: ignore[attr-defined]
    # Probes are frequent: DEBUG unless they fail.
    assert (health.action, health.levelno) == ("healthz", logging.DEBUG)  # type: ignore[attr-defined]

    lines = [JsonFormatter().format(r) for r in caplog.records]
    doc = json.loads(lines[caplog.records.index(second)])
    for field in ("request_id", "upload_name", "action", "status", "bytes", "received",
                  "offset_before", "offset", "duration_ms"):
        assert field in doc
    everything = caplog.text + "\n".join(lines)
    assert "TOPSECRET" not in everything
    assert "COOKIESECRET" not in everything


async def test_callback_outcomes_are_counted(tmp_path, http, aiohttp_server) -> None:
    answers = [500, 200]
    received = asyncio.Event()

    async def main_app(request: web.Request) -> web.Response:
        await request.read()
        status = answers.pop(0)
        if status == 200:
            received.set()
        return web.Response(status=status)

    receiver = web.Application()
    receiver.router.add_post("/done", main_app)
    server = await aiohttp_server(receiver)
    config = replace(fs_config(tmp_path), callbacks={
        "on_complete_url": str(server.make_url("/done")), "secret": "s", "backoff": 0.01})
    async with serve(config) as (url, _):
        async with http.put(f"{url}/upload/cb.bin", data=b"payload") as resp:
            assert resp.status == 200
        async with asyncio.timeout(10):
            await received.wait()
        async with asyncio.timeout(10):
            while value(samples := await metrics_of(http, url), "callbacks_delivered_total") < 1:
                await asyncio.sleep(0.02)
        assert value(samples, "callback_attempts_failed_total") == 1
        assert value(samples, "callbacks_given_up_total") == 0
