"""Benchmark the Hub path: the 7B-shaped pair served by the fake Hub (tests/support/fakehub.py), in one run.

The fake Hub is throttled the way a CDN looks from a fast client: every connection carries at most
``--rate`` MB/s, every request is answered ``--latency`` ms late, and every resolve URL of a weight
file redirects to a second ("storage") server, as the Hub redirects to its CDN. The server records
how many requests it served at once, at most, and when the first request came and the last body
byte left.

Measures
- a first run (cold projection cache, empty Hugging Face cache) with ``--connections N`` and with 1
  connection, best of ``--repeats`` each: the transfer phase (first request to last byte, as the
  server sees it) against the floor ``targeted bytes / (connections × rate)``, the command's wall
  time, its peak RSS, the bytes transferred against the targeted tensors, and the peak concurrency;
- a plain client against the same server: N threads, one connection each, fetching the same
  byte ranges and nothing else, to show how close to the floor the server lets anyone come;
- the cached rerun (same pair, same adapter): tensor bytes transferred and wall time against the
  first run.

Each run is ``safelora project --dry-run --json`` in a subprocess, as a user would run it, with
HF_ENDPOINT pointing at the fake Hub, which serves the data directory's ``base`` and ``aligned``
from this process. The data is the pair that benchmarks/bench.py builds (``make bench`` runs that
first); any directory with ``base/``, ``aligned/`` and ``adapter/`` works:

    python benchmarks/bench_hub.py [DATA_DIR] [--connections 8] [--rate 40] [--latency 20] [--repeats 3]

``--rate 0`` serves as fast as the machine can (no floor then).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.fakehub import FakeHub, targeted  # noqa: E402 - lives in tests/, shared with the test suite

from safelora_cli.io.stfile import read_header  # noqa: E402

DEFAULT_DATA = ROOT / "bench-data" / "llama2-7b-synth-32l"
TARGET_TRANSFER, TARGET_RERUN, TARGET_FLOOR, TARGET_RSS = 1.05, 0.5, 1.3, 1.5e9
PIECE = 32 << 20  # the plain client's request size, as safelora's


@dataclass
class Run:
    """One ``safelora project`` subprocess, as the server and the OS saw it."""

    wall: float  # seconds, the whole command
    transfer: float  # seconds from the first request to the last body byte
    rss: int  # peak resident set, bytes
    sent: int  # body bytes of .safetensors files
    peak: int  # requests served at once, at most
    report: dict[str, Any]


def run(argv: list[str], env: dict[str, str], hub: FakeHub) -> Run:
    """Run one command to the end; its stdout is the JSON report."""
    hub.reset()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"bench_hub: safelora failed ({proc.returncode}):\n{err.read().decode(errors='replace')[-2000:]}")
        out.seek(0)
        report: dict[str, Any] = json.loads(out.read())
    first, last = hub.first_request, hub.last_byte
    transfer = last - first if first is not None and last is not None else 0.0
    return Run(wall, transfer, usage.ru_maxrss * 1024, hub.sent_bytes(".safetensors"), hub.peak, report)


def ranges(data: Path, modules: list[str]) -> list[tuple[str, str, int, int]]:
    """(repo, file, start, end) of every targeted tensor, base and aligned, in pieces of at most PIECE."""
    out = []
    for repo in ("base", "aligned"):
        weight_map = json.loads((data / repo / "model.safetensors.index.json").read_text())["weight_map"]
        for m in modules:
            shard = weight_map[f"{m}.weight"]
            entry = read_header(data / repo / shard).tensors[f"{m}.weight"]
            out += [(repo, shard, a, min(a + PIECE, entry.end)) for a in range(entry.start, entry.end, PIECE)]
    return out


def plain_client(hub: FakeHub, sha: dict[str, str], pieces: list[tuple[str, str, int, int]], threads: int) -> float:
    """N threads, one kept-alive connection each, fetching ``pieces``; the transfer phase in seconds."""
    signed: dict[tuple[str, str], str] = {}
    for repo, shard, _, _ in pieces:
        if (repo, shard) not in signed:
            url = urlsplit(f"{hub.url}/org/{repo}/resolve/{sha[repo]}/{shard}")
            conn = http.client.HTTPConnection(url.netloc)
            conn.request("HEAD", url.path)
            signed[repo, shard] = conn.getresponse().getheader("Location") or ""
            conn.close()
    work: queue.Queue[tuple[str, str, int, int]] = queue.Queue()
    for p in pieces:
        work.put(p)
    buf = bytearray(1 << 20)
    hub.reset()

    def fetch() -> None:
        conn = None
        while True:
            try:
                repo, shard, start, end = work.get_nowait()
            except queue.Empty:
                return
            url = urlsplit(signed[repo, shard])
            if conn is None:
                conn = http.client.HTTPConnection(url.netloc)
            conn.request("GET", f"{url.path}?{url.query}", headers={"Range": f"bytes={start}-{end - 1}"})
            resp = conn.getresponse()
            view = memoryview(buf)
            while resp.readinto(view):
                pass

    workers = [threading.Thread(target=fetch) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (hub.last_byte or 0.0) - (hub.first_request or 0.0)


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=DEFAULT_DATA, help="directory with base/, aligned/, adapter/"
    )
    parser.add_argument("--connections", type=int, default=8, help="safelora's --connections (default: 8)")
    parser.add_argument("--rate", type=float, default=40.0, help="MB/s per connection (0: unthrottled)")
    parser.add_argument("--latency", type=float, default=20.0, help="ms before each answer")
    parser.add_argument("--repeats", type=int, default=3, help="first runs per connection count (best of)")
    args = parser.parse_args()
    data: Path = args.data.resolve()
    if not all((data / d).is_dir() for d in ("base", "aligned", "adapter")):
        sys.exit(f"bench_hub: {data} needs base/, aligned/ and adapter/ (run benchmarks/bench.py to build them)")
    rate = args.rate * 1e6 or None
    n = args.connections

    with tempfile.TemporaryDirectory(prefix="safelora-bench-hub-") as tmp_name:
        tmp = Path(tmp_name)
        for repo in ("base", "aligned"):
            (tmp / "hub" / "org" / repo).mkdir(parents=True)
            (tmp / "hub" / "org" / repo / "main").symlink_to(data / repo)
        with FakeHub(tmp / "hub", cdn=True, rate=rate, latency=args.latency / 1000) as hub:

            def env(caches: Path) -> dict[str, str]:
                out = {
                    **os.environ,
                    "HF_ENDPOINT": hub.url,
                    "SAFELORA_CACHE": str(caches / "safelora"),
                    "HF_HOME": str(caches / "hf"),
                    "HF_HUB_CACHE": str(caches / "hf" / "hub"),
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                }
                out.pop("HF_HUB_OFFLINE", None)
                return out

            argv = [sys.executable, "-m", "safelora_cli", "project", "--base", "org/base", "--aligned", "org/aligned",
                    "--adapter", str(data / "adapter"), "--dry-run", "--json"]  # fmt: skip
            firsts: dict[int, list[Run]] = {}
            for connections in (n, 1):
                firsts[connections] = []
                for i in range(args.repeats):
                    caches = tmp / f"caches-{connections}-{i}"
                    firsts[connections].append(run([*argv, "--connections", str(connections)], env(caches), hub))
            rerun = run([*argv, "--connections", str(n)], env(tmp / f"caches-{n}-0"), hub)
            modules = [layer["module"] for layer in firsts[n][0].report["layers"]]
            sha = {repo: hub.sha(f"org/{repo}", "main") for repo in ("base", "aligned")}
            plain = plain_client(hub, sha, ranges(data, modules), n)

    reference = firsts[n][0].report["layers"]
    for r in [*firsts[n], *firsts[1], rerun]:
        if [(x["module"], x["similarity"]) for x in r.report["layers"]] != [
            (x["module"], x["similarity"]) for x in reference
        ]:
            sys.exit("bench_hub: the runs' results differ")
    (b_data, b_head), (a_data, a_head) = targeted(data / "base", modules), targeted(data / "aligned", modules)
    tensor_bytes, header_bytes = b_data + a_data, b_head + a_head
    checkpoint_bytes = sum(p.stat().st_size for d in ("base", "aligned") for p in (data / d).glob("*.safetensors"))

    throttle = f"{args.rate:g} MB/s per connection" if rate else "unthrottled"
    print(f"pair: {data} ({len(modules)} modules, {os.cpu_count()} CPUs)")
    print(
        f"server: {throttle}, {args.latency:g} ms per request, resolve redirects to a storage server; "
        f"best of {args.repeats} first runs (cold caches)"
    )
    print(f"checkpoints (base + aligned):   {gb(checkpoint_bytes)}")
    print(f"targeted tensors:               {gb(tensor_bytes)}  (+ {header_bytes:,} header bytes)")

    def floor(connections: int) -> float | None:
        return tensor_bytes / (connections * rate) if rate else None

    floor_n = floor(n)
    plain_ratio = f" = {plain / floor_n:.2f}× the floor" if floor_n else ""
    print(f"plain {n}-thread client:         transfer {plain:.2f} s{plain_ratio}")
    print(
        f"{'':24}{'transfer':>10}{'floor':>8}{'ratio':>7}{'wall':>8}{'peak RSS':>10}{'peak conc.':>11}"
        f"{'transferred':>13}"
    )
    for connections, runs in firsts.items():
        best = min(runs, key=lambda r: r.transfer)
        fl = floor(connections)
        ratio = best.transfer / fl if fl else None
        sent = max(r.sent for r in runs)
        line = (
            f"{f'safelora, {connections} conn.':24}{best.transfer:>9.2f}s"
            f"{f'{fl:.2f}s' if fl else '-':>8}{f'{ratio:.2f}×' if ratio else '-':>7}"
            f"{min(r.wall for r in runs):>7.2f}s{max(r.rss for r in runs) / 1e9:>8.2f}GB"
            f"{max(r.peak for r in runs):>11}{sent / tensor_bytes:>12.4f}×"
        )
        checks = []
        if ratio is not None:
            checks.append(f"transfer ≤ {TARGET_FLOOR}× floor: {verdict(ratio <= TARGET_FLOOR)}")
        checks.append(f"bytes ≤ {TARGET_TRANSFER}×: {verdict(sent <= TARGET_TRANSFER * tensor_bytes)}")
        peaks = {r.peak for r in runs}
        checks.append(f"peak = {connections}: {verdict(peaks == {connections})}")
        if connections == n:
            checks.append(f"RSS ≤ 1.5 GB: {verdict(max(r.rss for r in runs) <= TARGET_RSS)}")
        print(f"{line}   {'; '.join(checks)}")
    first_wall = min(r.wall for r in firsts[n])
    print(
        f"cached rerun:                   {rerun.sent:,} bytes of .safetensors; wall {rerun.wall:.2f} s vs "
        f"{first_wall:.2f} s = {rerun.wall / first_wall:.3f}× the first run   ≤ {TARGET_RERUN}: "
        f"{verdict(rerun.wall / first_wall <= TARGET_RERUN)}"
    )


if __name__ == "__main__":
    main()
