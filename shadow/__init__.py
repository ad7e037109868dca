"""Device shadows: desired / reported / delta documents with CAS and version vectors.

``shadow.model`` holds the document rules (pure functions), ``shadow.store`` the
``ShadowStore`` contract, ``shadow.sqlite`` and ``shadow.redis`` the two stores. The Redis
store is imported from ``shadow.redis`` on demand so that the embedded default does not
need a Redis client.
"""

from shadow.model import (
    DEFAULT_LIMITS,
    ChangeLog,
    ChangeRecord,
    InvalidUpdate,
    KeyTooLong,
    Limits,
    Shadow,
    ShadowError,
    ShadowTooDeep,
    ShadowTooLarge,
    UpdateResult,
    VersionConflict,
)
from shadow.sqlite import SqliteShadowStore
from shadow.store import ShadowStore, StoreStats, UpdateRequest

__all__ = [
    "DEFAULT_LIMITS",
    "ChangeLog",
    "ChangeRecord",
    "InvalidUpdate",
    "KeyTooLong",
    "Limits",
    "Shadow",
    "ShadowError",
    "ShadowStore",
    "ShadowTooDeep",
    "ShadowTooLarge",
    "SqliteShadowStore",
    "StoreStats",
    "UpdateRequest",
    "UpdateResult",
    "VersionConflict",
]
