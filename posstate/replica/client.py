"""The one interface every replica backend implements.

Network (or mounted-disk) calls to a replica go through :class:`ReplicaClient` only, so tests can fail any
of them (``posstate/replica/clients.py`` picks the implementation for a URL). Keys are relative to the URL's
prefix. Every failure to reach or use the replica is a :class:`~posstate.ReplicaError`; a missing object is
:class:`ObjectMissing`; a conditional write whose condition does not hold is :class:`PreconditionFailed`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from posstate.core.errors import ReplicaError

#: The largest object a client downloads (an attacker's huge object must not exhaust memory): posstate's
#: own objects are state files and journal ranges, far smaller.
MAX_OBJECT_BYTES = 1024**3
#: The most objects a listing returns (a bucket flooded with names must not exhaust memory); prune keeps a
#: replica far below it.
MAX_LISTED = 1_000_000

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s\"']*@")


def scrub(text: str) -> str:
    """*text* with the user:password of any URL in it masked (an endpoint URL given with credentials, or one
    boto3 read from AWS_ENDPOINT_URL, must not reach an error, a log line or an event)."""
    return _USERINFO.sub(r"\1***@", text)


def has_userinfo(url: str) -> bool:
    return scrub(url) != url


class ObjectMissing(ReplicaError):
    """The object asked for is not in the replica."""


class PreconditionFailed(ReplicaError):
    """A conditional write (If-None-Match / If-Match) was refused: someone else wrote the object."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing shows it (nothing read)."""

    key: str
    size: int
    modified: datetime | None = None


class ReplicaClient(Protocol):
    """What posstate needs of a replica: atomic verified puts, gets, listings, deletes, conditional writes."""

    @property
    def url(self) -> str:
        """The replica's URL as configured (never holds credentials)."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store *data* at *key* atomically (never listed half-written) and check it arrived intact."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; ReplicaError for one over :data:`MAX_OBJECT_BYTES` (nothing more is read)."""
        ...

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every complete object under *prefix*, sorted by key; ReplicaError past :data:`MAX_LISTED` of them."""
        ...

    def delete(self, keys: Sequence[str]) -> None: ...

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its version tag (the ETag), or None when absent."""
        ...

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> str:
        """Write only if the object is still at *etag* (None: only if absent); the new tag, or PreconditionFailed."""
        ...


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()
