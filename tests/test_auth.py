"""The auth webhook client against a real aiohttp app playing the main service."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from app.auth.webhook import (
    AllowAll,
    AuthRequest,
    Grant,
    WebhookAuthorizer,
    make_authorizer,
)
from app.config import AuthConfig
from app.errors import AuthRefused, AuthUnavailable, Forbidden, Unauthorized

Answer = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


async def allow_empty(document: dict[str, Any]) -> web.StreamResponse:
    return web.Response(status=200)


class FakeWebhook:
    """The main application's auth endpoint: records what it was asked."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answer: Answer = allow_empty
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        document = await request.json()
        self.received.append(document)
        return await self.answer(document)


@pytest.fixture
async def webhook(aiohttp_server) -> FakeWebhook:
    hook = FakeWebhook()
    app = web.Application()
    app.router.add_post("/auth", hook.handle)
    server = await aiohttp_server(app)
    hook.url = str(server.make_url("/auth"))
    return hook


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client:
        yield client


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/auth"


def auth_request(
    action: str = "create",
    name: str = "videos/a.mp4",
    headers: dict[str, str] | None = None,
) -> AuthRequest:
    raw = CIMultiDict(headers if headers is not None else {"Authorization": "Bearer alice"})
    return AuthRequest(
        action=action,  # type: ignore[arg-type]
        name=name,
        key=f"uploads/{name}",
        content_length=1024,
        content_range="bytes 0-1023/4096",
        content_type="video/mp4",
        remote_addr="203.0.113.7",
        headers=CIMultiDictProxy(raw),
    )


def authorizer(url: str, session: aiohttp.ClientSession, **config: Any) -> WebhookAuthorizer:
    return WebhookAuthorizer(AuthConfig(webhook_url=url, **config), session)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- allowed -------------------------------------------------------------------


async def test_allow_parses_grant_and_sends_the_request(webhook, session):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(
            {"metadata": {"user": "alice", "plan": "pro"}, "max_size": 10_000, "owner": "u-42",
             "ignored_future_field": [1, 2]}
        )

    webhook.answer = answer
    grant = await authorizer(webhook.url, session).authorize(auth_request())

    assert grant == Grant(metadata={"user": "alice", "plan": "pro"}, max_size=10_000, owner="u-42")
    assert webhook.received == [{
        "action": "create",
        "name": "videos/a.mp4",
        "key": "uploads/videos/a.mp4",
        "content_length": 1024,
        "content_range": "bytes 0-1023/4096",
        "content_type": "video/mp4",
        "remote_addr": "203.0.113.7",
        "headers": {"Authorization": "Bearer alice"},
        "dialect": "upload",
    }]


@pytest.mark.parametrize("status", [200, 204])
async def test_empty_2xx_is_a_plain_grant(webhook, session, status):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status)

    webhook.answer = answer
    assert await authorizer(webhook.url, session).authorize(auth_request()) == Grant()


async def test_null_fields_are_absent(webhook, session):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"metadata": None, "max_size": None, "owner": None})

    webhook.answer = answer
    assert await authorizer(webhook.url, session).authorize(auth_request()) == Grant()


async def test_allow_all_allows():
    assert await AllowAll().authorize(auth_request(headers={})) == Grant()


# --- refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"), [(401, Unauthorized), (403, Forbidden), (418, AuthRefused)]
)
async def test_refusals_pass_through_with_the_webhook_message(webhook, session, status, error):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"message": "quota exceeded"}, status=status)

    webhook.answer = answer
    with pytest.raises(error) as caught:
        await authorizer(webhook.url, session).authorize(auth_request())
    assert caught.value.status == status
    assert caught.value.message == "quota exceeded"


async def test_refusal_without_json_gets_a_generic_message(webhook, session):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=429, text="<html>slow down</html>")

    webhook.answer = answer
    with pytest.raises(AuthRefused) as caught:
        await authorizer(webhook.url, session).authorize(auth_request())
    assert caught.value.status == 429
    assert "429" in caught.value.message


# --- unavailable: fail closed ------------------------------------------------------


