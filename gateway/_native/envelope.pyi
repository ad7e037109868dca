"""Type stub of the native envelope packer (gateway/_native/envelope.pyx)."""

from collections.abc import Callable
from typing import Any

def envelope(record: Any, fallback: Callable[[Any], bytes]) -> bytes: ...
def frame_records(records: list[Any], fallback: Callable[[Any], bytes]) -> bytes: ...
