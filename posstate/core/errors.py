"""The one exception hierarchy of posstate.

Every error the library raises on purpose is a :class:`PosStateError`. Each subclass also inherits the
builtin exception it means, so callers that only know the builtins (``except OSError``) keep working.
Attributes are read-only and the message is built from them: what happened, to which file, what to do next.
Nothing secret (key bytes, passphrases) is ever passed in, so nothing secret can appear in ``str(exc)``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from pathlib import Path


def _show(path: str | Path | None) -> str:
    return str(path) if path is not None else "<memory>"


class PosStateError(Exception):
    """Base class of every error posstate raises on purpose."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self._path = Path(path) if path is not None else None

    @property
    def path(self) -> Path | None:
        """The file the error is about, when there is one."""
        return self._path

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by state, not by constructor (the constructors take keyword arguments): an error raised in a
        worker process (multiprocessing, concurrent.futures) reaches the parent whole, type and attributes."""
        state = dict(self.__dict__)
        os_fields = (self.errno, self.strerror, self.filename, self.filename2) if isinstance(self, OSError) else None
        return (_rebuild, (type(self), self.args, state, os_fields))


def _rebuild(
    cls: type[PosStateError], args: tuple[object, ...], state: dict[str, object], os_fields: tuple[object, ...] | None
) -> PosStateError:
    """The unpickling side of :meth:`PosStateError.__reduce__`."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    if os_fields is not None and isinstance(exc, OSError):
        # Only the fields that were set: OSError's str() shows a filename that is None as "None".
        for name, value in zip(("errno", "strerror", "filename", "filename2"), os_fields, strict=True):
            if value is not None:
                setattr(exc, name, value)
    return exc


class CorruptStateError(PosStateError, ValueError):
    """A state or backup file is damaged, truncated, or not a posstate file at all."""

    def __init__(
        self,
        path: str | Path | None,
        reason: str,
        *,
        next_step: str | None = None,
        kind: str = "damaged",
    ) -> None:
        self._reason = reason
        self._kind = kind
        if next_step is None:  # bytes in memory are the caller's: no file to repair
            next_step = (
                "recover with `posstate repair` or restore a backup with `posstate backups restore latest`"
                if path is not None
                else "the bytes given (in memory, no file) are not a valid state; check where they came from"
            )
        super().__init__(f"{_show(path)}: {reason}; {next_step}", path=path)

    @property
    def reason(self) -> str:
        """Why the file was judged damaged."""
        return self._reason

    @property
    def kind(self) -> str:
        """One of ``damaged``, ``truncated``, ``not-a-state-file``, ``missing``, ``invalid``."""
        return self._kind


class UnrecoverableStateError(CorruptStateError):
    """Automatic recovery found no copy it could trust; nothing was started empty."""

    def __init__(self, path: str | Path | None, candidates: Sequence[tuple[str, str]]) -> None:
        self._candidates = tuple(candidates)
        listing = "; ".join(f"{name}: {why}" for name, why in self._candidates) or "no candidates"
        super().__init__(
            path,
            f"no copy within the backup threshold could be loaded ({listing})",
            next_step=(
                "inspect with `posstate backups list`, then restore an older backup on purpose with "
                "`posstate backups restore ID --accept-older`"
            ),
            kind="unrecoverable",
        )

    @property
    def candidates(self) -> tuple[tuple[str, str], ...]:
        """Every copy that was considered, with the reason it was rejected."""
        return self._candidates


