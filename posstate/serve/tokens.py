"""The server's access rules, kept free of the web stack so the bot's process can check them before a
server process starts (serve/process.py): loopback addresses, the ``Host`` names a loopback server answers
to, the bearer token (read, checked, and refused when it is the state's key)."""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import stat
from pathlib import Path
from typing import Any

from posstate.core.errors import PosStateError, ServeError
from posstate.manager.manager import PositionStateManager
from posstate.storage import crypto as _crypto
from posstate.storage import fileops as fs
from posstate.storage.crypto import Keyring

#: A shorter token is refused: it could be guessed over the network.
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` headers a loopback server answers to: its loopback names with the port, and without it
    on port 80 (browsers leave the default port out)."""
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    names = ("127.0.0.1", "localhost", "[::1]", shown)
    return frozenset({f"{h}:{port}" for h in names} | (set(names) if port == 80 else set()))


def read_token(path: str | Path) -> str:
    """The bearer token in *path* (surrounding whitespace ignored). Refused: a missing, empty or short token,
    or a file other users may read."""
    p = Path(path)
    try:
        text = fs.read_file(p, max_size=4096).decode("utf-8").strip()
        mode = fs.stat_(p).st_mode
    except UnicodeDecodeError:
        raise ServeError("the token file is not UTF-8 text", next_step="write the token as text", path=p) from None
    except OSError as exc:
        if isinstance(exc, (fs.NotRegularFileError, fs.FileTooLargeError)):
            why = exc.strerror  # "is a FIFO, not a regular file", "is N bytes, over the 4096-byte cap"
        elif exc.errno == errno.ELOOP:
            why = "is a symbolic link, which posstate never follows"
        elif exc.errno == errno.ENOENT:
            why = "does not exist"
        else:
            why = f"cannot be read ({exc.strerror or type(exc).__name__})"
        raise ServeError(f"the token file {why}", next_step="give --token-file the path of a regular 0600 file", path=p) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ServeError("the token file is readable by other users", next_step=f"run `chmod 600 {p}`", path=p)
    return check_token(text, path=p)


def check_token(text: str, *, path: Path | None = None) -> str:
    """*text* if it is a usable bearer token: one word of at least MIN_TOKEN_CHARS printable ASCII characters
    (what an HTTP header carries as is)."""
    if len(text) < MIN_TOKEN_CHARS or not all(c.isascii() and c.isprintable() and not c.isspace() for c in text):
        raise ServeError(
            f"the token must be one word of at least {MIN_TOKEN_CHARS} printable ASCII characters",
            next_step="write one, e.g. `(umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE)`",
            path=path,
        )
    return text


def refuse_the_key_as_token(token: str, keyring: Keyring | None, *, passphrase: str | None = None) -> None:
    """ServeError when *token* is the state's key (its base64 text, as in a key file) or *passphrase*:
    every client would send it in clear in each request. Compared by key id and in constant time."""
    if keyring is None:
        return
    same = passphrase is not None and hmac.compare_digest(token.encode(), passphrase.encode())
    if not same and not keyring.uses_passphrase:
        with contextlib.suppress(PosStateError):
            same = _crypto.key_id(_crypto.decode_key_text(token, source="the token")) == keyring.key_id
    if same:
        raise ServeError(
            "the token file holds the state's key: every client would send the key in each request",
            next_step="make a separate token, e.g. `(umask 077; python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' > api.token)`",
        )


def _keyring_of(target: Any) -> Keyring | None:
    """The keyring of a manager, or of the manager behind a persisted account store."""
    manager = target if isinstance(target, PositionStateManager) else getattr(target, "manager", None)
    keyring = manager._serving_keyring() if isinstance(manager, PositionStateManager) else None
    return keyring if isinstance(keyring, Keyring) else None
