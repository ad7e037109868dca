"""Logging setup of a gateway process: one stderr handler, text or JSON (`--log-format`).
Everything logs through it: the gateway's `iotgw.*` loggers, uvicorn (its own setup is off,
gateway/http/server.py) and the REST access log.

The event loop only queues a record; a thread formats it and writes it, so a slow stderr (a
full pipe, a busy journald) never blocks the loop. The queue is bounded: what does not fit is
dropped, and the next record that fits is preceded by a warning saying how many."""

from __future__ import annotations

import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener

from pythonjsonlogger.json import JsonFormatter

from gateway.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUEUED_RECORDS = 4096  # about 2 MB of records
STOP_TIMEOUT = 2.0  # seconds
log = logging.getLogger("iotgw.logs")


class _BoundedQueueHandler(QueueHandler):
    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(self.prepare(log.makeRecord(
                    log.name, logging.WARNING, __file__, 0,
                    "%d log records dropped: stderr did not keep up", (self.dropped,), None,
                )))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(QueueListener):
    def stop(self) -> None:
        """Write what is queued, but give up after a few seconds: a stuck stderr must not hold
        the process at exit (the writer is a daemon thread)."""
        try:
            self.queue.put(self._sentinel, timeout=STOP_TIMEOUT)  # type: ignore[attr-defined]
        except queue.Full:
            return
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None


def setup_logging(config: Config, worker: int | None = None) -> QueueListener:
    """Returns the writer thread's listener: `.stop()` writes what is queued (at exit)."""
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
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUED_RECORDS)
    listener = _Listener(records, handler)
    listener.start()
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(_BoundedQueueHandler(records))
    root.setLevel(config.log_level.upper())
    return listener
