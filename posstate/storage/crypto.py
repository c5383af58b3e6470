"""Keys and AES-256-GCM. Works on bytes; knows nothing of files or JSON.

A key is 32 random bytes. A passphrase is stretched with scrypt under a random salt kept in the file header.
Key material lives only inside :class:`Keyring`; its repr shows the key id, never the key, and no message
this module builds contains key bytes or a passphrase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from posstate.core.errors import ConfigError, MissingKeyError
from posstate.storage import fileops as fs

log = logging.getLogger("posstate")

KEY_SIZE = 32
NONCE_SIZE = 12
SALT_SIZE = 16
#: scrypt cost as log2(N); with r=8 this is 32 MiB of memory and about 0.1 s, once per manager.
DEFAULT_SCRYPT_LOG2_N = 15
#: The scrypt costs a file may name (a format rule, docs/FORMAT.md): a header is read before anything
#: authenticates it, so its cost is checked against this range before scrypt runs. 2**17 with r=8 needs
#: 128 MiB, the most the 256 MiB ``maxmem`` below allows; 2**10 is the cheapest posstate accepts.
MIN_SCRYPT_LOG2_N = 10
MAX_SCRYPT_LOG2_N = 17
_KEY_ID_LABEL = b"posstate/key-id/v1"


def generate_key() -> bytes:
    """Return a new random 32-byte AES-256 key (store it with ``posstate keygen`` or base64 it yourself)."""
    return os.urandom(KEY_SIZE)


def key_id(key: bytes) -> str:
    """A public 8-byte fingerprint of *key* (hex). It reveals nothing about the key."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:8].hex()


def scrypt_cost_ok(log2_n: object) -> bool:
    """True when *log2_n* is a scrypt cost a file may name (see ``MIN_SCRYPT_LOG2_N``)."""
    return type(log2_n) is int and MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N


def derive_key(passphrase: str, salt: bytes, log2_n: int = DEFAULT_SCRYPT_LOG2_N) -> bytes:
    if not scrypt_cost_ok(log2_n):  # the parsers refuse such a header first; this is the last line
        raise ValueError(f"scrypt cost 2**{log2_n} is outside 2**{MIN_SCRYPT_LOG2_N}..2**{MAX_SCRYPT_LOG2_N}")
    return hashlib.scrypt(
        passphrase.encode("utf-8"), salt=salt, n=1 << log2_n, r=8, p=1, maxmem=256 * 1024 * 1024, dklen=KEY_SIZE
    )


def decode_key_text(text: str, *, source: str, path: Path | None = None) -> bytes:
    """Decode base64 key text (as written by ``posstate keygen``); never echo the text in an error. *path*: the
    key file the text came from, named by the error."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MissingKeyError(path, reason=f"{source} is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise MissingKeyError(path, reason=f"{source} decodes to {len(raw)} bytes, expected {KEY_SIZE}")
    return raw


def encode_key_text(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


#: A key file holds 44 characters of base64; anything past this size is refused before it is read.
MAX_KEY_FILE_BYTES = 4096


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        text = fs.read_file(p, max_size=MAX_KEY_FILE_BYTES).decode("ascii")
    except FileNotFoundError:
        raise MissingKeyError(p, reason="key file not found") from None
    except (fs.NotRegularFileError, fs.FileTooLargeError) as exc:
        raise MissingKeyError(p, reason=f"key file {exc.strerror}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingKeyError(p, reason=f"key file unreadable ({type(exc).__name__})") from None
    try:
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s is readable by group or others (mode %o); chmod 600 it", p, mode & 0o777)
    except OSError:
        pass
    return decode_key_text(text, source="key file", path=p)


def coerce_key(key: object, *, argument: str = "key=") -> bytes:
    """The 32 raw key bytes from *key*: those bytes, or the base64 text ``posstate keygen`` writes (a str, or
    the bytes of a key file, newline and all). Anything else is a ConfigError naming *argument*; the value is
    never echoed (issue 15.5)."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) == KEY_SIZE:
            return raw
        decoded = _b64_key(raw)  # a key file's bytes
        if decoded is None:
            raise ConfigError(
                f"{argument} must be the {KEY_SIZE} raw bytes of a key or its base64 text (from `posstate keygen` or "
                f"generate_key()), got {len(raw)} bytes"
            )
        return decoded
    if isinstance(key, str):
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{argument} text is not the base64 of a key (as `posstate keygen` writes it); pass the {KEY_SIZE} raw "
                "bytes from generate_key() or posstate.load_key(path)"
            ) from None
        if len(raw) != KEY_SIZE:
            raise ConfigError(f"{argument} base64 text decodes to {len(raw)} bytes, expected {KEY_SIZE}")
        return raw
    raise ConfigError(
        f"{argument} must be {KEY_SIZE} raw bytes or the base64 text of a key, got {type(key).__name__}; "
        "read a key file with posstate.load_key(path)"
    )


