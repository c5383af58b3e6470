"""Reading and writing one state container file: bytes on disk <-> validated :class:`StateData`.

This is the one place that joins the codec (bytes), the document (JSON) and the file operations, for the
main file, ``positions.json.bak``, timestamped backups and exports alike. It holds no state of its own.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posstate.core.errors import CorruptStateError, PersistenceError, SchemaValidationError, StateNotFoundError, WrongKeyError
from posstate.core.version import __version__
from posstate.model import document as _document
from posstate.model.document import StateData
from posstate.storage import codec as _codec
from posstate.storage import fileops as fs
from posstate.storage.container import Header
from posstate.storage.crypto import Keyring

log = logging.getLogger("posstate")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A file that was read and fully validated."""

    path: Path
    header: Header
    state: StateData
    checksum: str
    size: int


@dataclass(frozen=True, slots=True)
class ReadOptions:
    keyring: Keyring | None
    max_document_bytes: int = _codec.DEFAULT_MAX_DOCUMENT_BYTES
    clock_skew: float = _document.DEFAULT_CLOCK_SKEW
    #: Refuse files that are not encrypted (a manager with encryption on: no downgrade to plaintext).
    require_encryption: bool = False

    @property
    def max_file_bytes(self) -> int:
        """The largest file read under these options (see :func:`posstate.storage.codec.max_file_bytes`)."""
        return _codec.max_file_bytes(self.max_document_bytes)


def read_bytes(path: Path, *, what: str = "state file", max_size: int | None = None) -> bytes:
    """The bytes of a regular file of at most *max_size* bytes (default: the container cap of the default
    ``max_document_bytes``). A directory, FIFO, socket or device is CorruptStateError(kind="not-a-regular-file")
    and a larger file CorruptStateError(kind="too-large"), both before a byte is read."""
    cap = _codec.max_file_bytes(_codec.DEFAULT_MAX_DOCUMENT_BYTES) if max_size is None else max_size
    try:
        return fs.read_file(path, max_size=cap)
    except FileNotFoundError:
        raise StateNotFoundError(path, what=what) from None
    except fs.NotRegularFileError as exc:
        step = "give the path of a positions file" if what == "state file" else f"give the path of a regular {what}"
        raise CorruptStateError(
            path,
            f"is {exc.kind}, not a {what}",
            next_step=f"{step} (posstate reads regular files only)",
            kind="not-a-regular-file",
        ) from None
    except fs.FileTooLargeError as exc:
        raise CorruptStateError(
            path,
            f"{exc.strerror} for a {what} (max_document_bytes); refused before reading",
            next_step="if the file is yours, raise max_document_bytes; else restore a backup (`posstate backups restore latest`)",
            kind="too-large",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            step = "it is a symlink, which posstate never follows; put the real file there"
        else:
            step = "check permissions and the disk (`posstate doctor` checks the directory)"
        raise PersistenceError(path, operation="read", cause=exc, outcome="nothing was changed", next_step=step) from exc


def parse(data: bytes, *, path: Path, options: ReadOptions, now: float | None = None) -> Loaded:
    """Decode and validate the bytes of a container file."""
    header, payload = _codec.decode(data, keyring=options.keyring, path=path, max_document_bytes=options.max_document_bytes)
    if options.require_encryption and not header.encrypted:
        raise WrongKeyError(path, file_key_id=header.key_id, our_key_id=None, downgrade=True)
    with _document.pause_gc():
        doc = _document.loads(payload, path=path, strict=not header.encrypted)
        # A file AES-GCM authenticated was written by a holder of the key: a written_at in the future means
        # this host's clock moved back, not that the file is bad, so it is a warning there, not invalidity
        # (refusing it would make recovery roll an authentic state back to an older copy).
        skew = math.inf if header.encrypted else options.clock_skew
        state = _document.decode_document(doc, path=path, now=now, skew=skew)
        # Free the parsed document while the collector is still paused: what the state did not take from it
        # (every position's dicts) is then gone before the collector's first pass, which otherwise walks
        # it all once more only to find it garbage (issue 14.5).
        del doc
        if header.encrypted and header.written_at_ms > ((time.time() if now is None else now) + options.clock_skew) * 1000:
            log.warning("%s: written at %s, in the future by this host's clock (clock moved back?)", path, state.written_at)
    _check_header_matches(header, state, path)
    if options.keyring is not None and header.passphrase:
        options.keyring.use_salt(header.salt)
    checksum = _codec_checksum(data)
    return Loaded(path=path, header=header, state=state, checksum=checksum, size=len(data))


def read(path: Path, *, options: ReadOptions, what: str = "state file") -> Loaded:
    return parse(read_bytes(path, what=what, max_size=options.max_file_bytes), path=path, options=options)


def read_document(path: Path, *, options: ReadOptions) -> tuple[Header, Any]:
    """The decrypted JSON document of a file, parsed but not validated (for export, show, diff)."""
    data = read_bytes(path, max_size=options.max_file_bytes)
    header, payload = _codec.decode(data, keyring=options.keyring, path=path, max_document_bytes=options.max_document_bytes)
    return header, _document.loads(payload, path=path, strict=not header.encrypted)


def _codec_checksum(data: bytes) -> str:
    from posstate.storage.container import checksum_of

    found = checksum_of(data)
    assert found is not None  # decode() verified it
    return found


def _check_header_matches(header: Header, state: StateData, path: Path) -> None:
    if header.generation != state.generation:
        raise SchemaValidationError(
            path,
            "$.generation",
            "header-matches-document",
            f"header says generation {header.generation}, document says {state.generation}",
        )
    if header.position_count != len(state.positions):
        raise SchemaValidationError(
            path,
            "$.positions",
            "header-matches-document",
            f"header says {header.position_count} positions, document has {len(state.positions)}",
        )


def encode(
    state: StateData,
    *,
    keyring: Keyring | None,
    compression_level: int | None,
    entries: dict[Any, Any] | None = None,
    now_ms: int | None = None,
    pause: Callable[[], None] | None = None,
    on_document: Callable[[dict[str, Any]], None] | None = None,
    writer: dict[str, Any] | None = None,
) -> tuple[StateData, _codec.Encoded]:
    """Stamp *state* (written_at, writer) and encode it; returns the stamped state and the file bytes.
    *pause*: serialize a slice of positions at a time and call it between slices (the same bytes; issue 14.3).
    *on_document* (not with *pause*): called with the document dict before it is serialized (issue 15.4: a
    save's fold record digests it). *writer*: the writer to stamp instead of this process (a compaction worker
    writes for the manager's process)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    state.written_at = _document.utc_text(now_ms)
    import socket  # loaded on the first save, not when posstate is imported

    if writer is not None:
        state.writer = dict(writer)
    else:
        state.writer = {"host": socket.gethostname()[:255], "pid": os.getpid(), "version": __version__}
    if pause is not None:  # a background compaction: each slice is freed before the next is built
        text = _document.dumps_in_slices(state, entries, pause=pause)
    else:
        # Every position's entry is built here (issue 14.4: none is kept between saves); the collector is paused
        # meanwhile, as for a load: these objects hold no cycle and are freed by reference counting, but a
        # collection triggered while they are made would walk the whole state in memory for nothing.
        with _document.pause_gc():
            doc = _document.build_document(state, entries)
            if on_document is not None:
                on_document(doc)
            text = _document.dumps(doc)
    encoded = _codec.encode(
        text,
        generation=state.generation,
        written_at_ms=now_ms,
        position_count=len(state.positions),
        compression_level=compression_level,
        keyring=keyring,
        schema_version=state.schema_version,
    )
    return state, encoded