async def test_slow_webhook_times_out(webhook, session):
    release = asyncio.Event()

    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        # Bounded so the test server can shut down even if the test fails.
        await asyncio.wait_for(release.wait(), 5)
        return web.Response()

    webhook.answer = answer
    started = time.monotonic()
    try:
        with pytest.raises(AuthUnavailable) as caught:
            await authorizer(webhook.url, session, timeout=0.2).authorize(auth_request())
    finally:
        release.set()
    assert time.monotonic() - started < 2
    assert caught.value.status == 503
    assert "Retry-After" in caught.value.headers()


async def test_webhook_down_is_unavailable(session):
    with pytest.raises(AuthUnavailable):
        await authorizer(closed_port_url(), session).authorize(auth_request())


@pytest.mark.parametrize("status", [500, 502, 503, 302, 307])
async def test_5xx_and_3xx_are_unavailable(webhook, session, status):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": webhook.url})

    webhook.answer = answer
    with pytest.raises(AuthUnavailable):
        await authorizer(webhook.url, session).authorize(auth_request())
    # A redirect is not followed: it would forward the credentials elsewhere.
    assert len(webhook.received) == 1


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        '"allowed"',
        '{"metadata": ["a"]}',
        '{"metadata": {"a": 1}}',
        '{"max_size": -1}',
        '{"max_size": "10"}',
        '{"max_size": 1.5}',
        '{"max_size": true}',
        '{"owner": 42}',
        '{"allow_replace": "yes"}',
        '{"allow_replace": 1}',
    ],
)
async def test_garbage_2xx_is_unavailable(webhook, session, body):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=200, text=body, content_type="application/json")

    webhook.answer = answer
    with pytest.raises(AuthUnavailable) as caught:
        await authorizer(webhook.url, session).authorize(auth_request())
    assert "garbage" in caught.value.message


async def test_oversized_2xx_is_unavailable(webhook, session):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"metadata": {"blob": "x" * 100_000}})

    webhook.answer = answer
    with pytest.raises(AuthUnavailable):
        await authorizer(webhook.url, session).authorize(auth_request())


async def test_failures_are_logged_without_credentials(webhook, session, caplog):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=500)

    webhook.answer = answer
    caplog.set_level(logging.DEBUG, logger="app.auth")
    request = auth_request(headers={"Authorization": "Bearer TOPSECRET", "Cookie": "sid=COOKIE"})
    with pytest.raises(AuthUnavailable):
        await authorizer(webhook.url, session).authorize(request)
    assert "HTTP 500" in caplog.text
    assert "TOPSECRET" not in caplog.text
    assert "COOKIE" not in caplog.text


# --- forwarded headers -------------------------------------------------------------


async def test_only_forward_headers_are_forwarded(webhook, session):
    request = auth_request(headers={
        "authorization": "Bearer alice",
        "cookie": "sid=1",
        "x-tenant": "acme",
        "x-other": "nope",
        "content-range": "bytes 0-1023/4096",
    })
    await authorizer(
        webhook.url, session, forward_headers=("Authorization", "X-Tenant", "X-Absent")
    ).authorize(request)
    assert webhook.received[0]["headers"] == {"Authorization": "Bearer alice", "X-Tenant": "acme"}


async def test_forward_headers_match_case_insensitively_in_plain_dicts(webhook, session):
    request = AuthRequest(
        action="status", name="a", key="a", content_length=None, content_range="bytes */*",
        content_type=None, remote_addr=None, headers={"COOKIE": "sid=1"},
    )
    await authorizer(webhook.url, session).authorize(request)
    assert webhook.received[0]["headers"] == {"Cookie": "sid=1"}


async def test_no_credentials_sends_empty_headers(webhook, session):
    await authorizer(webhook.url, session).authorize(auth_request(headers={}))
    assert webhook.received[0]["headers"] == {}


# --- cache ---------------------------------------------------------------------


async def test_cache_hit_within_ttl(webhook, session):
    auth = authorizer(webhook.url, session, cache_ttl=60)
    first = await auth.authorize(auth_request())
    second = await auth.authorize(auth_request())
    assert first == second
    assert auth.calls == 1
    assert len(webhook.received) == 1


async def test_cached_grant_cannot_be_changed_by_a_caller(webhook, session):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"metadata": {"user": "alice"}})

    webhook.answer = answer
    auth = authorizer(webhook.url, session, cache_ttl=60)
    first = await auth.authorize(auth_request())
    first.metadata["injected"] = "x"  # type: ignore[index]
    second = await auth.authorize(auth_request())
    assert second.metadata == {"user": "alice"}
    assert auth.calls == 1


