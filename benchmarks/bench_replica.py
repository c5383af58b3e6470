"""Replication to S3 (issue 16): what it costs the bot, how far behind the replica runs, how many requests.

Against moto's S3 server in a process of its own (``python -m moto.server``, 127.0.0.1), over HTTP with the
same boto3 code as for AWS:

* latency  -- ``set_position`` at 1,000 positions, replication off and on (same directory layout, the default
  ``durability="sync"``), median and p99 in ms; the target of issue 16 is "on" within 5% of "off" at both;
* lag      -- for 100 and 1,000 updates per second (or as many as the disk allows), the replication lag
  (``replica_status()["seconds_behind"]``) sampled every 0.25 s: median and max;
* requests -- at the defaults (``replica_interval`` 10 s, ``replica_batch_bytes`` 1 MiB, no lease), the requests
  the shipper makes in RUN seconds at 1 and 100 updates per second, extrapolated to one hour (the lease, if on,
  adds 3 renewals per TTL: 360 per hour at the default 30 s).

Run: ``PYTHONPATH=. python benchmarks/bench_replica.py`` (``--quick``: shorter runs). Prints a table; never fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from posstate import Position, PositionStateManager, StateConfig, generate_key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def _bucket(endpoint: str, name: str) -> str:
    import boto3

    boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/bench"


def _pos(i: int, n: int) -> Position:
    return Position(symbol=f"S{i}/USDT", side="long", contracts=Decimal(n), entry_price=Decimal("100.5"))


def _seeded(cfg: StateConfig, key: bytes, positions: int) -> PositionStateManager:
    m = PositionStateManager(cfg, key=key)
    m.batch_save_positions([_pos(i, 1) for i in range(positions)])
    return m


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def latency(work: Path, key: bytes, url: str | None, endpoint: str, calls: int, positions: int) -> list[float]:
    extra: dict[str, Any] = {"replica_url": url, "replica_endpoint_url": endpoint} if url else {}
    m = _seeded(StateConfig.in_dir(work, **extra), key, positions)
    times: list[float] = []
    try:
        for k in range(calls):
            p = _pos(k % positions, 2 + k)
            t = time.perf_counter()
            m.set_position(p)
            times.append(time.perf_counter() - t)
    finally:
        m.close()
    return times


def run_at(work: Path, key: bytes, url: str, endpoint: str, rate: float, seconds: float, **cfg: Any) -> dict[str, Any]:
    """Updates at *rate* per second for *seconds*; the lag sampled every 0.25 s and the requests counted."""
    m = _seeded(StateConfig.in_dir(work, replica_url=url, replica_endpoint_url=endpoint, **cfg), key, 1000)
    assert m.flush_replica(60)
    shipper = m._replica.shipper  # type: ignore[union-attr]
    base = shipper.requests
    lags: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            status = m.replica_status()
            if status is not None:
                lags.append(float(status["seconds_behind"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    done = 0
    while (now := time.perf_counter() - start) < seconds:
        due = int(now * rate) + 1
        while done < due:
            m.set_position(_pos(done % 1000, 2 + done))
            done += 1
        time.sleep(max(0.0, (done / rate) - (time.perf_counter() - start)))
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    requests = shipper.requests - base
    m.close()
    return {
        "rate": done / elapsed,
        "lag_median": statistics.median(lags) if lags else 0.0,
        "lag_max": max(lags, default=0.0),
        "requests": requests,
        "per_hour": requests * 3600 / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    args = ap.parse_args(argv)
    calls = 2000 if args.quick else 10_000
    run_s = 25.0 if args.quick else 120.0
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, endpoint = _start_moto()
    key = generate_key()
    try:
        with tempfile.TemporaryDirectory(prefix="posstate-bench-replica-") as tmp:
            work = Path(tmp)
            print(f"posstate replication benchmark; python {sys.version.split()[0]}; moto server at {endpoint}")
            rows = []
            for rnd in range(2):  # alternate, so drift in the machine's load hits both
                off = latency(work / f"off{rnd}", key, None, endpoint, calls, 1000)
                on = latency(work / f"on{rnd}", key, _bucket(endpoint, f"lat-{rnd}"), endpoint, calls, 1000)
                rows.append((off, on))
            off_all = [t for off, _ in rows for t in off]
            on_all = [t for _, on in rows for t in on]
            print("\nset_position at 1,000 positions (ms)   median     p99")
            for name, xs in (("replication off", off_all), ("replication on (s3)", on_all)):
                print(f"  {name:<34} {statistics.median(xs) * 1000:7.3f} {_pct(xs, 0.99) * 1000:7.3f}")
            med = statistics.median(on_all) / statistics.median(off_all) - 1
            p99 = _pct(on_all, 0.99) / _pct(off_all, 0.99) - 1
            verdict = "met" if med <= 0.05 and p99 <= 0.05 else "MISSED"
            print(f"  overhead: median {med * 100:+.1f}%, p99 {p99 * 100:+.1f}% (target within 5%: {verdict})")
            print(f"\nlag and requests over {run_s:.0f} s per rate (defaults: interval 10 s, batch 1 MiB)")
            print("  updates/s (asked -> done)   lag median   lag max   requests   per hour")
            for rate in (1.0, 100.0, 1000.0):
                r = run_at(work / f"rate{rate:g}", key, _bucket(endpoint, f"rate-{int(rate)}"), endpoint, rate, run_s)
                print(
                    f"  {rate:6g} -> {r['rate']:8.1f}        {r['lag_median']:7.2f} s  {r['lag_max']:7.2f} s  "
                    f"{r['requests']:8d}   {r['per_hour']:8.0f}"
                )
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
