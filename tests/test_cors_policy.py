"""The CORS policy, table-tested: origins, patterns, credentials, cross-site writes."""

from __future__ import annotations

import pytest

from app.http.cors import ALLOW_HEADERS, EXPOSE_HEADERS, CorsPolicy, is_preflight, normalize_origin


@pytest.mark.parametrize(("given", "normal"), [
    ("https://app.example.com", "https://app.example.com"),
    ("HTTPS://App.Example.COM", "https://app.example.com"),
    ("https://app.example.com:443", "https://app.example.com"),
    ("http://localhost:80", "http://localhost"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("https://app.example.com/", "https://app.example.com"),
    ("null", None),
    ("file://", None),
    ("ftp://example.com", None),
    ("https://example.com/path", None),
    ("https://user@example.com", None),
    ("https://example.com:99999", None),
    ("", None),
])
def test_normalize_origin(given: str, normal: str | None) -> None:
    assert normalize_origin(given) == normal


ALLOWED = ("https://app.example.com", "https://*.example.org", "http://localhost:3000")


@pytest.mark.parametrize(("origin", "allowed"), [
    ("https://app.example.com", True),
    ("https://APP.example.com:443", True),
    ("http://app.example.com", False),          # another scheme is another origin
    ("https://app.example.com:8443", False),    # another port too
    ("https://evil.app.example.com", False),    # exact entries match exactly
    ("https://app.example.com.evil.net", False),
    ("https://a.example.org", True),
    ("https://a.b.example.org", True),          # '*' spans one or more labels
    ("https://example.org", False),             # but never the bare domain
    ("https://evilexample.org", False),
    ("https://a.example.org.evil.net", False),
    ("http://a.example.org", False),
    ("http://localhost:3000", True),
    ("http://localhost:3001", False),
    ("null", False),
    (None, False),
])
def test_allowed_origins_and_patterns(origin: str | None, allowed: bool) -> None:
    assert CorsPolicy.build(ALLOWED).allows(origin) is allowed


def test_nothing_is_allowed_by_default() -> None:
    policy = CorsPolicy.build(())
    assert not policy.allows("https://app.example.com")
    assert policy.preflight("https://app.example.com", "PUT") is None
    assert policy.actual("https://app.example.com") == {}


def test_any_origin_is_echoed_and_never_with_credentials() -> None:
    policy = CorsPolicy.build(["*"])
    assert policy.actual("https://anyone.test")["Access-Control-Allow-Origin"] == (
        "https://anyone.test")
    assert "Access-Control-Allow-Credentials" not in policy.actual("https://anyone.test")
    assert not policy.allows("null")
    with pytest.raises(ValueError, match="credentials"):
        CorsPolicy.build(["*"], allow_credentials=True)


@pytest.mark.parametrize("credentials", [False, True])
def test_credentials_header_only_when_configured(credentials: bool) -> None:
    policy = CorsPolicy.build(ALLOWED, allow_credentials=credentials)
    for headers in (policy.actual("https://app.example.com"),
                    policy.preflight("https://app.example.com", "PUT") or {}):
        assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert ("Access-Control-Allow-Credentials" in headers) is credentials
        if credentials:
            assert headers["Access-Control-Allow-Credentials"] == "true"


def test_preflight_answer() -> None:
    policy = CorsPolicy.build(ALLOWED, max_age=600)
    headers = policy.preflight("https://a.example.org", "PATCH")
    assert headers is not None
    methods = {m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")}
    assert {"PUT", "POST", "PATCH", "DELETE", "HEAD"} <= methods
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    for needed in ("content-range", "x-upload-content-length", "x-goog-hash",
                   "x-guploader-no-308", "tus-resumable", "upload-offset", "upload-metadata",
                   "upload-complete", "upload-draft-interop-version", "content-digest",
                   "x-http-method-override", "authorization"):
        assert needed in allowed
    assert headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Expose-Headers" not in headers
    assert policy.preflight("https://a.example.org", "CONNECT") is None
    assert policy.preflight("https://evil.test", "PUT") is None


def test_expose_headers_name_no_wildcards() -> None:
    # Browsers take "*" alone (and never with credentials), no prefix wildcards.
    assert all("*" not in h for h in EXPOSE_HEADERS + ALLOW_HEADERS)
    lowered = {h.lower() for h in EXPOSE_HEADERS}
    assert {"range", "location", "upload-offset", "tus-resumable",
            "x-http-status-code-override", "retry-after"} <= lowered


OWN = "http://127.0.0.1:8080"


@pytest.mark.parametrize(("method", "headers", "allowed"), [
    ("PUT", {}, True),                                          # curl, SDKs
    ("POST", {"Origin": "https://evil.test"}, False),
    ("post", {"Origin": "https://evil.test"}, False),
    ("DELETE", {"Origin": "https://evil.test"}, False),
    ("PATCH", {"Origin": "null"}, False),                       # sandboxed frames
    ("POST", {"Origin": "https://app.example.com"}, True),
    ("POST", {"Origin": "https://x.example.org"}, True),
    ("PUT", {"Origin": "http://127.0.0.1:8080"}, True),         # the service's own pages
    ("PUT", {"Origin": "http://127.0.0.1:8081"}, False),
    ("POST", {"Sec-Fetch-Site": "cross-site"}, False),
    ("POST", {"Sec-Fetch-Site": "same-origin"}, True),
    ("POST", {"Sec-Fetch-Site": "none"}, True),
    ("GET", {"Origin": "https://evil.test"}, True),
    ("HEAD", {"Origin": "https://evil.test", "Sec-Fetch-Site": "cross-site"}, True),
    ("OPTIONS", {"Origin": "https://evil.test"}, True),
])
def test_cross_site_writes(method: str, headers: dict[str, str], allowed: bool) -> None:
    assert CorsPolicy.build(ALLOWED).write_allowed(method, headers, OWN) is allowed


@pytest.mark.parametrize(("method", "headers", "preflight"), [
    ("OPTIONS", {"Origin": "https://a.test", "Access-Control-Request-Method": "PUT"}, True),
    ("options", {"Origin": "https://a.test", "Access-Control-Request-Method": "PUT"}, True),
    ("OPTIONS", {"Origin": "https://a.test"}, False),    # a tus capability query from a page
    ("OPTIONS", {"Tus-Resumable": "1.0.0"}, False),
    ("PUT", {"Origin": "https://a.test", "Access-Control-Request-Method": "PUT"}, False),
])
def test_preflight_detection(method: str, headers: dict[str, str], preflight: bool) -> None:
    assert is_preflight(method, headers) is preflight
