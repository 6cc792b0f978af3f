"""Which browser origins may call the service, and what they are told (pure).

No I/O and nothing of aiohttp: given an origin, a method and a few request
headers, decide. ``app/http/cors_middleware.py`` applies the decisions.

Two separate questions:

* **CORS** (may a page *read* our answers, may it send non-simple requests):
  answered with ``Access-Control-*`` headers for allowed origins only.
* **Cross-site writes**: CORS never stops a *simple* request (a text/plain
  ``POST`` from a form or ``fetch(..., {mode: "no-cors"})``) from reaching the
  server with the user's cookies. Such a request from an origin that is not
  allowed must never change state, so it is refused before auth or body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Methods any dialect uses: ours (PUT/POST/DELETE), Google's JSON API
#: (POST/PUT), tus (POST/HEAD/PATCH/DELETE), the IETF draft (POST/PUT/PATCH/HEAD/DELETE).
ALLOW_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

#: Request headers a page may send, the union over every dialect.
ALLOW_HEADERS: tuple[str, ...] = (
    # ours and Google's
    "Authorization", "Content-Type", "Content-Range", "Content-Disposition",
    "X-Upload-Content-Type", "X-Upload-Content-Length", "x-goog-hash",
    "x-goog-api-client", "X-GUploader-No-308", "X-HTTP-Method-Override", "X-Request-Id",
    # tus 1.0
    "Tus-Resumable", "Upload-Offset", "Upload-Length", "Upload-Metadata",
    "Upload-Checksum", "Upload-Concat", "Upload-Defer-Length", "X-Requested-With",
    # IETF resumable-upload draft (Upload-Incomplete: its early versions)
    "Upload-Complete", "Upload-Incomplete", "Upload-Draft-Interop-Version",
    "Content-Digest", "Repr-Digest", "Want-Content-Digest", "Want-Repr-Digest",
)

#: Response headers a page must be able to read to resume. ``Tus-*`` is spelt
#: out: Access-Control-Expose-Headers takes no prefix wildcards.
EXPOSE_HEADERS: tuple[str, ...] = (
    "Range", "Location", "X-Request-Id", "Retry-After", "ETag",
    "X-Http-Status-Code-Override", "X-GUploader-UploadID", "x-goog-hash",
    "Upload-Offset", "Upload-Length", "Upload-Complete", "Upload-Expires",
    "Upload-Metadata", "Upload-Defer-Length", "Upload-Concat", "Upload-Limit",
    "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size",
    "Tus-Checksum-Algorithm", "Content-Digest", "Repr-Digest",
)

#: Methods that never change state: a browser may send them from anywhere.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case with the default port dropped,
    or None for anything that is not a tuple origin (``null``, paths, junk)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"


def _pattern(allowed: str) -> re.Pattern[str]:
    # "https://*.example.com": the "*" stands for one or more subdomain labels,
    # never for example.com itself, and never for another scheme or port.
    scheme, _, rest = allowed.lower().partition("://")
    host, _, port = rest.partition(":")
    labels = [rf"{_LABEL}(?:\.{_LABEL})*" if label == "*" else re.escape(label)
              for label in host.split(".")]
    host_re = r"\.".join(labels)
    if port and int(port) != _DEFAULT_PORTS.get(scheme):
        host_re += re.escape(f":{int(port)}")
    return re.compile(re.escape(scheme) + "://" + host_re)


@dataclass(frozen=True)
class CorsPolicy:
    exact: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]
    any_origin: bool
    allow_credentials: bool
    max_age: int

    @classmethod
    def build(cls, allowed_origins: Iterable[str], *, allow_credentials: bool = False,
              max_age: float = 600) -> CorsPolicy:
        exact: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        any_origin = False
        for allowed in allowed_origins:
            if allowed == "*":
                any_origin = True
            elif "*" in allowed:
                patterns.append(_pattern(allowed))
            else:
                normal = normalize_origin(allowed)
                if normal is not None:
                    exact.add(normal)
        if any_origin and allow_credentials:
            raise ValueError("'*' cannot be allowed together with credentials")
        return cls(frozenset(exact), tuple(patterns), any_origin, allow_credentials,
                   int(max_age))

    def allows(self, origin: str | None) -> bool:
        """Whether pages from ``origin`` may call the service from a browser."""
        if origin is None:
            return False
        normal = normalize_origin(origin)
        if normal is None:
            return False
        if self.any_origin or normal in self.exact:
            return True
        return any(p.fullmatch(normal) for p in self.patterns)

    def preflight(self, origin: str, request_method: str) -> dict[str, str] | None:
        """Headers for a preflight from ``origin``, or None: not allowed, and the
        answer must then carry no CORS header at all."""
        if not self.allows(origin) or request_method.upper() not in ALLOW_METHODS:
            return None
        headers = self._common(origin)
        headers["Access-Control-Allow-Methods"] = ", ".join(ALLOW_METHODS)
        headers["Access-Control-Allow-Headers"] = ", ".join(ALLOW_HEADERS)
        headers["Access-Control-Max-Age"] = str(self.max_age)
        return headers

    def actual(self, origin: str | None) -> dict[str, str]:
        """CORS headers for the answer to a request (not a preflight) from ``origin``."""
        if not self.allows(origin):
            return {}
        assert origin is not None
        headers = self._common(origin)
        headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSE_HEADERS)
        return headers

    def _common(self, origin: str) -> dict[str, str]:
        # The origin is echoed (never "*") so one code path serves credentialed
        # and anonymous requests; caches then need Vary: Origin, added to every
        # answer by the middleware.
        headers = {"Access-Control-Allow-Origin": origin}
        if self.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def write_allowed(self, method: str, headers: Mapping[str, str], own_origin: str) -> bool:
        """Whether a request may change state, as far as browsers are concerned.

        Requests without ``Origin`` (curl, SDKs, native apps) pass; browsers
        send ``Origin`` on every non-GET/HEAD request, so one from a foreign
        origin that is not allowed is a cross-site write and is refused."""
        if method.upper() in SAFE_METHODS:
            return True
        origin = headers.get("Origin")
        if origin is None:
            return headers.get("Sec-Fetch-Site", "").lower() != "cross-site"
        own = normalize_origin(own_origin)
        return (own is not None and normalize_origin(origin) == own) or self.allows(origin)


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """A CORS preflight, as opposed to a plain OPTIONS (tus's capability query)."""
    return (
        method.upper() == "OPTIONS"
        and "Origin" in headers
        and "Access-Control-Request-Method" in headers
    )
