"""The composition root: the HTTP app wired to the configured store.

This is the one module that knows both the HTTP layer and the concrete
stores; everything below it sees only the ``Store`` contract.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from app.auth.webhook import Authorizer
from app.config import Config
from app.core.budget import MemoryBudget
from app.http.app import build_app
from app.stores.base import Store
from app.stores.registry import open_store


def create_app(
    config: Config,
    *,
    store: Store | None = None,
    authorizer: Authorizer | None = None,
    readiness_ttl: float | None = None,
    clock: Callable[[], float] = time.time,
    budget: MemoryBudget | None = None,
) -> web.Application:
    """The service for ``config``; see ``app.http.app.build_app`` for the options."""
    return build_app(
        config, open_store=open_store, store=store, authorizer=authorizer,
        readiness_ttl=readiness_ttl, clock=clock, budget=budget,
    )
