"""Who may upload what: the ``Authorizer`` boundary and its two implementations.

The upload handlers ask an ``Authorizer`` before reading any body byte. In
production that is ``WebhookAuthorizer``: the main application answers a small
JSON POST and stays the only place that knows users, tokens and quotas. Without
a webhook configured, ``AllowAll`` lets everything through (development only).

Webhook contract (what the main application implements)::

    POST {auth.webhook_url}
    {"action": "create" | "append" | "status" | "cancel", "name": ..., "key": ...,
     "content_length": int | null, "content_range": str | null,
     "content_type": str | null, "remote_addr": str | null,
     "headers": {<only the configured forward_headers the client sent>},
     "dialect": "upload" | "gcs" | "tus" | "ietf", <dialect facts, e.g. "bucket">}

    2xx, empty body or {"metadata": {str: str}, "max_size": int >= 0, "owner": str,
                        "name": str (the object name, for tus and the IETF draft),
                        "allow_replace": bool (may replace another owner's object)}
        -> allowed (every field optional)
    401 / 403 / other 4xx -> refused with that status ({"message": ...} is passed on)
    anything else, timeouts, connection errors, malformed 2xx bodies
        -> 503 with Retry-After: the proxy fails closed

Allowed answers may be cached (``auth.cache_ttl``) per action, dialect, name and
forwarded credential values. A webhook that decides on per-request fields
(``content_length``, ``content_range``, ``remote_addr``) must keep the cache off
or express the limit as ``max_size``, which the engine enforces on every request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp
from yarl import URL

from app.config import AuthConfig
from app.core.grant import Grant
from app.errors import AuthRefused, AuthUnavailable, Forbidden, Unauthorized

logger = logging.getLogger("app.auth")

Action = Literal["create", "append", "status", "cancel"]

#: Bound on cached grants so a flood of distinct tokens cannot grow memory without limit.
DEFAULT_CACHE_SIZE = 10_000
#: A webhook answer larger than this is not a grant; refuse to buffer it.
_MAX_ANSWER_BYTES = 64 * 1024
#: Keep refusal messages passed to clients short; they come from another service.
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class AuthRequest:
    """What the webhook is told about one client request."""

    action: Action
    name: str
    key: str
    content_length: int | None
    content_range: str | None
    content_type: str | None
    remote_addr: str | None
    #: Every request header, looked up case-insensitively; only the configured
    #: ``forward_headers`` ever leave the process.
    headers: Mapping[str, str]
    #: The wire dialect the client speaks ("upload", "gcs", "tus", "ietf").
    dialect: str = "upload"
    #: Dialect-specific facts the webhook may decide on (e.g. a GCS bucket).
    extra: Mapping[str, str] = field(default_factory=dict)


class Authorizer(Protocol):
    async def authorize(self, request: AuthRequest) -> Grant:
        """Return the grant, or raise ``Unauthorized``, ``Forbidden``,
        ``AuthRefused`` (refused) or ``AuthUnavailable`` (cannot decide)."""
        ...


class AllowAll:
    """Allows every request; for development without an auth service."""

    async def authorize(self, request: AuthRequest) -> Grant:
        return Grant()


class WebhookAuthorizer:
    """Asks the main application's auth webhook, failing closed."""

    def __init__(
        self,
        config: AuthConfig,
        session: aiohttp.ClientSession,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.webhook_url:
            raise ValueError("WebhookAuthorizer needs auth.webhook_url")
        self._config = config
        self._session = session
        self._url = config.webhook_url
        # Userinfo in the URL is a credential too; keep it out of the logs.
        self._log_url = str(URL(config.webhook_url).with_user(None))
        # The answer is bounded by ``timeout`` once a connection is had; waiting
        # for one (a busy pool) by ``connect_timeout``: a burst of requests
        # queues for a connection instead of failing as if the webhook were down.
        self._timeout = aiohttp.ClientTimeout(
            total=config.connect_timeout + config.timeout,
            connect=config.connect_timeout,
            sock_read=config.timeout,
        )
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Grant]] = OrderedDict()
        #: Webhook requests made (cache hits excluded); for tests and metrics.
        self.calls = 0

    async def authorize(self, request: AuthRequest) -> Grant:
        forwarded = _forwarded_headers(request.headers, self._config.forward_headers)
        cache_key = self._cache_key(request, forwarded) if self._config.cache_ttl > 0 else None
        if cache_key is not None:
            grant = self._cached(cache_key)
            if grant is not None:
                return grant
        grant = await self._ask(request, forwarded)
        if cache_key is not None:
            self._remember(cache_key, grant)
        return grant

    async def _ask(self, request: AuthRequest, forwarded: dict[str, str]) -> Grant:
        document = {
            "action": request.action,
            "name": request.name,
            "key": request.key,
            "content_length": request.content_length,
            "content_range": request.content_range,
            "content_type": request.content_type,
            "remote_addr": request.remote_addr,
            "headers": forwarded,
            "dialect": request.dialect,
            **request.extra,
        }
        self.calls += 1
        try:
            # Redirects are not followed: they would carry the forwarded
            # credentials to wherever the Location points.
            async with self._session.post(
                self._url, json=document, timeout=self._timeout, allow_redirects=False
            ) as response:
                status = response.status
                body = await _read_bounded(response)
        except aiohttp.ConnectionTimeoutError:
            reason = f"no connection within {self._config.connect_timeout:g}s"
            raise self._unavailable(request, reason) from None
        except TimeoutError:
            reason = f"no answer within {self._config.timeout:g}s"
            raise self._unavailable(request, reason) from None
        except aiohttp.ClientError as exc:
            raise self._unavailable(request, f"{type(exc).__name__}: {exc}") from None

        if 200 <= status < 300:
            try:
                if len(body) > _MAX_ANSWER_BYTES:
                    raise ValueError(f"answer larger than {_MAX_ANSWER_BYTES} bytes")
                return _parse_grant(body)
            except ValueError as exc:
                logger.warning(
                    "auth webhook %s answered garbage to %s %r: %s",
                    self._log_url, request.action, request.name, exc,
                )
                raise AuthUnavailable("the auth webhook answered garbage") from None
        if 400 <= status < 500:
            message = _refusal_message(body)
            logger.info(
                "auth webhook refused %s %r with %d", request.action, request.name, status
            )
            if status == 401:
                raise Unauthorized(message or "the credentials were not accepted")
            if status == 403:
                raise Forbidden(message or "this request is not allowed")
            raise AuthRefused(status, message or f"refused by the auth webhook ({status})")
        raise self._unavailable(request, f"HTTP {status}")

    def _unavailable(self, request: AuthRequest, reason: str) -> AuthUnavailable:
        logger.warning(
            "auth webhook %s unavailable for %s %r: %s",
            self._log_url, request.action, request.name, reason,
        )
        return AuthUnavailable("the auth service is unavailable; retry later")

    def _cache_key(self, request: AuthRequest, forwarded: dict[str, str]) -> str:
        # The action is part of the key because the webhook may allow "status"
        # and refuse "create" for the same credentials. Absent headers are part
        # of it too (None), so an anonymous grant never serves a credentialed
        # request or the other way round. Hashed so raw tokens are not kept as keys.
        credentials = [forwarded.get(h) for h in self._config.forward_headers]
        material = json.dumps(
            [request.action, request.dialect, request.name, dict(request.extra), credentials]
        )
        return hashlib.sha256(material.encode()).hexdigest()

    def _cached(self, key: str) -> Grant | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires_at, grant = entry
        if self._clock() >= expires_at:
            del self._cache[key]
            return None
        # A copy, so a caller that adds to the metadata cannot change later grants.
        return dataclasses.replace(grant, metadata=dict(grant.metadata))

    def _remember(self, key: str, grant: Grant) -> None:
        # Every entry lives equally long, so insertion order is also expiry
        # order: evicting the oldest drops the one closest to expiring.
        self._cache.pop(key, None)
        kept = dataclasses.replace(grant, metadata=dict(grant.metadata))
        self._cache[key] = (self._clock() + self._config.cache_ttl, kept)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def make_authorizer(config: AuthConfig, session: aiohttp.ClientSession) -> Authorizer:
    """The webhook authorizer, or ``AllowAll`` (loudly) when no webhook is configured."""
    if not config.webhook_url:
        logger.warning(
            "auth.webhook_url is unset: every request is allowed without authentication "
            "(set APP__AUTH__WEBHOOK_URL for anything but development)"
        )
        return AllowAll()
    return WebhookAuthorizer(config, session)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The answer body, cut just past the limit (a longer one is never a grant,
    and a refusal's message is then simply not passed on)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > _MAX_ANSWER_BYTES:
            break
    return bytes(body)


def _forwarded_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The configured headers the client sent, under their configured spelling.

    Matching is case-insensitive even for a plain dict; a header sent several
    times is joined the way HTTP allows (``; `` for Cookie, ``, `` otherwise).
    """
    wanted = {name.lower(): name for name in names}
    values: dict[str, list[str]] = {}
    for header, value in headers.items():
        name = wanted.get(header.lower())
        if name is not None:
            values.setdefault(name, []).append(value)
    return {
        name: ("; " if name.lower() == "cookie" else ", ").join(parts)
        for name, parts in values.items()
    }


def _parse_grant(body: bytes) -> Grant:
    """Validate a 2xx answer; ``ValueError`` says what is wrong with it."""
    if not body.strip():
        return Grant()
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {type(document).__name__}")

    metadata: Any = document.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("metadata must be an object of string values")

    max_size: Any = document.get("max_size")
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
    ):
        raise ValueError("max_size must be a non-negative integer")

    owner: Any = document.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise ValueError("owner must be a string")

    name: Any = document.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("name must be a string")

    allow_replace: Any = document.get("allow_replace", False)
    if not isinstance(allow_replace, bool):
        raise ValueError("allow_replace must be true or false")

    return Grant(metadata=metadata, max_size=max_size, owner=owner, name=name,
                 allow_replace=allow_replace)


def _refusal_message(body: bytes) -> str | None:
    """The webhook's own ``message`` for the client, if it gave a usable one."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    message = document.get("message") if isinstance(document, dict) else None
    if not isinstance(message, str) or not message.strip():
        return None
    return message.strip()[:_MAX_MESSAGE_CHARS]
