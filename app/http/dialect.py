"""The dialect seam: how a wire protocol plugs into the shared HTTP edge.

A dialect is one module under ``app/http/dialects/`` that maps its requests
to engine calls and the outcomes (and errors) back to its own responses. The
edge (``app/http/edge.py``, ``body.py``, ``middleware.py``) does what every
dialect shares: request ids, logs, metrics, the auth webhook, reading bodies
with lazy ``100 Continue``. Adding a dialect is a new module plus its entry in
``app/http/app.py``; nothing else changes.

Several dialects may share one path (tus and the IETF draft both live under
``tus.path``): each ``Route`` then says which requests are its own with
``accepts``, and the first route that accepts a request gets it; a route
without ``accepts`` takes whatever the others left.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from app.errors import UploadError
from app.http.body import expect_continue

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dialect(Protocol):
    #: Label in logs, metrics and the auth webhook's ``dialect`` field.
    name: str

    def routes(self) -> Sequence[Route]: ...

    def render_error(self, error: UploadError) -> web.StreamResponse:
        """The dialect's own shape for one of the service's errors."""
        ...


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    accepts: Callable[[web.Request], bool] | None = None


_VARIABLE = re.compile(r"\{[^}]*\}")

#: The dialect that took the request, so errors are rendered in its shape.
DIALECT = web.RequestKey("dialect", Dialect)


def mount(app: web.Application, dialects: Sequence[Dialect]) -> None:
    """Register every dialect's routes, one aiohttp route per method and path."""
    shared: dict[tuple[str, str], list[tuple[Dialect, Route]]] = {}
    shapes: dict[tuple[str, str], str] = {}
    for dialect in dialects:
        for route in dialect.routes():
            # "/files/{id}" and "/files/{upload_id}" match the same requests, but
            # aiohttp would send them all to whichever came first: refuse at start-up.
            shape = (route.method, _VARIABLE.sub("{}", route.path))
            if shapes.setdefault(shape, route.path) != route.path:
                raise ValueError(
                    f"{route.method} {route.path} ({dialect.name}) shadows "
                    f"{shapes[shape]}: dialects sharing a path must spell it the same"
                )
            shared.setdefault((route.method, route.path), []).append((dialect, route))
    for (method, path), candidates in shared.items():
        app.router.add_route(method, path, _dispatcher(candidates), expect_handler=expect_continue)


def _dispatcher(candidates: list[tuple[Dialect, Route]]) -> Handler:
    # Routes with a predicate first, in registration order; the catch-all last.
    ordered = [c for c in candidates if c[1].accepts is not None] + [
        c for c in candidates if c[1].accepts is None
    ]

    async def dispatch(request: web.Request) -> web.StreamResponse:
        for dialect, route in ordered:
            if route.accepts is None or route.accepts(request):
                request[DIALECT] = dialect
                return await route.handler(request)
        # Every dialect on this path declined: the first one explains why.
        request[DIALECT] = ordered[0][0]
        raise web.HTTPBadRequest(text="this request matches no protocol served here")

    return dispatch
