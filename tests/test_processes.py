"""Real processes: SIGKILL at random moments never costs the adapter, and concurrent runs never tear it.

The processes are ``safelora project`` runs forked by ``forkserver.py`` (torch imported once, not once
per process). ``SAFELORA_TEST_WRITE_DELAY`` stretches each step of the atomic write (temp file
created, each tensor written, before the rename) so that kills and races land inside the write too.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.forkserver import ForkServer, Run
from typer.testing import CliRunner

from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.cli import app
from safelora_cli.io.atomic import TMP_MARK


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


KILLS = 50
PARALLEL = 10  # kills per round: the runs are short and mostly wait, so they overlap well on 2 cores
STEP_DELAY = "0.005"


@pytest.fixture(scope="module")
def forkserver() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def project(adapter: Path, pair: tuple[Path, Path], logs: Path, *extra: str) -> Run:
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["project", "--adapter", str(adapter), "--base", str(pair[0]), "--aligned", str(pair[1])]
    return Run([*argv, "--json", "--quiet", *extra], logs / "stdout", logs / "stderr")


def temps(adapter: Path) -> list[Path]:
    return sorted(adapter.glob(f"*{TMP_MARK}*"))


# --- crash safety ------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_leaves_the_original_or_the_result(
    forkserver: ForkServer, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    """Killed at any moment, a run that keeps the original leaves the original adapter, or the
    projected one whose original restore gives back (sha256 for sha256): never a projection that
    cannot be undone."""
    original = (llama_adapter / ADAPTER_FILE).read_bytes()
    store = Path(os.environ["SAFELORA_BACKUPS"])
    adapters = [Path(shutil.copytree(llama_adapter, tmp_path / f"adapter{k}")) for k in range(PARALLEL)]
    slow = {"SAFELORA_TEST_WRITE_DELAY": STEP_DELAY}

    # Unkilled, in parallel as the killed rounds run: the result to expect and how long a run takes.
    runs = [project(a, llama_pair, tmp_path / "logs" / a.name) for a in adapters]
    calibration = forkserver.run(runs, slow)
    assert calibration.status == [0] * PARALLEL, runs[0].err.read_text()
    projected = (adapters[0] / ADAPTER_FILE).read_bytes()
    assert projected != original
    assert all((a / ADAPTER_FILE).read_bytes() == projected for a in adapters)
    span = max(calibration.seconds)

    rng = random.Random(20240607)
    seen = {"original": 0, "projected": 0, "temp file left": 0}
    started = time.monotonic()
    for _ in range(KILLS // PARALLEL):
        for a in adapters:
            (a / ADAPTER_FILE).write_bytes(original)  # each round starts from the original; temps stay
        for kept in store.glob("*.safetensors"):  # and keeps the original itself, or dies trying
            kept.unlink()
        for r in runs:
            r.kill_at = rng.uniform(0, span)
        forkserver.run(runs, slow)
        for a in adapters:
            now = (a / ADAPTER_FILE).read_bytes()
            assert now in (original, projected), "the adapter is neither the original nor the projected result"
            seen["original" if now == original else "projected"] += 1
            if now == projected:
                restored = CliRunner().invoke(app, ["restore", "--adapter", str(a)])
                assert restored.exit_code == 0, restored.output
                assert sha256((a / ADAPTER_FILE).read_bytes()) == sha256(original)
            left = temps(a)
            # the next run removes a killed run's temp file before it writes its own: they never pile up
            assert len(left) <= 1, left
            seen["temp file left"] += len(left)
    killed_for = time.monotonic() - started

    # Every kill moment class happened: before the rename (original), after it, and mid-write.
    assert all(seen.values()), seen
    # One more run on each adapter cleans up after the last kills and completes the job.
    for a, r in zip(adapters, runs, strict=True):
        (a / ADAPTER_FILE).write_bytes(original)
        r.kill_at = None
    assert forkserver.run(runs).status == [0] * PARALLEL
    for a in adapters:
        assert (a / ADAPTER_FILE).read_bytes() == projected
        assert temps(a) == []
    print(f"\n{KILLS} SIGKILLs in {killed_for:.1f} s (one run: {span:.2f} s): {seen}")


# --- concurrency -------------------------------------------------------------------------------------------


def variants(llama_adapter: Path, root: Path, n: int) -> list[Path]:
    """``n`` different adapters: the fixture's LoRA weights, each set perturbed by its own seed."""
    out = []
    for k in range(n):
        adapter = Path(shutil.copytree(llama_adapter, root / f"adapter{k}"))
        tensors = load_file(adapter / ADAPTER_FILE)
        g = torch.Generator().manual_seed(k)
        save_file(
            {name: t + torch.randn(t.shape, generator=g) * 0.05 for name, t in tensors.items()},
            adapter / ADAPTER_FILE,
            metadata={"format": "pt"},
        )
        out.append(adapter)
    return out


