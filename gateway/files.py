"""Files in the data dir that must never be seen half written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` all at once: write a temporary file, fsync it, rename it over.
    A crash leaves the old file or the new one, never a mix. Readable by the owner only: these
    files hold password hashes and session payloads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class WatchedJson:
    """A JSON file that other processes may rewrite (the CLI beside a running gateway): read it
    again only when it changed on disk (its modification time or size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None  # of the document last accepted
        self._fresh = False  # False: read it at the next look whatever the stamp
        self._pending: tuple[int, int] | None = None

    def changed(self) -> tuple[bool, Any]:
        """(True, the document, or None when there is no file) if it changed since the last
        `accept()`, else (False, None). Raises OSError or ValueError for an unreadable file."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._fresh and stamp == self._stamp:
            return False, None
        self._pending = stamp
        return True, None if stamp is None else json.loads(self.path.read_text())

    def accept(self) -> None:
        """The document `changed()` returned was taken: do not read it again until it changes."""
        self._stamp, self._fresh = self._pending, True

    def write(self, doc: Any) -> None:
        """Replace the file atomically; the next look reads it back."""
        write_atomically(self.path, json.dumps(doc, indent=1).encode())
        self._fresh = False
