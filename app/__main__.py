"""``python -m app [--config PATH] [--host HOST] [--port PORT]`` runs the server;
``python -m app cleanup --older-than 24h [...]`` runs the cleanup job (``app.cleanup``);
``python -m app upload FILE|- URL [...]`` uploads with the client (``app.client.cli``)."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from app.client.cli import main as upload_main
from app.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, replace
from app.errors import UploadError
from app.ops.cleanup import main as cleanup_main
from app.ops.logs import setup_logging
from app.service import create_app


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cleanup"]:
        # A word rather than an argparse subcommand, so the server's own
        # command line stays exactly what Procfiles and scripts already run.
        return cleanup_main(argv[1:], prog="python -m app cleanup")
    if argv[:1] == ["upload"]:
        return upload_main(argv[1:], prog="python -m app upload")
    parser = argparse.ArgumentParser(prog="python -m app", description="Resumable upload proxy")
    parser.add_argument("--config", default=None,
                        help=f"YAML config file (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port and PORT)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            config = replace(config, server=overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging)
    logging.getLogger("app").info(
        "starting on %s:%d with the %s store", config.server.host, config.server.port,
        config.storage.backend,
    )
    try:
        web.run_app(
            create_app(config),
            host=config.server.host,
            port=config.server.port,
            shutdown_timeout=config.server.shutdown_timeout,
            access_log=None,
            print=None,
        )
    except UploadError as exc:
        # Storage that cannot be opened at start-up (bucket creation refused,
        # data root not writable): one line, not a traceback.
        print(f"start-up failed: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
