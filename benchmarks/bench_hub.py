"""Benchmark the Hub path: the 7B-shaped pair served by the fake Hub (tests/fakehub.py), in one run.

Measures
- bytes transferred on a first run (cold projection cache, empty Hugging Face cache) against the
  targeted tensors' bytes, their shards' headers, and the whole checkpoints;
- the cached rerun (same pair, same adapter) against the first run: wall time of the whole command
  and the pipeline's own time, and the bytes the rerun transfers.

Each run is ``safelora project --dry-run --json`` in a subprocess, as a user would run it, with
HF_ENDPOINT pointing at the fake Hub, which serves the data directory's ``base`` and ``aligned``
from this process and counts every byte it sends. The data is the pair that benchmarks/bench.py
builds (``make bench`` runs that first); any directory with ``base/``, ``aligned/`` and ``adapter/``
works:

    python benchmarks/bench_hub.py [DATA_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakehub import FakeHub, targeted  # noqa: E402 - lives in tests/, shared with the test suite

DEFAULT_DATA = ROOT / "bench-data" / "llama2-7b-synth-32l"
TARGET_TRANSFER, TARGET_RERUN = 1.05, 0.5


def run(argv: list[str], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall time and JSON report of one ``safelora project`` subprocess."""
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"bench_hub: safelora failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-2000:]}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return wall, report


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=DEFAULT_DATA, help="directory with base/, aligned/, adapter/"
    )
    args = parser.parse_args()
    data: Path = args.data.resolve()
    if not all((data / d).is_dir() for d in ("base", "aligned", "adapter")):
        sys.exit(f"bench_hub: {data} needs base/, aligned/ and adapter/ (run benchmarks/bench.py to build them)")

    with tempfile.TemporaryDirectory(prefix="safelora-bench-hub-") as tmp_name:
        tmp = Path(tmp_name)
        for repo in ("base", "aligned"):
            (tmp / "hub" / "org" / repo).mkdir(parents=True)
            (tmp / "hub" / "org" / repo / "main").symlink_to(data / repo)
        with FakeHub(tmp / "hub") as hub:
            env = {
                **os.environ,
                "HF_ENDPOINT": hub.url,
                "SAFELORA_CACHE": str(tmp / "safelora"),
                "HF_HOME": str(tmp / "hf"),
                "HF_HUB_CACHE": str(tmp / "hf" / "hub"),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            }
            env.pop("HF_HUB_OFFLINE", None)
            argv = [sys.executable, "-m", "safelora_cli", "project", "--base", "org/base", "--aligned", "org/aligned",
                    "--adapter", str(data / "adapter"), "--dry-run", "--json"]  # fmt: skip
            first_wall, first = run(argv, env)
            first_sent, first_all = hub.sent_bytes(".safetensors"), hub.sent_bytes()
            hub.reset()
            second_wall, second = run(argv, env)
            second_sent = hub.sent_bytes(".safetensors")
        cache_bytes = sum(p.stat().st_size for p in (tmp / "safelora").rglob("*") if p.is_file())

    modules = [layer["module"] for layer in first["layers"]]
    if [layer["module"] for layer in second["layers"]] != modules or [
        layer["similarity"] for layer in second["layers"]
    ] != [layer["similarity"] for layer in first["layers"]]:
        sys.exit("bench_hub: the cached rerun's results differ from the first run's")
    (b_data, b_head), (a_data, a_head) = targeted(data / "base", modules), targeted(data / "aligned", modules)
    tensor_bytes, header_bytes = b_data + a_data, b_head + a_head
    checkpoint_bytes = sum(p.stat().st_size for d in ("base", "aligned") for p in (data / d).glob("*.safetensors"))
    transfer_ratio = first_sent / tensor_bytes
    rerun_ratio = second_wall / first_wall

    print(f"pair: {data} ({len(modules)} modules, {os.cpu_count()} CPUs)")
    print(f"checkpoints (base + aligned):   {gb(checkpoint_bytes)}")
    print(f"targeted tensors:               {gb(tensor_bytes)}  (+ {header_bytes:,} header bytes)")
    print(
        f"first run transferred:          {gb(first_sent)} of .safetensors, {gb(first_all)} in all = "
        f"{transfer_ratio:.4f}× targeted, {first_sent / checkpoint_bytes:.2%} of the checkpoints   "
        f"≤ {TARGET_TRANSFER}× targeted: {verdict(transfer_ratio <= TARGET_TRANSFER)}"
    )
    print(f"cached rerun transferred:       {second_sent:,} bytes of .safetensors")
    print(f"projection cache on disk:       {gb(cache_bytes)}")
    print(f"{'':32}{'first':>10}{'rerun':>10}{'ratio':>8}")
    print(
        f"{'command wall time (s)':32}{first_wall:>10.2f}{second_wall:>10.2f}{rerun_ratio:>8.3f}   "
        f"≤ {TARGET_RERUN}: {verdict(rerun_ratio <= TARGET_RERUN)}"
    )
    print(
        f"{'pipeline time (s)':32}{first['seconds']:>10.2f}{second['seconds']:>10.2f}"
        f"{second['seconds'] / first['seconds']:>8.3f}"
    )


if __name__ == "__main__":
    main()