def test_eight_processes_on_eight_adapters_match_a_sequential_run(
    forkserver: ForkServer, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    # The reference runs bypass the projection cache, so the eight runs below start on a cold one
    # (cached or not, the bytes written are the same).
    sequential = variants(llama_adapter, tmp_path / "sequential", 8)
    for k, adapter in enumerate(sequential):
        reference = project(adapter, llama_pair, tmp_path / "logs" / f"s{k}", "--no-cache")
        assert forkserver.run([reference]).status == [0]
    shutil.rmtree(os.environ["SAFELORA_BACKUPS"])  # the same originals: let the eight runs keep them
    together = variants(llama_adapter, tmp_path / "together", 8)
    originals = [(adapter / ADAPTER_FILE).read_bytes() for adapter in together]
    runs = [project(adapter, llama_pair, tmp_path / "logs" / f"t{k}") for k, adapter in enumerate(together)]

    outcome = forkserver.run(runs)

    # Each run kept its own original, whole, named by its own sha256.
    for original, run in zip(originals, runs, strict=True):
        backup = Path(os.environ["SAFELORA_BACKUPS"]) / f"{sha256(original)}.safetensors"
        assert backup.read_bytes() == original and run.report()["backup"]["sha256"] == sha256(original)

    assert outcome.status == [0] * 8, [r.err.read_text() for r in runs]
    assert all(r.report()["written"] for r in runs)
    # Cold: every module was computed by one of the eight runs, once, and served to the others.
    assert sum(r.report()["cache"]["computed"] for r in runs) == len(runs[0].report()["layers"])
    results = [(a / ADAPTER_FILE).read_bytes() for a in together]
    assert results == [(a / ADAPTER_FILE).read_bytes() for a in sequential]
    assert len(set(results)) == 8


@pytest.mark.parametrize("second", [[], ["--num-layers", "3"]], ids=["same settings", "other settings"])
def test_two_processes_on_one_adapter_take_turns(
    forkserver: ForkServer,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    second: list[str],
) -> None:
    # What each settings alone would write, in two fresh copies.
    expected = []
    for k, extra in enumerate([[], second]):
        alone = Path(shutil.copytree(llama_adapter, tmp_path / f"alone{k}"))
        assert forkserver.run([project(alone, llama_pair, tmp_path / "logs" / f"alone{k}", *extra)]).status == [0]
        expected.append((alone / ADAPTER_FILE).read_bytes())
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))
    runs = [project(adapter, llama_pair, tmp_path / "logs" / f"run{k}", *extra) for k, extra in enumerate([[], second])]

    # A slow write keeps the first run inside its rewrite while the second one starts.
    original = (adapter / ADAPTER_FILE).read_bytes()
    outcome = forkserver.run(runs, {"SAFELORA_TEST_WRITE_DELAY": "0.02"})

    def started_again(k: int) -> bool:
        return outcome.status[k] == 0 and any("started from the original" in n for n in runs[k].report()["notes"])

    if second:
        # other settings: the first run kept the original, so the second one waited, then projected
        # that original again with its own settings, as if the first had never run
        assert any(started_again(k) for k in (0, 1)), [(r.err.read_text(), r.out.read_text()[-1500:]) for r in runs]
        (later,) = [k for k in (0, 1) if started_again(k)]
        assert outcome.status == [0, 0] and all(r.report()["written"] for r in runs)
        assert (adapter / ADAPTER_FILE).read_bytes() == expected[later]
    else:  # the same pair and settings: one run writes, the other finds the work done
        winners = [k for k, r in enumerate(runs) if outcome.status[k] == 0 and r.report()["written"]]
        assert len(winners) == 1, [r.err.read_text() for r in runs]
        (winner,) = winners
        assert (adapter / ADAPTER_FILE).read_bytes() == expected[winner]
        assert outcome.status[1 - winner] == 0
        assert "nothing to do" in " ".join(runs[1 - winner].report()["notes"])
    assert temps(adapter) == []
    # one backup of the original at most, and it is the original, byte for byte
    kept = sorted(Path(os.environ["SAFELORA_BACKUPS"]).glob("*.safetensors"))
    assert [p.read_bytes() for p in kept] == [original] * len(kept) and len(kept) <= 1