async def test_cache_never_crosses_credentials(webhook, session):
    auth = authorizer(webhook.url, session, cache_ttl=60)
    await auth.authorize(auth_request(headers={"Authorization": "Bearer alice"}))
    await auth.authorize(auth_request(headers={"Authorization": "Bearer mallory"}))
    await auth.authorize(auth_request(headers={}))
    await auth.authorize(auth_request(headers={"Authorization": "Bearer alice", "Cookie": "s=1"}))
    assert auth.calls == 4


async def test_cache_is_per_action_and_name(webhook, session):
    auth = authorizer(webhook.url, session, cache_ttl=60)
    await auth.authorize(auth_request(action="status"))
    await auth.authorize(auth_request(action="create"))
    await auth.authorize(auth_request(action="create", name="videos/b.mp4"))
    assert auth.calls == 3
    await auth.authorize(auth_request(action="status"))
    assert auth.calls == 3


async def test_ttl_zero_disables_the_cache(webhook, session):
    auth = authorizer(webhook.url, session, cache_ttl=0)
    await auth.authorize(auth_request())
    await auth.authorize(auth_request())
    assert auth.calls == 2


async def test_expired_entry_is_refetched(webhook, session):
    clock = FakeClock()
    auth = WebhookAuthorizer(AuthConfig(webhook_url=webhook.url, cache_ttl=30), session,
                             clock=clock)
    await auth.authorize(auth_request())
    clock.now += 29.9
    await auth.authorize(auth_request())
    assert auth.calls == 1
    clock.now += 0.2
    await auth.authorize(auth_request())
    assert auth.calls == 2


async def test_expired_entry_is_refetched_in_real_time(webhook, session):
    auth = authorizer(webhook.url, session, cache_ttl=0.2)
    await auth.authorize(auth_request())
    await asyncio.sleep(0.3)
    await auth.authorize(auth_request())
    assert auth.calls == 2


@pytest.mark.parametrize("status", [401, 403, 404, 500])
async def test_negative_answers_are_never_cached(webhook, session, status):
    async def answer(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=status)

    webhook.answer = answer
    auth = authorizer(webhook.url, session, cache_ttl=60)
    for _ in range(2):
        with pytest.raises((Unauthorized, Forbidden, AuthRefused, AuthUnavailable)):
            await auth.authorize(auth_request())
    assert auth.calls == 2


async def test_a_refusal_after_an_expired_allow_is_not_masked(webhook, session):
    clock = FakeClock()
    auth = WebhookAuthorizer(AuthConfig(webhook_url=webhook.url, cache_ttl=10), session,
                             clock=clock)
    await auth.authorize(auth_request())

    async def revoked(document: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=401)

    webhook.answer = revoked
    clock.now += 11
    with pytest.raises(Unauthorized):
        await auth.authorize(auth_request())


async def test_cache_is_bounded_and_evicts_the_oldest(webhook, session):
    auth = WebhookAuthorizer(AuthConfig(webhook_url=webhook.url, cache_ttl=60), session,
                             cache_size=2)
    for token in ("a", "b", "c"):
        await auth.authorize(auth_request(headers={"Authorization": token}))
    assert auth.calls == 3
    await auth.authorize(auth_request(headers={"Authorization": "c"}))
    await auth.authorize(auth_request(headers={"Authorization": "b"}))
    assert auth.calls == 3
    await auth.authorize(auth_request(headers={"Authorization": "a"}))
    assert auth.calls == 4


# --- factory -------------------------------------------------------------------


async def test_make_authorizer_without_webhook_allows_all_and_warns(session, caplog):
    caplog.set_level(logging.WARNING, logger="app.auth")
    auth = make_authorizer(AuthConfig(), session)
    assert isinstance(auth, AllowAll)
    assert "every request is allowed" in caplog.text


async def test_make_authorizer_with_webhook(webhook, session):
    auth = make_authorizer(AuthConfig(webhook_url=webhook.url), session)
    assert isinstance(auth, WebhookAuthorizer)
    assert await auth.authorize(auth_request()) == Grant()
