"""Benchmark: a durable save of 1,000 positions, validated loads of 10,000 and 100,000, journal replay and memory.

Run from the repository root::

    python benchmarks/bench_core.py            # default: temp dir on the file system of /tmp
    python benchmarks/bench_core.py --dir DIR  # put the state files on another file system

The floor is bare code doing the same work with the same libraries, measured in the same run and
interleaved with the library's runs (so a busy machine slows both alike):

* save floor: orjson.dumps of the same document, zstd level 3, AES-256-GCM, write a temp file, fsync,
  rename, fsync the directory.
* load floor (10,000): read the file, SHA-256, AES-GCM decrypt, zstd decompress, orjson.loads.
* load floor (100,000, issue 14.5): the same, then build every ``Position`` as bare code would,
  ``Position(**entry["position"])`` into a dict keyed by (symbol, side).

The library's save also keeps ``positions.json.bak`` (a hard link), checks the file it replaces and
re-reads what it wrote (``verify_after_write``); its load validates the whole document (schema-equivalent
fast path plus relationship rules) and builds the ``Position`` objects. Targets: save <= 2x its floor,
load of 10,000 <= 3x its floor (which builds no Position), load of 100,000 <= 2x its floor (which does).

Journal replay (issue 14.5): the same 100,000-position state with a 5,000-record journal
(``durability="sync"``, one ``set_position`` per record) against the same state without one, both loaded
by the library in the same rounds; target: the journal adds <= 30%.

Memory (issue 14.4): ``tracemalloc`` in two fresh interpreters, one holding a ``PositionStateManager`` that
loaded 100,000 positions (no metadata), changed one and saved, the other a plain dict of the same
``Position`` objects (built from the same file by bare code); target: the manager <= 1.3x the plain dict.

The 1,000-position save and the 10,000-position load are measured first, in a process that holds only
those states (a save builds every position's entry, and allocating them is slower once the process also
holds the 100,000-position states). Nothing here asserts: it prints a table.

Import cost (issue 13.6): the median of ``--import-rounds`` fresh interpreters each timing ``import posstate``,
against the same for its runtime dependencies (cryptography's AESGCM, zstandard, orjson), alternated so a
busy machine slows both alike, all of them from bytecode (written to a temporary ``PYTHONPYCACHEPREFIX`` by a
first, untimed run, as pip compiles an installed wheel); target <= 2x. It also prints a bot's real first import
(``from posstate import PositionStateManager``), which loads the manager, the journal and storage (backups,
recovery, repair, merge and offline validation load on first use); same target.
``python benchmarks/bench_core.py --imports-only`` prints this section alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import orjson
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posstate import Position, PositionStateManager, StateConfig, generate_key
from posstate.model import document as _document
from posstate.storage import container as _format
from posstate.storage import fileops as _fs

BASES = ["BTC", "ETH", "SOL", "XRP", "DOGE", "ADA", "AVAX", "LINK", "DOT", "MATIC", "LTC", "TRX", "ATOM", "NEAR", "APT"]


def _dec(rng: random.Random, lo: float, hi: float, places: int) -> Decimal:
    return Decimal(f"{rng.uniform(lo, hi):.{places}f}")


def make_position(rng: random.Random, i: int, side: str) -> Position:
    price_places = rng.choice([1, 2, 4, 6, 8])
    entry = _dec(rng, 0.0001, 70000, price_places)
    mark = entry * (Decimal(1) + _dec(rng, -0.05, 0.05, 4))
    contracts = _dec(rng, 0.001, 5000, rng.choice([0, 3, 8]))
    size = Decimal(rng.choice(["1", "0.01", "0.001", "10", "100"]))
    lev = Decimal(rng.choice([1, 2, 3, 5, 10, 20, 25, 50, 75, 125]))
    notional = contracts * size * mark
    sign = 1 if side == "long" else -1
    return Position(
        symbol=f"{BASES[i % len(BASES)]}{i}/USDT:USDT",
        side=side,  # type: ignore[arg-type]
        contracts=contracts,
        contract_size=size,
        entry_price=entry,
        mark_price=mark.quantize(Decimal(10) ** -price_places),
        notional=notional.quantize(Decimal("0.0001")),
        leverage=lev,
        unrealized_pnl=(sign * (mark - entry) * contracts * size).quantize(Decimal("0.000001")),
        realized_pnl=_dec(rng, -500, 500, 6),
        liquidation_price=(entry * (Decimal(1) - sign / lev)).quantize(Decimal(10) ** -price_places),
        margin_mode=rng.choice(["cross", "isolated"]),
        stop_loss_price=(entry * Decimal("0.95")).quantize(Decimal(10) ** -price_places),
        take_profit_price=(entry * Decimal("1.1")).quantize(Decimal(10) ** -price_places),
        timestamp=1_700_000_000_000 + rng.randrange(10**10),
    )


def make_metadata(rng: random.Random, i: int) -> dict[str, object]:
    return {
        "entries": {"long": rng.randrange(5), "short": rng.randrange(5)},
        "trailing_stop": {
            "active": rng.random() < 0.5,
            "peak": str(_dec(rng, 1, 70000, 2)),
            "distance_pct": rng.choice([0.5, 1.0, 2.5]),
        },
        "first_open_ms": 1_700_000_000_000 + rng.randrange(10**10),
        "last_close_price": str(_dec(rng, 1, 70000, 4)),
        "strategy_id": f"strat-{rng.randrange(20)}",
    }


def populate(m: PositionStateManager, n: int, rng: random.Random) -> list[Position]:
    ps = []
    for i in range(n):
        side = "long" if i % 3 else "short"
        ps.append(make_position(rng, i, side))
        if side == "long":
            m.set_symbol_metadata(ps[-1].symbol, make_metadata(rng, i))
    for p in ps:
        m.set_position(p)
    return ps


def stats(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return statistics.median(s) * 1000, p99 * 1000


def floor_save(doc: dict[str, object], key: bytes, path: Path, cctx: zstandard.ZstdCompressor) -> None:
    payload = cctx.compress(orjson.dumps(doc))
    nonce = os.urandom(12)
    head = b"H" * _format.HEADER_SIZE
    body = head + AESGCM(key).encrypt(nonce, payload, head)
    data = body + b"\nsha256=" + hashlib.sha256(body).hexdigest().encode() + b"\n"
    tmp = path.with_name(f".floor.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def floor_load(path: Path, key: bytes, dctx: zstandard.ZstdDecompressor) -> object:
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data[: -_format.TRAILER_SIZE]).hexdigest().encode() != data[-65:-1]:
        raise ValueError("checksum")
    head = data[: _format.HEADER_SIZE]
    nonce = _format.parse_header(data).nonce
    plain = AESGCM(key).decrypt(nonce, data[_format.HEADER_SIZE : -_format.TRAILER_SIZE], head)
    return orjson.loads(dctx.decompress(plain))


def floor_load_positions(path: Path, key: bytes, dctx: zstandard.ZstdDecompressor) -> dict[tuple[str, str], Position]:
    """The load floor with the Positions built as bare code would: the public constructor, one per entry."""
    doc = floor_load(path, key, dctx)
    assert isinstance(doc, dict)
    out: dict[tuple[str, str], Position] = {}
    for entry in doc["positions"].values():
        p = entry["position"]
        out[(p["symbol"], p["side"])] = Position(**p)
    return out


class _NoSync(_fs.FileOps):
    """Set-up only: write the replay benchmark's journal without waiting for the disk 5,000 times."""

    def fsync(self, fd: int) -> None:
        pass

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: object) -> None:  # type: ignore[override]
        pass


