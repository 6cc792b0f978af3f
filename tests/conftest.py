"""Shared fixtures: a real moto S3 server over HTTP, buckets, a cuttable TCP relay."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator, Generator, Iterator

import aiohttp
import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.relay import TcpRelay
from tests.s3_gate import S3Gate

pytest_plugins = ["tests.stores.fixtures"]

#: Each phase's report of a test ("setup", "call", "teardown"), so a fixture's
#: teardown can tell whether the test failed and print what explains it.
phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(phase_reports, {})[report.when] = report
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; tests use their own buckets."""
    # One access-log line per S3 call would bury a failing test's own output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(moto_endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def bucket(s3_client) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that leaves bodies as sent (tests compare bytes)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def gate(moto_endpoint: str) -> AsyncIterator[S3Gate]:
    """A steerable proxy in front of moto (``tests.s3_gate``)."""
    gate = S3Gate(moto_endpoint)
    yield gate
    await gate.close()


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any credentials; never let tests find real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def relay(moto_endpoint: str) -> Iterator[TcpRelay]:
    """A TCP relay in front of moto that a test can cut (S3 down) and restore."""
    port = int(moto_endpoint.rsplit(":", 1)[1])
    with TcpRelay("127.0.0.1", port) as r:
        yield r
