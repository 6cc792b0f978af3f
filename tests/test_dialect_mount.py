"""The dialect seam refuses routes that would silently shadow each other."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aiohttp import web

from app.errors import UploadError
from app.http.dialect import Route, mount


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.Response()


class _Dialect:
    def __init__(self, name: str, paths: Sequence[str]) -> None:
        self.name = name
        self._paths = paths

    def routes(self) -> Sequence[Route]:
        return [Route("HEAD", path, _ok, accepts=lambda r: True) for path in self._paths]

    def render_error(self, error: UploadError) -> web.StreamResponse:
        return web.Response(status=error.status)


def test_same_path_is_shared() -> None:
    app = web.Application()
    mount(app, [_Dialect("a", ["/files/{upload_id}"]), _Dialect("b", ["/files/{upload_id}"])])
    assert len([r for r in app.router.routes() if r.method == "HEAD"]) == 1


def test_same_shape_spelled_differently_is_refused() -> None:
    with pytest.raises(ValueError, match="shadows"):
        mount(web.Application(), [_Dialect("a", ["/files/{upload_id}"]),
                                  _Dialect("b", ["/files/{id}"])])