class SchemaValidationError(PosStateError, ValueError):
    """A document or value breaks the JSON Schema or a relationship rule."""

    def __init__(
        self,
        path: str | Path | None,
        json_path: str,
        rule: str,
        message: str,
        *,
        errors: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._json_path = json_path
        self._rule = rule
        self._detail = message
        self._errors = tuple(errors) or ((json_path, message),)
        # A value in memory (path None) is the caller's to fix; only a stored file has something to repair.
        step = (
            ", or for a stored file run `posstate validate` and `posstate repair`"
            if path is not None
            else " (nothing was stored)"
        )
        super().__init__(f"{_show(path)}: {json_path}: {message} (rule: {rule}); fix the value{step}", path=path)

    @property
    def json_path(self) -> str:
        """JSON path of the first failing value, like ``$.positions['BTC/USDT|long'].contracts``."""
        return self._json_path

    @property
    def rule(self) -> str:
        """The schema keyword or relationship rule that failed."""
        return self._rule

    @property
    def detail(self) -> str:
        """The validator's message for the first failure."""
        return self._detail

    @property
    def errors(self) -> tuple[tuple[str, str], ...]:
        """Every failure found, as (json path, message)."""
        return self._errors


class WrongKeyError(PosStateError, ValueError):
    """The checksum holds but authenticated decryption fails: wrong key, or the file was tampered with."""

    def __init__(
        self,
        path: str | Path | None,
        *,
        file_key_id: str,
        our_key_id: str | None,
        downgrade: bool = False,
        given: str | None = None,
        passphrase: bool = False,
    ) -> None:
        self._file_key_id = file_key_id
        self._our_key_id = our_key_id
        if given == "passphrase":  # a passphrase tried on a file written with a raw key
            reason = f"encrypted with a key file (key id {file_key_id}), but a passphrase was given"
            step = "supply that key (POSSTATE_KEY, POSSTATE_KEY_FILE or --key-file) instead of the passphrase"
        elif given == "key":  # a raw key tried on a file written with a passphrase
            reason = "encrypted with a passphrase, but a key file was given (a raw key)"
            step = "supply the passphrase (POSSTATE_PASSPHRASE) instead of the key"
        elif downgrade:
            reason = "the file is not encrypted, but encryption is on (a plaintext file is not trusted: anyone could write one)"
            step = (
                "restore an encrypted backup with `posstate backups restore latest`, or, to adopt this file on purpose, "
                "export it with encryption off and `posstate import` it"
            )
        elif passphrase and our_key_id is not None and our_key_id != file_key_id:  # *passphrase*: the file's
            reason = (
                f"written with a passphrase (key id {file_key_id}), and the one given is not the passphrase it was written with"
            )
            step = "supply the right passphrase (POSSTATE_PASSPHRASE, or passphrase=)"
        elif our_key_id is not None and our_key_id != file_key_id:
            reason = f"written with key id {file_key_id}, but the key given has id {our_key_id}"
            step = "supply the key with that id (POSSTATE_KEY, POSSTATE_KEY_FILE or --key-file)"
        else:
            reason = f"authentication failed under key id {file_key_id} (the file was altered after it was written)"
            step = "do not trust this file; restore a backup with `posstate backups restore latest`"
        super().__init__(f"{_show(path)}: {reason}; {step}", path=path)
        self._given = given

    @property
    def given(self) -> str | None:
        """``"passphrase"`` or ``"key"`` when the kind of secret given does not match the file's, else None."""
        return self._given

    @property
    def file_key_id(self) -> str:
        """Key id recorded in the file header (not secret)."""
        return self._file_key_id

    @property
    def our_key_id(self) -> str | None:
        """Key id of the key that was tried (not secret)."""
        return self._our_key_id


class MissingKeyError(PosStateError, LookupError):
    """Encryption is on, or a file is encrypted, and no key or passphrase was supplied."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        reason: str = "encryption is on but no key was supplied",
        next_step: str = "pass key= or passphrase=, or set POSSTATE_KEY, POSSTATE_KEY_FILE "
        "or POSSTATE_PASSPHRASE (make a key with `posstate keygen`)",
    ) -> None:
        self._reason = reason
        where = f"{path}: " if path is not None else ""  # a key from the environment has no file to name
        super().__init__(f"{where}{reason}; {next_step}", path=path)

    @property
    def reason(self) -> str:
        """What is wrong with the key (``key file not found``), without the next step."""
        return self._reason


class UnsupportedVersionError(PosStateError, ValueError):
    """The file was written by a newer posstate (container format or schema version)."""

    def __init__(self, path: str | Path | None, *, what: str, found: int, supported: int) -> None:
        self._what = what
        self._found = found
        self._supported = supported
        super().__init__(
            f"{_show(path)}: {what} version {found} is newer than this posstate supports ({supported}); "
            "upgrade posstate to read it, and do not overwrite it with this version",
            path=path,
        )

    @property
    def found(self) -> int:
        return self._found

    @property
    def supported(self) -> int:
        return self._supported

    @property
    def what(self) -> str:
        return self._what


class StateLockedError(PosStateError, TimeoutError):
    """Another writer holds the state directory's lock."""

    def __init__(
        self, path: str | Path | None, *, pid: int | None, host: str | None, reason: str = "", next_step: str = ""
    ) -> None:
        self._pid = pid
        self._host = host
        self._reason = reason
        who = f"pid {pid} on host {host}" if pid is not None else "another process (holder unknown)"
        step = next_step or "stop that process first, or use a read-only command such as `posstate validate` or `posstate show`"
        super().__init__(f"{_show(path)}: {reason or f'locked by {who}'}; {step}", path=path)

    @property
    def reason(self) -> str:
        """Why this manager may not write, when it is not simply "another process holds the lock" ("" then)."""
        return self._reason

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def host(self) -> str | None:
        return self._host


class PersistenceError(PosStateError, OSError):
    """A file operation failed; the previous file is intact and the in-memory state unchanged.

    Unless :attr:`outcome_unknown` is True: then posstate could not prove the failed change was undone on
    disk (memory holds the old value, the disk may hold the new one), the manager accepts no further change
    (:class:`OutcomeUnknownError`) and the next load reports the change (docs/JOURNAL.md, "Outcome unknown").
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        operation: str,
        cause: OSError | None = None,
        reason: str = "",
        outcome: str = "the previous file is intact",
        next_step: str = "free space or fix permissions and save again (`posstate doctor` checks the directory)",
        outcome_unknown: bool = False,
    ) -> None:
        self._operation = operation
        self._outcome_unknown = outcome_unknown
        if outcome_unknown:
            next_step = "reopen the manager (a new PositionStateManager) to load what is on disk"
        code = cause.errno if cause is not None else None
        why = reason or (cause.strerror if cause is not None and cause.strerror else str(cause) if cause else "failed")
        name = _errno.errorcode.get(code, "") if code is not None else ""
        label = f"{name}: {why}" if name else why
        OSError.__init__(self, code if code is not None else 0, label)
        self.args = (f"{_show(path)}: {operation} failed ({label}); {outcome}; {next_step}",)
        self._path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def operation(self) -> str:
        """The file operation that failed (write, fsync, rename, ...)."""
        return self._operation

    @property
    def outcome_unknown(self) -> bool:
        """True when the change may be on disk although it was reported as failed (memory keeps the old value)."""
        return self._outcome_unknown


class ConcurrentModificationError(PosStateError, RuntimeError):
    """The file on disk moved on since this manager last loaded or wrote it."""

    def __init__(self, path: str | Path | None, *, expected: int | None, found: int | None, reason: str = "") -> None:
        self._expected = expected
        self._found = found
        exp = "no file" if expected is None else f"generation {expected}"
        got = "no file" if found is None else f"generation {found}"
        why = reason or f"expected {exp} on disk, found {got}; another writer bypassed the lock"
        super().__init__(
            f"{_show(path)}: {why}; reload with load_positions() and apply your change again",
            path=path,
        )

    @property
    def expected(self) -> int | None:
        return self._expected

    @property
    def found(self) -> int | None:
        return self._found


class OutcomeUnknownError(PosStateError, RuntimeError):
    """A change this manager reported as failed may still be on disk: it accepts no further change.

    Raised by every writer after a :class:`PersistenceError` with ``outcome_unknown=True``. Reads still work
    and return memory, which holds the value from before the failed change.
    """

    def __init__(self, path: str | Path | None, *, operation: str = "") -> None:
        self._operation = operation
        what = f" ({operation})" if operation else ""
        super().__init__(
            f"{_show(path)}: the outcome of an earlier failed change{what} is unknown (it may be on disk while this "
            "manager's memory holds the old value), so this manager accepts no further change; reopen the manager "
            "(a new PositionStateManager) to load what is on disk",
            path=path,
        )

    @property
    def operation(self) -> str:
        """The file operation whose failure left the outcome unknown."""
        return self._operation


class StateNotFoundError(PosStateError, FileNotFoundError):
    """A file or backup that was asked for does not exist."""

    def __init__(self, path: str | Path | None, *, what: str = "state file", next_step: str = "") -> None:
        step = next_step or "check --state-dir or the path, or list backups with `posstate backups list`"
        super().__init__(f"{_show(path)}: no such {what}; {step}", path=path)
        self.errno = _errno.ENOENT


class ManagerClosedError(PosStateError, RuntimeError):
    """The manager was closed; its lock is released and it no longer reads or writes."""

    def __init__(self, path: str | Path | None) -> None:
        super().__init__(f"{_show(path)}: this PositionStateManager is closed; create a new one", path=path)


class SymbolMetadataNotFoundError(PosStateError, LookupError):
    """A per-symbol metadata value was set before the symbol's metadata was initialised."""

    def __init__(self, symbol: str) -> None:
        self._symbol = symbol
        super().__init__(
            f"<memory>: symbol {symbol!r} has no metadata yet; initialise it with set_symbol_metadata() "
            "before calling set_symbol_metadata_value()"
        )

    @property
    def symbol(self) -> str:
        return self._symbol


class StaleReportError(PosStateError, RuntimeError):
    """A reconciliation report no longer describes the store: its positions changed since the report was made."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"<memory>: {reason}; call reconcile() again and apply the new report")


class OrderIntentNotFoundError(PosStateError, LookupError):
    """No order intent was recorded under this client order id."""

    def __init__(self, client_order_id: str) -> None:
        self._client_order_id = client_order_id
        super().__init__(f"<state>: no order intent {client_order_id!r}; record() it before marking it")

    @property
    def client_order_id(self) -> str:
        return self._client_order_id


class AmbiguousBackupError(PosStateError, LookupError):
    """A backup id prefix matches more than one backup."""

    def __init__(self, path: str | Path | None, *, prefix: str, matches: Sequence[str]) -> None:
        self._prefix = prefix
        self._matches = tuple(matches)
        shown = ", ".join(self._matches[:5]) + (" ..." if len(self._matches) > 5 else "")
        super().__init__(
            f"{_show(path)}: backup id {prefix!r} matches {len(self._matches)} backups ({shown}); "
            "give more digits of the id (`posstate backups list` shows them)",
            path=path,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def matches(self) -> tuple[str, ...]:
        """Every backup id the prefix matched, newest first."""
        return self._matches


class StaleBackupError(PosStateError, ValueError):
    """A restore was refused: the backup is older than ``backup_threshold`` relative to the last save."""

    def __init__(
        self, path: str | Path | None, *, backup_id: str, age: float, threshold: float, clock_wrong: bool = False
    ) -> None:
        self._backup_id = backup_id
        self._age = age
        self._threshold = threshold
        self._clock_wrong = clock_wrong
        if clock_wrong:
            what = (
                f"backup {backup_id} is older than a later save that is dated before it (the clock was wrong when one "
                "of them was written), so how much it would lose cannot be told"
            )
        else:
            what = f"backup {backup_id} is {age:.0f} s older than the last save, over the backup threshold of {threshold:.0f} s"
        super().__init__(
            f"{_show(path)}: {what}; restoring it brings back stale positions, and stale positions lead to duplicate "
            "orders; reconcile with the exchange first, then restore on purpose with accept_older=True "
            f"(`posstate backups restore {backup_id} --accept-older`)",
            path=path,
        )

    @property
    def clock_wrong(self) -> bool:
        """True when the refusal is because a later generation is dated before the backup (a wrong clock)."""
        return self._clock_wrong

    @property
    def backup_id(self) -> str:
        return self._backup_id

    @property
    def age(self) -> float:
        """Seconds between the backup's write time and the last save."""
        return self._age

    @property
    def threshold(self) -> float:
        return self._threshold


class TransactionError(PosStateError, RuntimeError):
    """An operation that cannot run inside ``PositionStateManager.transaction()`` was called there."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        super().__init__(f"{_show(path)}: {reason}; call it after the `with manager.transaction():` block ends", path=path)


class ConfigError(PosStateError, ValueError):
    """A configuration value or file is wrong."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{message}; see the configuration table in README.md", path=path)


