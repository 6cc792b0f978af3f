"""CORS on the wire: preflights answered, cross-site writes refused, and the
CORS headers on every answer, for every dialect alike.

The decisions are ``app/http/cors.py``'s; this module only applies them.
Preflights are answered here, before routing reaches a dialect, so they never
ask the auth webhook; a plain ``OPTIONS`` (tus's capability query) is not a
preflight and goes on to its route.
"""

from __future__ import annotations

from aiohttp import web

from app.config import CorsConfig
from app.errors import Forbidden
from app.http import edge
from app.http.cors import CorsPolicy, is_preflight
from app.http.dialect import Handler

CORS_POLICY = web.AppKey("cors_policy", CorsPolicy)


class CrossSiteRequest(Forbidden):
    code = "cross_site_request"


def policy_for(config: CorsConfig) -> CorsPolicy:
    return CorsPolicy.build(config.allowed_origins, allow_credentials=config.allow_credentials,
                            max_age=config.max_age)


@web.middleware
async def cors_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    policy = request.app[CORS_POLICY]
    if is_preflight(request.method, request.headers):
        headers = policy.preflight(request.headers["Origin"],
                                   request.headers["Access-Control-Request-Method"])
        if headers is None:
            raise CrossSiteRequest(
                "this origin may not call the service from a browser (cors.allowed_origins)")
        return web.Response(status=204, headers=headers)
    # Before the handler, so before the auth webhook and before any body byte:
    # a simple cross-site POST needs no preflight and would otherwise reach
    # both with the user's cookies.
    if not policy.write_allowed(request.method, request.headers, edge.public_base(request)):
        raise CrossSiteRequest(
            "cross-site requests that change uploads are refused from this origin "
            "(cors.allowed_origins)")
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer, errors and static files included."""
    if "Access-Control-Allow-Methods" not in response.headers:
        response.headers.update(request.app[CORS_POLICY].actual(request.headers.get("Origin")))
    # Answers differ by Origin, so shared caches must key on it, for every
    # origin (a cached answer without CORS headers must not serve an allowed one).
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in {v.strip().lower() for v in vary.split(",")}:
        response.headers["Vary"] = f"{vary}, Origin"