def _b64_key(data: bytes) -> bytes | None:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_SIZE else None


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The 32 raw bytes of the key in the file *path* (base64 text, as ``posstate keygen --out`` writes it):
    ``PositionStateManager(config, key=posstate.load_key("bot.key"))``. A missing or malformed file is a
    :class:`~posstate.MissingKeyError` naming it; a file others can read is logged as a warning."""
    return read_key_file(path)


class Keyring:
    """The key (or passphrase) a manager encrypts and decrypts with.

    With a passphrase, each salt derives its own key; derived keys are cached per salt so scrypt runs once
    per salt, not once per save.
    """

    __slots__ = ("_derived", "_key", "_lock", "_log2_n", "_passphrase", "_salt", "_sealed_pass")

    def __init__(
        self, *, key: bytes | str | None = None, passphrase: str | None = None, log2_n: int = DEFAULT_SCRYPT_LOG2_N
    ) -> None:
        if key is not None and passphrase is not None:
            raise ConfigError("give key= or passphrase=, not both")
        self._key: bytes | None = None  # set before any check, so a repr of a half-built Keyring works
        self._passphrase: str | None = None
        raw = coerce_key(key) if key is not None else None  # 32 raw bytes, or keygen's base64 text (issue 15.5)
        if passphrase is not None and (not isinstance(passphrase, str) or not passphrase):
            got = "an empty string" if isinstance(passphrase, str) else f"a {type(passphrase).__name__}"
            raise ConfigError(f"passphrase= must be a non-empty string, got {got}")
        if passphrase is not None and any("\ud800" <= ch <= "\udfff" for ch in passphrase):
            # Not Unicode text (e.g. POSSTATE_PASSPHRASE holding bytes that are not UTF-8): it has no UTF-8 form to derive
            # a key from. Refused here, never a UnicodeEncodeError at the first save.
            raise MissingKeyError(reason="passphrase is not valid Unicode text (a lone surrogate; set it as UTF-8)")
        if not scrypt_cost_ok(log2_n):
            raise ConfigError(
                f"log2_n must be an int from {MIN_SCRYPT_LOG2_N} to {MAX_SCRYPT_LOG2_N} (the scrypt cost files may name)"
            )
        self._key = raw
        self._passphrase = passphrase
        self._derived: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._log2_n = log2_n
        self._salt: bytes | None = None
        self._sealed_pass = False  # a worker's copy of a passphrase keyring: derived keys only (for_worker)

    def __repr__(self) -> str:
        kind = "key" if self._key is not None else "passphrase"
        return f"Keyring({kind}, id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a Keyring cannot be pickled (it would copy key material)")

    @property
    def uses_passphrase(self) -> bool:
        return self._passphrase is not None or self._sealed_pass

    def worker_material(self) -> dict[str, Any]:
        """What a compaction worker process needs to read and write as this keyring does (issue 14): the raw
        key, or for a passphrase the keys already derived (per salt and cost) and the write salt, never the
        passphrase. Sent to the worker over its stdin pipe only (posstate/manager/procompaction.py)."""
        if self._key is not None:
            return {"key": self._key.hex()}
        self.write_material()  # the write salt's key is derived here (once), not by the worker
        with self._lock:
            derived = {k.hex(): v.hex() for k, v in self._derived.items()}
        assert self._salt is not None
        return {"derived": derived, "salt": self._salt.hex(), "log2_n": self._log2_n}

    @classmethod
    def from_worker_material(cls, material: Mapping[str, Any]) -> Keyring:
        """The keyring :meth:`worker_material` describes. With a passphrase it holds only the derived keys: a
        file under another salt is MissingKeyError (the worker refuses; the parent compacts in process)."""
        if "key" in material:
            return cls(key=bytes.fromhex(str(material["key"])))
        ring = cls(log2_n=int(material["log2_n"]))
        ring._sealed_pass = True
        ring._derived = {bytes.fromhex(k): bytes.fromhex(v) for k, v in dict(material["derived"]).items()}
        ring._salt = bytes.fromhex(str(material["salt"]))
        return ring

    @property
    def log2_n(self) -> int:
        return self._log2_n

    def use_salt(self, salt: bytes) -> None:
        """Adopt the salt of the file just loaded, so later saves need no new scrypt run."""
        if self._passphrase is not None:
            self._salt = salt

    def write_material(self) -> tuple[bytes, bytes]:
        """(key, salt) to encrypt a new file with; salt is empty for a raw key."""
        if self._key is not None:
            return self._key, b""
        if self._salt is None:
            self._salt = os.urandom(SALT_SIZE)
        return self.key_for(self._salt, self._log2_n), self._salt

    def key_for(self, salt: bytes, log2_n: int) -> bytes:
        """The key to decrypt a file with *salt* (ignored for a raw key)."""
        if self._key is not None:
            return self._key
        cache_key = salt + bytes([log2_n])
        with self._lock:
            found = self._derived.get(cache_key)
        if found is None and self._passphrase is None:
            raise MissingKeyError(reason="no key derived for this file's salt in the compaction worker")
        if found is None:
            assert self._passphrase is not None
            # scrypt runs outside the lock: a file planted with its own salt (up to 2**17, ~0.4 s) must not make
            # the bot's save or journal rotation, which need this keyring's own key, wait for it. Two threads
            # may derive the same key once; the first stored is kept.
            derived = derive_key(self._passphrase, salt, log2_n)
            with self._lock:
                found = self._derived.setdefault(cache_key, derived)
        return found

    @property
    def key_id(self) -> str:
        """Id of the key a new file would be written with (for a passphrase: under the current salt)."""
        if self._key is not None:
            return key_id(self._key)
        if self._salt is None:
            return "passphrase"
        return key_id(self.key_for(self._salt, self._log2_n))

    @classmethod
    def resolve(
        cls,
        *,
        key: bytes | str | None = None,
        passphrase: str | None = None,
        env: Mapping[str, str] | None = None,
        log2_n: int = DEFAULT_SCRYPT_LOG2_N,
    ) -> Keyring | None:
        """Find a key: ``key=``, ``passphrase=``, then POSSTATE_KEY, POSSTATE_KEY_FILE, POSSTATE_PASSPHRASE."""
        if key is not None or passphrase is not None:
            return cls(key=key, passphrase=passphrase, log2_n=log2_n)
        env = os.environ if env is None else env
        if env.get("POSSTATE_KEY"):
            return cls(key=decode_key_text(env["POSSTATE_KEY"], source="POSSTATE_KEY"), log2_n=log2_n)
        if env.get("POSSTATE_KEY_FILE"):
            return cls(key=read_key_file(env["POSSTATE_KEY_FILE"]), log2_n=log2_n)
        if env.get("POSSTATE_PASSPHRASE"):
            return cls(passphrase=env["POSSTATE_PASSPHRASE"], log2_n=log2_n)
        return None


def new_nonce() -> bytes:
    """A fresh random 96-bit nonce; with one key, 2**32 saves keep the collision chance below 2**-32."""
    return os.urandom(NONCE_SIZE)


def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """Decrypt and authenticate; None when the tag does not verify (wrong key or altered bytes)."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None
