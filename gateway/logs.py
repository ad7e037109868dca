"""Logging setup of a gateway process: one stderr handler on the root logger, text or JSON
(`--log-format`). Everything logs through it: the gateway's `iotgw.*` loggers, uvicorn (its
own setup is off, gateway/http/server.py) and the REST access log."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from gateway.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(config: Config, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        # One object per line; fields given with `extra=` (the access log's method, path,
        # status, duration_ms, peer) become keys of their own.
        static = {} if worker is None else {"worker": worker}
        handler.setFormatter(JsonFormatter(
            ["asctime", "levelname", "name", "message", "process"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                           "process": "pid"},
            static_fields=static,
        ))
    else:
        prefix = "" if worker is None else f"[w{worker}] "
        handler.setFormatter(logging.Formatter(prefix + TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