class InvalidArgumentError(PosStateError, ValueError):
    """A call was given an argument posstate does not take (an unknown event name, an interval that is not
    positive): fix the call. A ``ValueError`` too, as before it had its own class."""

    def __init__(self, message: str, *, next_step: str) -> None:
        super().__init__(f"{message}; {next_step}")


class LeaseLostError(PosStateError, RuntimeError):
    """This writer no longer holds the replica lease (another machine took it, or it could not renew it in
    time): it accepts no further change and never ships again (docs/REPLICATION.md, "One writer")."""

    def __init__(self, path: str | Path | None, *, url: str, epoch: int, reason: str) -> None:
        self._url = url
        self._epoch = epoch
        self._reason = reason
        super().__init__(
            f"{_show(path)}: lost the replica lease of {url} (epoch {epoch}: {reason}), so this manager accepts no "
            "further change; stop this process, and let the lease holder write (`posstate replica status` names it)",
            path=path,
        )

    @property
    def url(self) -> str:
        """The replica whose lease was lost (never holds credentials)."""
        return self._url

    @property
    def epoch(self) -> int:
        """The fencing epoch this writer held."""
        return self._epoch

    @property
    def reason(self) -> str:
        return self._reason


class ReplicaError(PosStateError, OSError):
    """The replica could not be reached or read, or holds an object that fails its check."""

    def __init__(self, url: str, reason: str, *, key: str | None = None, next_step: str = "") -> None:
        self._url = url
        self._key = key
        self._reason = reason
        where = f"{url}/{key}" if key else url
        step = next_step or "check the replica URL, the network and the credentials (boto3's usual chain), then retry"
        super().__init__(f"{where}: {reason}; {step}")

    @property
    def url(self) -> str:
        return self._url

    @property
    def key(self) -> str | None:
        """The object the error is about, when there is one."""
        return self._key

    @property
    def reason(self) -> str:
        return self._reason


