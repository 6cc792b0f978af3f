"""Typed keys for the resources the app owns and for per-request fields."""

from __future__ import annotations

from aiohttp import web

from app.auth.webhook import Authorizer
from app.callbacks.notifier import CompletionNotifier
from app.config import Config
from app.core.budget import MemoryBudget
from app.engine.engine import UploadEngine
from app.engine.writers import WriterRegistry
from app.ops.health import Readiness
from app.ops.metrics import Metrics
from app.stores.base import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
ENGINE = web.AppKey("engine", UploadEngine)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
NOTIFIER = web.AppKey("notifier", CompletionNotifier)
WRITERS = web.AppKey("writers", WriterRegistry)
METRICS = web.AppKey("metrics", Metrics)
READINESS = web.AppKey("readiness", Readiness)
BUDGET = web.AppKey("memory_budget", MemoryBudget)

# Filled in by the views for the access log and the metrics middleware.
#: The upload action ("create", "append", "status", "cancel") or ops endpoint.
REQUEST_ACTION = web.RequestKey("upload_action", str)
#: The wire dialect that handled the request ("upload", "gcs", "tus", ...).
REQUEST_DIALECT = web.RequestKey("upload_dialect", str)
#: The upload name, once the dialect knows it.
REQUEST_NAME = web.RequestKey("upload_name", str)
#: Upload offset once the request is done with it.
REQUEST_OFFSET = web.RequestKey("upload_offset", int)
#: Upload offset when this request started writing (absent if it never got there).
REQUEST_OFFSET_BEFORE = web.RequestKey("upload_offset_before", int)
#: Bytes of this request's body newly stored (overlap skipped).
REQUEST_STORED = web.RequestKey("upload_stored", int)
#: Body bytes read from the client, overlap included.
REQUEST_RECEIVED = web.RequestKey("upload_received", int)
#: Set once ``100 Continue`` went out, so it is sent at most once.
CONTINUE_SENT = web.RequestKey("continue_sent", bool)
