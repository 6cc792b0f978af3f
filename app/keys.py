"""Typed keys for the resources the app owns and for per-request log fields."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from app.auth import Authorizer
from app.callbacks import CompletionNotifier
from app.config import Config
from app.locking import WriterRegistry
from app.stores.base import Store
from app.uploads import UploadEngine

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
ENGINE = web.AppKey("engine", UploadEngine)
AUTHORIZER = web.AppKey("authorizer", Authorizer)
NOTIFIER = web.AppKey("notifier", CompletionNotifier)
WRITERS = web.AppKey("writers", WriterRegistry)
HTTP_CLIENT = web.AppKey("http_client", aiohttp.ClientSession)

# Filled in by handlers for the access log.
REQUEST_ACTION = "upload_action"
REQUEST_OFFSET = "upload_offset"
REQUEST_STORED = "upload_stored"