class OrderTransitionError(PosStateError, ValueError):
    """An order ledger change that its lifecycle does not allow (a fill past the amount, a second answer to an
    order already closed, a fill for an order never sent). Nothing was written."""

    def __init__(self, order: str, reason: str) -> None:
        self._order = order
        self._reason = reason
        super().__init__(f"<ledger>: order {order!r}: {reason}; nothing was recorded (reconcile with the exchange)")

    @property
    def order(self) -> str:
        return self._order

    @property
    def reason(self) -> str:
        return self._reason


class UnknownOrderError(PosStateError, LookupError):
    """The order ledger holds no order with this client or exchange id."""

    def __init__(self, order: str) -> None:
        self._order = order
        super().__init__(
            f"<ledger>: no order {order!r} in the ledger; record its intent first, or adopt it from the exchange "
            "with set_open_orders()/apply_order_update()"
        )

    @property
    def order(self) -> str:
        return self._order


class LedgerOwnershipError(PosStateError, RuntimeError):
    """The order ledger of a manager has one writer: a second ``ExchangeAccountStateStore`` on the same manager,
    or a store already closed, would write from a memory that does not hold the other's orders (and send one
    twice). Nothing was written."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self._reason = reason
        super().__init__(f"{_show(path)}: {reason}; nothing was recorded", path=path)

    @property
    def reason(self) -> str:
        return self._reason


class MalformedLedgerEntryError(OrderTransitionError):
    """A ledger change would overwrite an entry the ledger could not read (left out of memory at load and reported
    as ``malformed``): the entry is kept as it is and the change is not recorded."""

    def __init__(self, entry: str, detail: str) -> None:
        self._order = entry
        self._reason = f"malformed entry: {detail}"
        PosStateError.__init__(
            self,
            f"<ledger>: entry {entry!r} is malformed ({detail}); it is kept as it is and this change, which would "
            "overwrite it, was not recorded; see `posstate validate`, then fix or remove the entry "
            "(`posstate export`, edit, `posstate import`) with the bot stopped",
        )


class ServeError(ConfigError):
    """``serve`` cannot start: an address it may not bind without a token, a token file it refuses, a port in
    use, or the ``serve`` extra not installed. (A ConfigError: the CLI's exit code 2.)"""

    def __init__(self, reason: str, *, next_step: str, path: str | Path | None = None) -> None:
        self._reason = reason
        where = f"{_show(path)}: " if path is not None else ""  # a token file: named, as every other file is
        PosStateError.__init__(self, f"{where}{reason}; {next_step}", path=path)

    @property
    def reason(self) -> str:
        return self._reason
