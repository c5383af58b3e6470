"""Every posstate error survives pickling whole (type, message, attributes): an error raised in a worker process
(multiprocessing, concurrent.futures) reaches the parent as itself, not as a TypeError about missing arguments."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable

import pytest

import posstate.core.errors as errors

EXAMPLES: dict[str, Callable[[], errors.PosStateError]] = {
    "PosStateError": lambda: errors.PosStateError("boom", path="/s/positions.json"),
    "CorruptStateError": lambda: errors.CorruptStateError("/s/p.json", "bad checksum", kind="truncated"),
    "UnrecoverableStateError": lambda: errors.UnrecoverableStateError("/s/p.json", [("p.json.bak", "damaged")]),
    "SchemaValidationError": lambda: errors.SchemaValidationError(
        "/s/p.json", "$.positions", "type", "not an object", errors=[("$.positions", "not an object")]
    ),
    "WrongKeyError": lambda: errors.WrongKeyError("/s/p.json", file_key_id="aa", our_key_id="bb", downgrade=True),
    "MissingKeyError": lambda: errors.MissingKeyError("/s/p.json"),
    "UnsupportedVersionError": lambda: errors.UnsupportedVersionError("/s/p.json", what="format", found=9, supported=4),
    "StateLockedError": lambda: errors.StateLockedError("/s/p.json.lock", pid=42, host="box"),
    "PersistenceError": lambda: errors.PersistenceError(
        "/s/p.json", operation="fsync", cause=OSError(5, "Input/output error"), outcome_unknown=True
    ),
    "ConcurrentModificationError": lambda: errors.ConcurrentModificationError("/s/p.json", expected=3, found=4),
    "OutcomeUnknownError": lambda: errors.OutcomeUnknownError("/s/p.json", operation="fsync"),
    "StateNotFoundError": lambda: errors.StateNotFoundError("/s/p.json"),
    "ManagerClosedError": lambda: errors.ManagerClosedError("/s/p.json"),
    "SymbolMetadataNotFoundError": lambda: errors.SymbolMetadataNotFoundError("BTC/USDT"),
    "StaleReportError": lambda: errors.StaleReportError("older than the last fill"),
    "OrderIntentNotFoundError": lambda: errors.OrderIntentNotFoundError("cid-1"),
    "AmbiguousBackupError": lambda: errors.AmbiguousBackupError("/s/backups", prefix="2026", matches=["a", "b"]),
    "StaleBackupError": lambda: errors.StaleBackupError("/s/b", backup_id="b1", age=99.0, threshold=60.0),
    "TransactionError": lambda: errors.TransactionError("/s/p.json", "save inside a transaction"),
    "ConfigError": lambda: errors.ConfigError("backup_interval must be a number", path="/s/posstate.toml"),
    "InvalidArgumentError": lambda: errors.InvalidArgumentError("unknown event 'sved'", next_step="use one of: saved"),
    "LeaseLostError": lambda: errors.LeaseLostError("/s/p.json", url="s3://b/p", epoch=7, reason="taken over"),
    "ReplicaError": lambda: errors.ReplicaError("s3://b/p", "403", key="snapshots/1"),
    "OrderTransitionError": lambda: errors.OrderTransitionError("o1", "filled -> open"),
    "UnknownOrderError": lambda: errors.UnknownOrderError("o1"),
    "LedgerOwnershipError": lambda: errors.LedgerOwnershipError("/s/p.json", "another store owns the ledger"),
    "MalformedLedgerEntryError": lambda: errors.MalformedLedgerEntryError("order:o1", "not an object"),
    "ServeError": lambda: errors.ServeError("port in use", next_step="pick another --port"),
}


def _classes() -> list[type[errors.PosStateError]]:
    return [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.PosStateError)]


def test_every_error_class_has_an_example() -> None:
    """A new error class gets an example here, so its pickling is tested too."""
    assert {c.__name__ for c in _classes()} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_error_survives_pickling_whole(name: str) -> None:
    """Type, message, args, path and every public attribute are the same after a pickle round trip."""
    exc = EXAMPLES[name]()
    assert type(exc).__name__ == name
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args
    props = [n for n, v in inspect.getmembers(type(exc)) if isinstance(v, property)]
    assert props  # every class has at least `path`
    for prop in props:
        assert getattr(back, prop) == getattr(exc, prop), prop
    if isinstance(exc, OSError):
        assert isinstance(back, OSError)
        assert (back.errno, back.strerror, back.filename) == (exc.errno, exc.strerror, exc.filename)


def _raise_in_worker() -> None:
    raise errors.PersistenceError("/s/p.json", operation="fsync", cause=OSError(5, "EIO"), outcome_unknown=True)


def test_error_raised_in_a_worker_process_reaches_the_parent_as_itself() -> None:
    """A real child process (multiprocessing spawn): the parent catches PersistenceError with its attributes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(_raise_in_worker)
        with pytest.raises(errors.PersistenceError) as caught:
            future.result(timeout=60)
    assert caught.value.outcome_unknown is True
    assert caught.value.operation == "fsync"
    assert caught.value.errno == 5