def make_journal(src: Path, dst: Path, key: bytes, records: int, rng: random.Random) -> None:
    """Copy the state in *src* to *dst* and append *records* journal records (one set_position each) to it."""
    shutil.copytree(src, dst)
    with _fs.use(_NoSync()):
        m = PositionStateManager(StateConfig.in_dir(dst, durability="sync"), key=key)
        ps = list(m.load_positions().values())
        for i in range(records):
            old = ps[rng.randrange(len(ps))]
            m.set_position(Position(**{**old.to_dict(), "mark_price": str(old.entry_price + i)}))  # type: ignore[arg-type]
        assert m._journal.records == records, "the journal was compacted while it was written"
        m.close()  # the records stay in the journal (close() does not compact)


MEMORY_CHILD = """
import gc, sys, tracemalloc
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import bench_core as bc
from posstate import PositionStateManager, StateConfig
import zstandard
mode, path, key = sys.argv[1], Path(sys.argv[2]), bytes.fromhex(sys.argv[3])
cfg = StateConfig.in_dir(path.parent, durability="snapshot")
warm = StateConfig.in_dir(Path(sys.argv[5]), durability="snapshot")  # the lazy imports of a load, before counting
with PositionStateManager(warm, key=key) as w:
    w.load_positions()
gc.collect()
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
if mode == "manager":
    held = PositionStateManager(cfg, key=key)
    one = next(iter(held.load_positions().values()))
    held.set_position(replace(one, mark_price=one.entry_price + 1))
    held.save()
    del one
else:
    held = bc.floor_load_positions(path, key, zstandard.ZstdDecompressor())
gc.collect()
print(tracemalloc.get_traced_memory()[0] - before)
"""


