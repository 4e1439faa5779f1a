"""Never lose the original: an in-place run keeps it first, restore puts it back, and projecting a
projected adapter again starts from it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.io import ranges
from safelora_cli.io.stfile import read_header
from safelora_cli.stores.backups import store_root

Cli = Callable[..., Result]
Pair = tuple[Path, Path]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store() -> Path:
    return Path(os.environ["SAFELORA_BACKUPS"])


def kept() -> list[Path]:
    return sorted(store().glob("*.safetensors"))


def project(cli: Cli, pair: Pair, adapter: Path, *args: object) -> dict[str, Any]:
    result = cli("project", "--base", pair[0], "--aligned", pair[1], "--adapter", adapter, "--json", *args)
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def one_error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def provenance(adapter: Path) -> dict[str, str]:
    return dict(read_header(adapter / ADAPTER_FILE).metadata)


# --- 1, 2: the backup is written first, privately, and named by provenance -------------------------------


def test_an_in_place_run_keeps_the_original_first(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    original = (adapter_dir / ADAPTER_FILE).read_bytes()
    doc = project(cli, llama_pair, adapter_dir)

    [backup] = kept()
    assert backup.read_bytes() == original
    assert backup.name == f"{hashlib.sha256(original).hexdigest()}.safetensors"
    assert provenance(adapter_dir)["safelora.original"] == backup.stem
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600 and stat.S_IMODE(store().stat().st_mode) == 0o700
    assert doc["backup"] == {"sha256": backup.stem, "bytes": len(original), "created": True}
    assert doc["backup"]["bytes"] <= (adapter_dir / ADAPTER_FILE).stat().st_size  # an r=8 q/v adapter
    record = json.loads(backup.with_suffix(".json").read_text())
    assert list(record["adapters"]) == [str(adapter_dir)]


def test_the_original_is_kept_before_the_adapter_is_replaced(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment the rename happens, the backup is on disk whole."""
    original = (adapter_dir / ADAPTER_FILE).read_bytes()
    real_rename = os.rename
    seen: list[bytes] = []

    def rename(src: Any, dst: Any, **kwargs: Any) -> None:
        if dst == ADAPTER_FILE:
            seen.extend(p.read_bytes() for p in kept())
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    project(cli, llama_pair, adapter_dir)
    assert seen == [original]


