"""Typed keys for the resources the app owns and for per-request log fields."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from app.auth.webhook import Authorizer
from app.callbacks.notifier import CompletionNotifier
from app.config import Config
from app.engine.engine import UploadEngine
from app.engine.writers import WriterRegistry
from app.ops.metrics import Metrics
from app.stores.base import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
ENGINE = web.AppKey("engine", UploadEngine)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
NOTIFIER = web.AppKey("notifier", CompletionNotifier)
WRITERS = web.AppKey("writers", WriterRegistry)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", Metrics)

# Filled in by handlers for the access log and the metrics middleware.
#: The upload action ("create", "append", "status", "cancel") or ops endpoint.
REQUEST_ACTION = "upload_action"
#: Upload offset once the request is done with it.
REQUEST_OFFSET = "upload_offset"
#: Upload offset when this request started writing (None if it never got there).
REQUEST_OFFSET_BEFORE = "upload_offset_before"
#: Bytes of this request's body newly stored (overlap skipped).
REQUEST_STORED = "upload_stored"
#: Body bytes read from the client, overlap included.
REQUEST_RECEIVED = "upload_received"
#: True when this request created a new upload.
