"""Power-loss replay (the ALICE idea): every on-disk state a power cut during a recorded save could leave.

Input: the files of the state directory before the save and the operations :class:`~posstate.selftest.harness.HarnessOps`
recorded during it (with ``keep_data=True``). The model, close to ext4 with ``data=ordered``:

* file contents: bytes written since the last fsync/fdatasync of that file may be lost; a file whose
  unsynced writes are lost can be left empty, zero-filled to its new length, or torn at a 512- or 4096-byte
  boundary (the head of the new bytes, then nothing or zeros); bytes rewritten in place (the journal's
  records over its zeros) can land as any sector-aligned head or tail of the changed range;
* directory operations (create, link, rename, unlink) reach the disk in the order they were made; those
  after the last directory fsync may be lost, any number of them from the end;
* every prefix of the operation list is a possible crash point.

These are the *honest* states (``kind="honest"``): a correct writer must load the old or the new state from
each, and the new one once the save has returned. ``lying_disk_states`` adds what a disk that ignores
flushes can leave on top (the renamed file damaged although it was fsynced): only recovery from ``.bak``
can bring those back, so they need the backups issue's automatic recovery.

The scenarios these states are made from and judged by are :mod:`posstate.selftest.scenarios`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from posstate.selftest.harness import Op

SECTORS = (512, 4096)


@dataclass(slots=True)
class _Inode:
    durable: bytes = b""
    current: bytes = b""

    @property
    def synced(self) -> bool:
        return self.durable == self.current


@dataclass(frozen=True, slots=True)
class CrashState:
    """One possible disk after a power cut: relative file name -> bytes."""

    prefix: int  # how many recorded operations had run
    complete: bool  # the save had returned (every op ran): the new state was acknowledged
    files: Mapping[str, bytes]
    label: str
    kind: str = "honest"  # or "lying-disk"


@dataclass(slots=True)
class _Sim:
    root: str
    inodes: dict[int, _Inode] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # namespace as the process saw it
    durable_names: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[str, str, str | None, int]] = field(default_factory=list)  # dir ops since the last dir fsync
    fds: dict[int, int] = field(default_factory=dict)
    appends: set[int] = field(default_factory=set)  # descriptors opened with O_APPEND
    next_ino: int = 0

    def rel(self, path: str | None) -> str:
        assert path is not None
        return os.path.relpath(path, self.root)

    def new_inode(self, data: bytes) -> int:
        self.next_ino += 1
        self.inodes[self.next_ino] = _Inode(data, data)
        return self.next_ino

    def apply(self, op: Op) -> None:
        name = op.name
        if op.faulted in ("skip", "raise") or op.error is not None:
            return  # the call did not happen (a mutation turned it into a no-op, or it failed)
        if name == "open":
            rel = self.rel(op.path)
            flags = op.flags or 0
            if rel not in self.names and flags & os.O_CREAT:
                ino = self.new_inode(b"")
                self.names[rel] = ino
                self.pending.append(("create", rel, None, ino))
            if op.fd is not None and rel in self.names:
                self.fds[op.fd] = self.names[rel]
                if flags & os.O_APPEND:
                    self.appends.add(op.fd)
                else:
                    self.appends.discard(op.fd)
        elif name == "write" and op.fd in self.fds:
            node = self.inodes[self.fds[op.fd]]
            data = op.data or b""
            off = len(node.current) if op.fd in self.appends else (op.offset or 0)
            cur = node.current.ljust(off, b"\0")
            node.current = cur[:off] + data + cur[off + len(data) :]
        elif name == "ftruncate" and op.fd in self.fds:
            node = self.inodes[self.fds[op.fd]]
            size = op.size or 0
            node.current = node.current[:size].ljust(size, b"\0")
        elif name in ("fsync", "fdatasync") and op.fd in self.fds:
            node = self.inodes[self.fds[op.fd]]
            node.durable = node.current
        elif name == "close":
            self.fds.pop(op.fd or -1, None)
        elif name == "replace":
            src, dst = self.rel(op.path), self.rel(op.dst)
            if src in self.names:  # a file outside the snapshot (not ours to model) is left alone
                self.names[dst] = self.names.pop(src)
                self.pending.append(("replace", src, dst, 0))
        elif name == "link":
            src, dst = self.rel(op.path), self.rel(op.dst)
            if src in self.names:
                self.names[dst] = self.names[src]
                self.pending.append(("link", src, dst, 0))
        elif name == "unlink":
            rel = self.rel(op.path)
            self.names.pop(rel, None)
            self.pending.append(("unlink", rel, None, 0))
        elif name == "fsync_dir":
            self.durable_names = dict(self.names)
            self.pending = []

    def namespaces(self) -> Iterator[tuple[int, dict[str, int]]]:
        """The durable namespace with each in-order prefix of the pending directory operations applied."""
        ns = dict(self.durable_names)
        yield 0, dict(ns)
        for i, (kind, a, b, ino) in enumerate(self.pending, 1):
            if kind == "create":
                ns[a] = ino
            elif kind == "replace" and b is not None and a in ns:
                ns[b] = ns.pop(a)
            elif kind == "link" and b is not None and a in ns:
                ns[b] = ns[a]
            elif kind == "unlink":
                ns.pop(a, None)
            yield i, dict(ns)


def _content_variants(node: _Inode) -> list[tuple[str, bytes]]:
    """What a power cut can leave in a file whose latest writes were not fsynced."""
    if node.synced:
        return [("synced", node.current)]
    new, old = node.current, node.durable
    out: list[tuple[str, bytes]] = [("unsynced-old", old), ("unsynced-new", new)]
    if old and len(new) > len(old) and new.startswith(old):
        # An append (the journal): the file grew but the new bytes may not have reached the disk. The size
        # may have (zeros), or only the sectors before a boundary; "torn@mid" cuts inside the new bytes even
        # when no sector boundary falls there (stricter than a disk, which tears at sector boundaries).
        grown = len(new) - len(old)
        out.append(("append-zeros", old + bytes(grown)))
        cuts = {len(old) + grown // 2: "torn@mid"}
        for sector in SECTORS:
            for cut in range((len(old) // sector + 1) * sector, len(new), sector):
                cuts.setdefault(cut, f"torn@{cut}")
        for cut, label in sorted(cuts.items()):
            out.append((label, new[:cut]))
            out.append((f"{label}+zeros", new[:cut] + bytes(len(new) - cut)))
        return out
    if old and len(new) >= len(old):
        # Bytes rewritten in place (journal records over the zeros written ahead of them), perhaps growing the
        # file: the disk may hold the new size with the old bytes (zeros), or any sector-aligned head or tail
        # of the changed range, since the sectors of one write reach the disk in no set order.
        base = old + bytes(len(new) - len(old))
        if len(new) > len(old):
            out.append(("grown-zeros", base))
        lo = _common_prefix(base, new)
        hi = len(new) - _common_prefix(base[::-1], new[::-1])
        cuts = {(lo + hi) // 2: "mid"}
        for sector in SECTORS:
            for cut in range((lo // sector + 1) * sector, hi, sector):
                cuts.setdefault(cut, str(cut))
        for cut, label in sorted(cuts.items()):
            if lo < cut < hi:
                out.append((f"overwrite-head@{label}", new[:cut] + base[cut:]))
                out.append((f"overwrite-tail@{label}", base[:cut] + new[cut:]))
        return out
    if old:
        return out  # a file cut back (a journal's failed tail) is modelled as old/new
    out.append(("empty", b""))
    out.append(("zero-filled", bytes(len(new))))
    for sector in SECTORS:
        for cut in range(sector, len(new), sector):
            out.append((f"torn@{cut}", new[:cut]))
            out.append((f"torn@{cut}+zeros", new[:cut] + bytes(len(new) - cut)))
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common head of *a* and *b* (binary search over slice compares, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    va, vb = memoryview(a), memoryview(b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if va[lo:mid] == vb[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _damaged(data: bytes) -> list[tuple[str, bytes]]:
    """A fsynced file a lying disk lost anyway: empty, zero-filled, torn at sector boundaries."""
    out: list[tuple[str, bytes]] = [("lie-empty", b""), ("lie-zero-filled", bytes(len(data)))]
    for sector in SECTORS:
        for cut in range(sector, len(data), sector):
            out.append((f"lie-torn@{cut}", data[:cut]))
            out.append((f"lie-torn@{cut}+zeros", data[:cut] + bytes(len(data) - cut)))
    return out


def _simulate(
    before: Mapping[str, bytes], ops: Sequence[Op], root: str, open_fds: Mapping[int, tuple[str, bool]] | None = None
) -> Iterator[tuple[int, _Sim]]:
    sim = _Sim(root=root)
    for rel, data in before.items():
        ino = sim.new_inode(data)
        sim.names[rel] = ino
    sim.durable_names = dict(sim.names)
    for fd, (path, append) in (open_fds or {}).items():  # descriptors opened before the recording started
        rel = sim.rel(path)
        if rel in sim.names:
            sim.fds[fd] = sim.names[rel]
            if append:
                sim.appends.add(fd)
    yield 0, sim
    for p, op in enumerate(ops, 1):
        sim.apply(op)
        yield p, sim


def crash_states(
    before: Mapping[str, bytes], ops: Sequence[Op], root: str | Path, *, open_fds: Mapping[int, tuple[str, bool]] | None = None
) -> Iterator[CrashState]:
    """Every honest crash state of the recorded operations (see the module docstring). *open_fds* names the
    descriptors already open when the recording of *ops* started (``HarnessOps.open_files()``)."""
    n = len(ops)
    seen: set[tuple[int, tuple[tuple[str, bytes], ...]]] = set()
    for p, sim in _simulate(before, ops, str(root), open_fds):
        for j, ns in sim.namespaces():
            choices: list[list[tuple[str, str, bytes]]] = []
            for rel, ino in sorted(ns.items()):
                node = sim.inodes.get(ino)
                if node is None:
                    continue
                choices.append([(rel, label, data) for label, data in _content_variants(node)])
            for combo in _product(choices):
                files = {rel: data for rel, _, data in combo}
                key = (p == n, tuple(sorted(files.items())))
                if key in seen:
                    continue
                seen.add(key)
                labels = ",".join(f"{rel}={label}" for rel, label, _ in combo if label != "synced")
                yield CrashState(prefix=p, complete=p == n, files=files, label=f"ops={p} dirops={j} {labels}".strip())


def lying_disk_states(before: Mapping[str, bytes], ops: Sequence[Op], root: str | Path, *, target: str) -> Iterator[CrashState]:
    """The final state of the save with *target* (relative name) damaged although it was fsynced."""
    final: _Sim | None = None
    for _, sim in _simulate(before, ops, str(root)):
        final = sim
    assert final is not None
    files = {rel: final.inodes[ino].current for rel, ino in final.names.items() if ino in final.inodes}
    if target not in files:
        return
    for label, data in _damaged(files[target]):
        yield CrashState(prefix=len(ops), complete=True, files={**files, target: data}, label=label, kind="lying-disk")


def _product(choices: list[list[tuple[str, str, bytes]]]) -> Iterator[list[tuple[str, str, bytes]]]:
    if not choices:
        yield []
        return
    head, rest = choices[0], choices[1:]
    for item in head:
        for tail in _product(rest):
            yield [item, *tail]


def snapshot(root: Path) -> dict[str, bytes]:
    """The regular files under *root* by relative path (backups and quarantine included; the lock file
    excluded: it holds no state)."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(".lock"):
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def materialize(state: CrashState, into: Path) -> None:
    """Write *state*'s files into the empty directory *into* (mode 0700, files 0600)."""
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    for rel, data in state.files.items():
        p = into / rel
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


__all__ = ["CrashState", "crash_states", "lying_disk_states", "materialize", "snapshot"]