@pytest.mark.parametrize("failure", ["read-only store", "disk full", "store others can write"])
def test_no_backup_no_rewrite(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Unlike the projection cache, a backup that cannot be written stops the run: exit 1, adapter unchanged."""
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    if failure == "read-only store":
        real_open = os.open

        def denied(path: Any, flags: int, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> int:
            if flags & os.O_CREAT and dir_fd is not None and os.path.samefile(f"/proc/self/fd/{dir_fd}", store()):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

        store().mkdir(parents=True, mode=0o700)
        monkeypatch.setattr(os, "open", denied)
    elif failure == "disk full":

        def full(fd: int, data: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ranges, "write_all", full)
    else:
        store().mkdir(parents=True, mode=0o700)
        store().chmod(0o777)
    line = one_error(cli("project", "--base", llama_pair[0], "--aligned", llama_pair[1], "--adapter", adapter_dir))
    assert "--no-backup" in line and ("cannot keep the original" in line or "no backup can be kept" in line)
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before
    assert not any(p.name.startswith(".") and p.is_file() and "tmp" in p.name for p in adapter_dir.iterdir())


def test_where_the_backups_live(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "mine"))
    assert store_root() == tmp_path / "mine"
    monkeypatch.delenv("SAFELORA_BACKUPS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert store_root() == tmp_path / "xdg" / "safelora" / "originals"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store_root() == tmp_path / "home" / ".local" / "share" / "safelora" / "originals"


def test_backups_stay_out_of_the_adapter_and_the_cache_and_no_cache_keeps_them(
    cli: Cli, llama_pair: Pair, adapter_dir: Path
) -> None:
    files = sorted(p.name for p in adapter_dir.iterdir())
    project(cli, llama_pair, adapter_dir, "--no-cache")
    assert sorted(p.name for p in adapter_dir.iterdir()) == files
    assert len(kept()) == 1
    cache = Path(os.environ["SAFELORA_CACHE"])
    assert not cache.exists() or not list(cache.rglob(f"{kept()[0].name}"))


# --- 3: restore ---------------------------------------------------------------------------------------------


def test_restore_gives_back_the_original_byte_for_byte(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    before = sha256(adapter_dir / ADAPTER_FILE)
    project(cli, llama_pair, adapter_dir)
    assert sha256(adapter_dir / ADAPTER_FILE) != before

    restored = cli("restore", "--adapter", adapter_dir, "--json")
    assert restored.exit_code == 0, restored.stderr
    assert json.loads(restored.stdout) == {
        "adapter": str(adapter_dir),
        "restored": True,
        "status": "restored",
        "sha256": before,
        "bytes": (adapter_dir / ADAPTER_FILE).stat().st_size,
        "notes": [],
    }
    assert sha256(adapter_dir / ADAPTER_FILE) == before
    assert not any(k.startswith("safelora.") for k in provenance(adapter_dir))
    assert cli("check", "--adapter", adapter_dir).exit_code == 3  # never sanitized, as before

    # Again: the adapter already is its kept original. Nothing to do is no failure: exit 0, a note.
    mtime = (adapter_dir / ADAPTER_FILE).stat().st_mtime_ns
    again = cli("restore", "--adapter", adapter_dir, "--json")
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    assert (doc["restored"], doc["status"], doc["sha256"]) == (False, "unchanged", before)
    assert len(doc["notes"]) == 1 and "nothing to restore" in doc["notes"][0]
    assert (adapter_dir / ADAPTER_FILE).stat().st_mtime_ns == mtime  # not rewritten


def test_restore_without_a_backup_says_where_it_looked(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir, "--no-backup")
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    line = one_error(cli("restore", "--adapter", adapter_dir))
    assert str(store()) in line and "without a backup of its original" in line
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before

    never = one_error(cli("restore", "--adapter", adapter_dir.parent / "never"))
    assert "does not exist" in never


def test_restore_of_an_adapter_never_projected_and_never_kept_still_fails(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path
) -> None:
    # A copy with the same bytes as a kept original, but never kept from this directory: not "its" original.
    copy = Path(shutil.copytree(adapter_dir, tmp_path / "copy"))
    project(cli, llama_pair, adapter_dir)
    line = one_error(cli("restore", "--adapter", copy))
    assert "carries no safelora provenance" in line


def test_restore_after_the_backup_was_removed(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir)
    for p in store().iterdir():
        p.unlink()
    line = one_error(cli("restore", "--adapter", adapter_dir))
    assert "not in the backup store" in line and str(store()) in line


def test_restore_refuses_an_adapter_changed_since_unless_forced(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    before = sha256(adapter_dir / ADAPTER_FILE)
    project(cli, llama_pair, adapter_dir)
    data = bytearray((adapter_dir / ADAPTER_FILE).read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # a hand edit of the last tensor: 1.0
    (adapter_dir / ADAPTER_FILE).write_bytes(bytes(data))
    edited = bytes(data)

    assert "changed since" in one_error(cli("restore", "--adapter", adapter_dir))
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == edited
    assert cli("restore", "--adapter", adapter_dir, "--force").exit_code == 0
    assert sha256(adapter_dir / ADAPTER_FILE) == before


def test_restore_takes_several_adapters_and_globs(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    adapters = [Path(shutil.copytree(llama_adapter, tmp_path / "many" / name)) for name in ("a", "b")]
    before = [sha256(a / ADAPTER_FILE) for a in adapters]
    for a in adapters:
        project(cli, llama_pair, a)
    result = cli("restore", "--adapter", tmp_path / "many" / "*", "--json")
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["adapter"] for line in result.stdout.splitlines()] == [str(a) for a in adapters]
    assert [sha256(a / ADAPTER_FILE) for a in adapters] == before
    # Each already is its kept original: nothing left to restore, which is no failure.
    again = cli("restore", "--adapter", adapters[0], "--adapter", adapters[1], "--json")
    assert again.exit_code == 0, again.stderr
    assert [json.loads(line)["status"] for line in again.stdout.splitlines()] == ["unchanged"] * 2
    assert [sha256(a / ADAPTER_FILE) for a in adapters] == before


# --- 4: projecting again starts from the original -----------------------------------------------------------


@pytest.mark.parametrize(
    "other", [["--threshold", "0.3"], ["--num-layers", "2"], ["--precision", "float64"], ["--threshold", "1"]]
)
def test_projecting_again_equals_projecting_the_original(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path, other: list[str]
) -> None:
    twice = Path(shutil.copytree(llama_adapter, tmp_path / "twice"))
    once = Path(shutil.copytree(llama_adapter, tmp_path / "once"))
    project(cli, llama_pair, twice)
    doc = project(cli, llama_pair, twice, *other)
    project(cli, llama_pair, once, *other)

    assert doc["written"] and any("started from the original" in n for n in doc["notes"])
    assert (twice / ADAPTER_FILE).read_bytes() == (once / ADAPTER_FILE).read_bytes()
    assert len(kept()) == 1  # the same original, kept once


def test_projecting_again_against_another_pair_starts_from_the_original(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    swapped = (llama_pair[1], llama_pair[0])
    twice = Path(shutil.copytree(llama_adapter, tmp_path / "twice"))
    once = Path(shutil.copytree(llama_adapter, tmp_path / "once"))
    project(cli, llama_pair, twice)
    project(cli, swapped, twice)
    project(cli, swapped, once)
    assert (twice / ADAPTER_FILE).read_bytes() == (once / ADAPTER_FILE).read_bytes()


def test_projecting_again_refuses_to_throw_away_changes_unless_forced(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))
    once = Path(shutil.copytree(llama_adapter, tmp_path / "once"))
    project(cli, llama_pair, adapter)
    data = bytearray((adapter / ADAPTER_FILE).read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"
    (adapter / ADAPTER_FILE).write_bytes(bytes(data))

    args = ("project", "--base", llama_pair[0], "--aligned", llama_pair[1], "--adapter", adapter, "--num-layers", 2)
    assert "changed since" in one_error(cli(*args))
    assert (adapter / ADAPTER_FILE).read_bytes() == bytes(data)
    assert cli(*args, "--force").exit_code == 0
    project(cli, llama_pair, once, "--num-layers", 2)
    assert (adapter / ADAPTER_FILE).read_bytes() == (once / ADAPTER_FILE).read_bytes()


def test_force_with_the_same_settings_starts_from_the_original(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir)
    once = (adapter_dir / ADAPTER_FILE).read_bytes()
    doc = project(cli, llama_pair, adapter_dir, "--force")
    assert doc["written"] and (adapter_dir / ADAPTER_FILE).read_bytes() == once  # not projected twice


def test_a_dry_run_or_an_output_of_a_projected_adapter_use_its_original(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))
    fresh = project(cli, llama_pair, llama_adapter, "--dry-run", "--num-layers", 2)
    project(cli, llama_pair, adapter)
    dry = project(cli, llama_pair, adapter, "--dry-run", "--num-layers", 2)
    assert [layer["similarity"] for layer in dry["layers"]] == [layer["similarity"] for layer in fresh["layers"]]
    out = project(cli, llama_pair, adapter, "--output", tmp_path / "out", "--num-layers", 2)
    assert out["written"] and provenance(tmp_path / "out")["safelora.original"] == kept()[0].stem


# --- 5: when no backup is made ---------------------------------------------------------------------------


def test_no_backup_says_so_and_keeps_nothing(cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    doc = project(cli, llama_pair, adapter_dir, "--no-backup")
    assert any("no backup" in n and "restore cannot undo" in n for n in doc["notes"])
    assert doc["backup"] is None and kept() == []
    assert "safelora.original" not in provenance(adapter_dir)


def test_no_backup_is_a_config_key(cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "sanitize.yaml"
    config.write_text("no_backup: true\n")
    doc = project(cli, llama_pair, adapter_dir, "--config", config)
    assert doc["backup"] is None and kept() == []


def test_output_and_dry_run_keep_no_backup(cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path) -> None:
    project(cli, llama_pair, adapter_dir, "--dry-run")
    project(cli, llama_pair, adapter_dir, "--output", tmp_path / "out")
    assert kept() == []  # (the store holds the local record of the --output copy, no original)


# --- 6: managing backups -----------------------------------------------------------------------------------


def test_cache_ls_lists_the_backups_and_their_total(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    adapters = [Path(shutil.copytree(llama_adapter, tmp_path / name)) for name in ("a", "b")]
    for a in adapters:
        project(cli, llama_pair, a)
    listed = json.loads(cli("cache", "ls", "--json").stdout)
    [backup] = listed["backups"]  # the same original twice: one copy, two adapters
    assert [entry["adapter"] for entry in backup["adapters"]] == [str(a) for a in adapters]
    assert backup["bytes"] == (llama_adapter / ADAPTER_FILE).stat().st_size
    human = cli("cache", "ls")
    assert human.exit_code == 0 and "1 kept original(s)" in human.stdout and str(adapters[0]) in human.stdout


def test_inspect_says_whether_the_original_is_kept(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir)
    info = json.loads(cli("inspect", adapter_dir, "--json").stdout)
    assert info["backup"]["sha256"] == kept()[0].stem
    assert "original kept" in cli("inspect", adapter_dir).stdout
    for p in store().iterdir():
        p.unlink()
    assert json.loads(cli("inspect", adapter_dir, "--json").stdout)["backup"] is None


def test_plain_cache_commands_never_touch_backups(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir)
    pair = json.loads(cli("cache", "ls", "--json").stdout)["pairs"][0]["pair"]
    assert cli("cache", "rm", pair[:6]).exit_code == 0
    assert cli("cache", "clear").exit_code == 0
    assert len(kept()) == 1


def test_removing_backups_without_a_terminal_needs_yes(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> None:
    project(cli, llama_pair, adapter_dir)
    for args in (("rm", "--backups", adapter_dir), ("clear", "--backups")):
        refused = cli("cache", *args)
        assert refused.exit_code == 2 and "only copy" in refused.output and "--yes" in refused.output
        assert len(kept()) == 1
    assert cli("cache", "rm", "--backups", adapter_dir, "--yes").exit_code == 0
    assert kept() == []
    assert "no backup" in " ".join(one_error(cli("restore", "--adapter", adapter_dir)).split()).replace(
        "not in the backup store", "no backup"
    )


def test_removing_one_adapters_backup_keeps_one_others_share(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    a, b = (Path(shutil.copytree(llama_adapter, tmp_path / name)) for name in ("a", "b"))
    project(cli, llama_pair, a)
    project(cli, llama_pair, b)
    assert cli("cache", "rm", "--backups", a, "--yes").exit_code == 0
    assert len(kept()) == 1
    assert cli("restore", "--adapter", b).exit_code == 0


def test_clear_backups_older_than(cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path) -> None:
    old, new = (Path(shutil.copytree(llama_adapter, tmp_path / name)) for name in ("old", "new"))
    project(cli, llama_pair, old)
    record = kept()[0].with_suffix(".json")
    doc = json.loads(record.read_text())
    doc["adapters"][str(old)] -= 10 * 86400
    record.write_text(json.dumps(doc))
    (new / "adapter_config.json").write_text((new / "adapter_config.json").read_text().replace('"r": 8', '"r": 8 '))
    edited = (new / ADAPTER_FILE).read_bytes()[:-4] + b"\x00\x00\x80\x3f"  # another original
    (new / ADAPTER_FILE).write_bytes(edited)
    project(cli, llama_pair, new)
    assert len(kept()) == 2

    assert cli("cache", "clear", "--backups", "--older-than", 5, "--yes").exit_code == 0
    [left] = kept()
    assert left.stem == hashlib.sha256(edited).hexdigest()
    assert cli("cache", "clear", "--older-than", 5).exit_code == 2  # --older-than is for --backups


def _pty_run(args: list[str], answer: bytes, env: dict[str, str]) -> tuple[int, str]:
    """Run safelora with a terminal for stdin and stdout; answer its prompt; return exit code and output."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "safelora_cli", *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 30
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not answered and b"Delete?" in out:
                os.write(leader, answer)
                answered = True
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=30)
    os.close(leader)
    return code, out.decode(errors="replace")


@pytest.mark.parametrize("answer, removed", [(b"n\n", False), (b"y\n", True)])
def test_the_confirmation_prompt_on_a_terminal(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, answer: bytes, removed: bool
) -> None:
    project(cli, llama_pair, adapter_dir)
    code, out = _pty_run(["cache", "clear", "--backups"], answer, dict(os.environ))
    assert "only copy of an adapter's original" in " ".join(out.split())
    assert (code == 0) == removed
    assert (kept() == []) == removed
