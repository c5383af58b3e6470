"""The pipe between the bot's process and its server process (serve/process.py, serve/child.py): frames, and
the changes of a :class:`~posstate.serve.view.View` as a small delta.

Bot to server: frames of a 4-byte big-endian length and a pickle. Pickle, because the feeder encodes on the
bot's side and C pickle is the cheapest encoder of positions, orders and Decimals there; it is safe only in
this direction: the server process unpickles what its own parent wrote on a pipe no one else holds. Server to
bot: one JSON line (the bound URL, or why it could not bind): the bot never unpickles anything from the
process that talks to the network.

A view delta names, for each mapping of the view that changed, the entries set and the keys removed, and the
scalars that changed: a poll with ten changes sends ten entries, not the state.
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import pickle
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import IO, Any

from posstate.serve.view import View, same

HEADER = struct.Struct(">I")
#: The largest frame the server process accepts (a state of a few hundred thousand entries).
MAX_FRAME = 256 * 1024 * 1024

_MAPS = ("positions", "position_revs", "metadata", "metadata_revs", "orders", "leverage", "account")
_SCALARS = ("source", "version", "generation", "balance", "previous_balance", "changed_at")


def frozen(items: dict[Any, Any]) -> Mapping[Any, Any]:
    """A read-only mapping again (the account store's frozen maps travel as dicts)."""
    return MappingProxyType(items)


_TABLE = {**copyreg.dispatch_table, MappingProxyType: lambda m: (frozen, (dict(m),))}


def encode(obj: Any) -> bytes:
    """One frame: the header and the pickle of *obj* (the account store's frozen mappings included)."""
    buf = io.BytesIO()
    buf.write(b"\0\0\0\0")
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _TABLE
    pickler.dump(obj)
    data = buf.getbuffer()
    HEADER.pack_into(data, 0, len(data) - HEADER.size)
    return bytes(data)


def read_frame(stream: IO[bytes]) -> Any | None:
    """The next frame's object, or None at the end of the pipe (the bot's process is gone)."""
    head = _read_exactly(stream, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the {MAX_FRAME}-byte limit")
    body = _read_exactly(stream, size)
    if body is None:
        return None
    return pickle.loads(body)  # noqa: S301 - written by our own parent on a private pipe (module docstring)


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    parts: list[bytes] = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def view_delta(old: View, new: View) -> dict[str, Any]:
    """What changed from *old* to *new*: ``{name: value}`` for a scalar, ``{name: (set, removed)}`` for a
    mapping (``(None, None)``: the mapping itself became or stopped being None, given whole under ``name!``)."""
    out: dict[str, Any] = {}
    for name in _SCALARS:
        if not same(getattr(old, name), getattr(new, name)):
            out[name] = getattr(new, name)
    for name in _MAPS:
        a: Mapping[Any, Any] | None = getattr(old, name)
        b: Mapping[Any, Any] | None = getattr(new, name)
        if a is b:
            continue
        if a is None or b is None:
            out[name + "!"] = None if b is None else dict(b)
            continue
        changed = {k: v for k, v in b.items() if (o := a.get(k, _MISSING)) is not v and not same(o, v)}
        added = sum(1 for k in changed if k not in a)
        removed = list(a.keys() - b.keys()) if len(a) + added != len(b) else []
        if changed or removed:
            out[name] = (changed, removed)
    return out


_MISSING = object()


def apply_delta(view: View, delta: Mapping[str, Any]) -> View:
    """*view* with *delta* applied (new mappings; the ones clients hold are never changed in place)."""
    fields: dict[str, Any] = {}
    for name, value in delta.items():
        if name.endswith("!"):
            fields[name[:-1]] = value
        elif name in _MAPS:
            changed, removed = value
            m = dict(getattr(view, name))
            m.update(changed)
            for k in removed:
                m.pop(k, None)
            fields[name] = m
        else:
            fields[name] = value
    return dataclasses.replace(view, **fields) if fields else view