def memory_bytes(mode: str, path: Path, key: bytes, warm: Path) -> int:
    """Bytes a fresh interpreter holds (tracemalloc) for *mode*: "manager" or "plain" (see the docstring)."""
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, mode, str(path), key.hex(), here, str(warm)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout)


def profile(fn: Callable[[], object], rounds: int) -> None:
    """cProfile *rounds* calls of *fn* (after one call to warm up) and print the 30 costliest functions."""
    import cProfile
    import pstats

    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rounds):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def interleave(lib: Callable[[], object], floor: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    clock = time.perf_counter
    for _ in range(rounds):
        t = clock()
        lib()
        a.append(clock() - t)
        t = clock()
        floor()
        b.append(clock() - t)
    return a, b


DEPS_IMPORT = "from cryptography.hazmat.primitives.ciphers.aead import AESGCM; import zstandard, orjson"
IMPORTS = [
    ("import posstate", "import posstate"),
    ("from posstate import PositionStateManager", "from posstate import Position, PositionStateManager, StateConfig"),
]


def _import_ms(code: str, pycache: str) -> float:
    """Milliseconds one fresh interpreter spends running *code* (the interpreter's own start is not counted).

    Every module is imported from bytecode, as from an installed wheel (pip compiles it at install): the
    bytecode of the checkout and of the dependencies alike lives in *pycache*, written by a first run, so a
    checkout without ``__pycache__`` (or ``PYTHONDONTWRITEBYTECODE`` set) does not time the compiler."""
    probe = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONPYCACHEPREFIX": pycache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout) * 1000


def import_table(rounds: int) -> None:
    """Print the import cost of posstate against its runtime dependencies (medians of fresh interpreters)."""
    deps: list[float] = []
    ours: dict[str, list[float]] = {name: [] for name, _ in IMPORTS}
    with tempfile.TemporaryDirectory(prefix="posstate-pycache-") as pycache:
        for code in (DEPS_IMPORT, *(c for _, c in IMPORTS)):
            _import_ms(code, pycache)  # writes the bytecode; not timed
        for _ in range(rounds):
            deps.append(_import_ms(DEPS_IMPORT, pycache))
            for name, code in IMPORTS:
                ours[name].append(_import_ms(code, pycache))
    floor = statistics.median(deps)
    print(
        f"{'import (fresh interpreter, median of ' + str(rounds) + ')':<46} {'ms':>9} {'deps ms':>9} {'ratio':>6} {'target':>7}"
    )
    print(f"{'cryptography AESGCM + zstandard + orjson':<46} {floor:>9.1f}")
    for name, samples in ours.items():
        med = statistics.median(samples)
        target = "<=2.0"  # both: a bot's real first import is the manager
        verdict = "ok" if med / floor <= 2.0 else "MISSED"
        print(f"{name:<46} {med:>9.1f} {floor:>9.1f} {med / floor:>6.2f} {target:>7} {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="directory for the state files (default: a temp dir)")
    ap.add_argument("--save-rounds", type=int, default=300)
    ap.add_argument("--load-rounds", type=int, default=40)
    ap.add_argument("--big-rounds", type=int, default=7, help="rounds of the 100,000-position loads")
    ap.add_argument("--big", type=int, default=100_000, help="positions in the large load, replay and memory rows")
    ap.add_argument("--journal-records", type=int, default=5_000)
    ap.add_argument(
        "--profile", choices=["save", "load", "load-big", "replay"], default=None, help="cProfile one side instead of the table"
    )
    ap.add_argument("--import-rounds", type=int, default=21, help="fresh interpreters per import measurement")
    ap.add_argument("--imports-only", action="store_true", help="print only the import cost")
    args = ap.parse_args()
    if args.imports_only:
        import_table(args.import_rounds)
        return
    base = Path(tempfile.mkdtemp(prefix="posstate-bench-", dir=args.dir))
    rng = random.Random(20240601)
    key = generate_key()
    try:
        # ---------------------------------------------------------------- (a) save of 1,000 positions
        # The snapshot save path (what every save and compaction runs); bench_journal.py measures the journal.
        cfg = StateConfig.in_dir(base / "save", durability="snapshot")
        m = PositionStateManager(cfg, key=key)
        ps = populate(m, 1000, rng)
        m.save()
        doc = _document.build_document(m._state)
        floor_path = base / "floor-save.json"
        cctx = zstandard.ZstdCompressor(level=3)
        counter = [0]

        def lib_save() -> None:
            counter[0] += 1
            old = ps[counter[0] % len(ps)]
            m.set_position(dataclasses.replace(old, mark_price=old.mark_price + counter[0]))  # type: ignore[operator]
            m.save()

        def bare_save() -> None:
            floor_save(doc, key, floor_path, cctx)

        # ---------------------------------------------------------------- (b) load of 10,000 positions
        cfg_l = StateConfig.in_dir(base / "load", durability="snapshot")
        with PositionStateManager(cfg_l, key=key) as w:
            populate(w, 10_000, rng)
            w.save()
        lm = PositionStateManager(cfg_l, key=key)
        dctx = zstandard.ZstdDecompressor()

        def lib_load() -> None:
            assert len(lm.load_positions()) == 10_000

        def bare_load() -> None:
            floor_load(cfg_l.state_path, key, dctx)

        if args.profile in ("save", "load"):
            profile(*((lib_save, args.save_rounds) if args.profile == "save" else (lib_load, args.load_rounds)))
            return
        # Measured before the 100,000-position states exist: a bot holding 1,000 positions has no other
        # state in its process (a save builds every entry, and allocating them is slower in a larger heap).
        for _ in range(10):  # warm up caches, imports, the page cache
            lib_save()
            bare_save()
        lib_load()
        bare_load()
        save_lib, save_floor = interleave(lib_save, bare_save, args.save_rounds)
        load_lib, load_floor = interleave(lib_load, bare_load, args.load_rounds)
        m.close()
        lm.close()

        # ------------------------------------------- (c) load of 100,000 positions, (d) with a journal to replay
        big = args.big
        cfg_b = StateConfig.in_dir(base / "big", durability="sync")
        with PositionStateManager(StateConfig.in_dir(base / "big", durability="snapshot"), key=key) as w:
            populate(w, big, rng)
            w.save()
        make_journal(base / "big", base / "replay", key, args.journal_records, rng)
        cfg_r = StateConfig.in_dir(base / "replay", durability="sync")
        bm = PositionStateManager(cfg_b, key=key)
        rm = PositionStateManager(cfg_r, key=key)

        def lib_load_big() -> None:
            assert len(bm.load_positions()) == big

        def lib_replay() -> None:
            assert len(rm.load_positions()) == big
            assert rm._journal.replayed is not None

        def bare_load_big() -> None:
            assert len(floor_load_positions(cfg_b.state_path, key, dctx)) == big

        if args.profile:
            profile(*((lib_load_big, args.big_rounds) if args.profile == "load-big" else (lib_replay, args.big_rounds)))
            return
        lib_load_big()
        lib_replay()
        bare_load_big()
        big_lib: list[float] = []
        replay_lib: list[float] = []
        big_floor: list[float] = []
        clock = time.perf_counter
        for _ in range(args.big_rounds):
            for fn, out in ((lib_load_big, big_lib), (lib_replay, replay_lib), (bare_load_big, big_floor)):
                t = clock()
                fn()
                out.append(clock() - t)
        bm.close()
        rm.close()

        # ---------------------------------------------------------------- (e) memory of 100,000 positions
        mem_dir = base / "memory"
        with PositionStateManager(StateConfig.in_dir(mem_dir, durability="snapshot"), key=key) as w:
            w.batch_save_positions(make_position(rng, i, "long" if i % 3 else "short") for i in range(big))
        mem_manager = memory_bytes("manager", mem_dir / "positions.json", key, base / "load")
        mem_plain = memory_bytes("plain", mem_dir / "positions.json", key, base / "load")
        size_save = cfg.state_path.stat().st_size
        size_load = cfg_l.state_path.stat().st_size
        size_big = cfg_b.state_path.stat().st_size
        size_journal = sum(f.stat().st_size for f in (base / "replay").iterdir() if f.name.startswith("positions.json.journal"))

        rows = [
            (f"save 1,000 positions, 1 changed ({size_save / 1024:.0f} KiB)", save_lib, save_floor, 2.0),
            (f"load+validate 10,000 positions ({size_load / 1024:.0f} KiB)", load_lib, load_floor, 3.0),
            (f"load+validate {big:,} positions ({size_big / 1024 / 1024:.1f} MiB)", big_lib, big_floor, 2.0),
        ]
        load_avg = os.getloadavg()[0]
        print(f"posstate benchmark (python {sys.version.split()[0]}, {os.cpu_count()} cpus, load avg {load_avg:.2f}, dir {base})")
        print(f"{'operation':<46} {'posstate med/p99 ms':>20} {'floor med/p99 ms':>18} {'ratio':>6} {'target':>7}")
        for name, lib, flo, target in rows:
            lm_, lp = stats(lib)
            fm, fp = stats(flo)
            ratio = lm_ / fm
            verdict = "ok" if ratio <= target else "MISSED"
            print(f"{name:<46} {lm_:>9.2f} / {lp:>7.2f} {fm:>8.2f} / {fp:>7.2f} {ratio:>6.2f} {'<=' + str(target):>5} {verdict}")
        print()
        with_journal, without = statistics.median(replay_lib) * 1000, statistics.median(big_lib) * 1000
        added = (with_journal / without - 1) * 100
        verdict = "ok" if added <= 30 else "MISSED"
        print(f"{'journal replay':<46} {'with ms':>9} {'without ms':>11} {'added':>7} {'target':>7}")
        name = f"load {big:,} + {args.journal_records:,}-record journal ({size_journal / 1024:.0f} KiB)"
        print(f"{name:<46} {with_journal:>9.1f} {without:>11.1f} {added:>6.1f}% {'<=30%':>7} {verdict}")
        print()
        ratio = mem_manager / mem_plain
        verdict = "ok" if ratio <= 1.3 else "MISSED"
        head = f"{'memory (tracemalloc, fresh interpreters)':<46} {'posstate MiB':>13} {'plain dict MiB':>15}"
        print(f"{head} {'ratio':>6} {'target':>7}")
        name = f"{big:,} positions held (after a load and a save)"
        print(f"{name:<46} {mem_manager / 2**20:>13.1f} {mem_plain / 2**20:>15.1f} {ratio:>6.2f} {'<=1.3':>7} {verdict}")
        print()
        import_table(args.import_rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
