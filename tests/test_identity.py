"""Content identity (issue 18, points 1 and 3), tried as an attacker and as an honest user would.

A checkpoint is what safelora reads from it: a digest (BLAKE3 of dtype, shape and bytes) per tensor
a run used. So the same weights pass ``check --base --aligned`` from a copy, after a ``touch``,
through a hard link, from a Hugging Face cache snapshot and from the Hub; a changed targeted byte
does not (exit 3); ``check`` never takes digests from the shared projection cache; a cached rerun
still reads no checkpoint byte; and nothing safelora publishes names a path of this machine.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import snapshot_download
from support.fakehub import FakeHub
from typer.testing import Result

from safelora_cli.io.stfile import read_header
from safelora_cli.sources import open_local
from safelora_cli.stores.backups import BackupStore
from safelora_cli.stores.cache import ProjectionCache
from safelora_cli.stores.cache_entries import RULE
from safelora_cli.stores.digests import DigestMemo

Cli = Callable[..., Result]
Pair = tuple[Path, Path]
TARGET = "model.layers.0.self_attn.q_proj.weight"  # a weight the llama adapter's q_proj targets


def project(cli: Cli, adapter: Path, base: Path | str, aligned: Path | str, *args: object) -> dict[str, Any]:
    r = cli("project", "--adapter", adapter, "--base", base, "--aligned", aligned, "--json", *args)
    assert r.exit_code == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def check(cli: Cli, adapter: Path, base: Path | str, aligned: Path | str) -> tuple[int, dict[str, Any]]:
    r = cli("check", adapter, "--base", base, "--aligned", aligned, "--json")
    assert r.exit_code in (0, 3), r.stderr
    return r.exit_code, json.loads(r.stdout)


def metadata(adapter: Path) -> dict[str, str]:
    return read_header(adapter / "adapter_model.safetensors").metadata


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def hard_links(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def touched(src: Path, dst: Path) -> Path:
    out = copy(src, dst)
    for f in out.iterdir():
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))  # another mtime; the copy has its own inodes and ctime
    return out


def flip(model_dir: Path, tensor: str, offset: int = 0) -> None:
    """Change one byte of ``tensor``'s data in place (a copy: never the session's checkpoints)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / index["weight_map"][tensor]
    entry = read_header(shard).tensors[tensor]
    with open(shard, "r+b") as f:
        f.seek(entry.start + offset)
        byte = f.read(1)
        f.seek(entry.start + offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture
def sanitized(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> Path:
    """``adapter_dir`` projected in place against the session's pair, by absolute paths."""
    project(cli, adapter_dir, llama_pair[0].absolute(), llama_pair[1].absolute())
    return adapter_dir


@pytest.fixture
def hub(
    llama_pair: Pair, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """A fake Hub serving the session's pair as org/base and org/aligned."""
    root = tmp_path_factory.mktemp("hub")
    for repo, files in (("base", llama_pair[0]), ("aligned", llama_pair[1])):
        (root / "org" / repo).mkdir(parents=True)
        (root / "org" / repo / "main").symlink_to(files)
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with FakeHub(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


# --- the honest user: the same weights, wherever they are ------------------------------------------


@pytest.mark.parametrize("make", [copy, touched, hard_links], ids=["copytree", "touch", "hard-link"])
def test_the_same_weights_elsewhere_are_the_same_pair(
    cli: Cli, sanitized: Path, llama_pair: Pair, tmp_path: Path, make: Callable[[Path, Path], Path]
) -> None:
    base, aligned = make(llama_pair[0], tmp_path / "b"), make(llama_pair[1], tmp_path / "a")
    code, doc = check(cli, sanitized, base, aligned)
    assert (code, doc["status"]) == (0, "sanitized"), doc["message"]


def test_a_hugging_face_cache_snapshot_and_the_hub_repo_are_the_same_pair(
    cli: Cli, sanitized: Path, hub: FakeHub, tmp_path: Path
) -> None:
    # The Hub repo itself (ranged reads over HTTP).
    code, doc = check(cli, sanitized, "org/base", "org/aligned")
    assert (code, doc["status"]) == (0, "sanitized"), doc["message"]
    # A snapshot directory of the HF cache layout (links into blobs/), given as a local path.
    cache = tmp_path / "hf"
    snaps = [
        Path(snapshot_download(f"org/{r}", cache_dir=cache, endpoint=hub.url, token=False)) for r in ("base", "aligned")
    ]
    assert any(p.is_symlink() for p in snaps[0].iterdir())
    code, doc = check(cli, sanitized, snaps[0], snaps[1])
    assert (code, doc["status"]) == (0, "sanitized"), doc["message"]


def test_an_adapter_projected_from_the_hub_records_the_local_content(
    cli: Cli, hub: FakeHub, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    local = project(cli, llama_adapter, *llama_pair, "--output", tmp_path / "local")
    remote = project(cli, llama_adapter, "org/base", "org/aligned", "--output", tmp_path / "remote")
    ours, theirs = metadata(tmp_path / "local"), metadata(tmp_path / "remote")
    for role in ("base", "aligned"):
        assert ours[f"safelora.{role}_tensors"] == theirs[f"safelora.{role}_tensors"]
        assert local[role]["content"] == remote[role]["content"]
    sha = hub.sha("org/base", "main")
    assert theirs["safelora.base"] == f"org/base@{sha}"  # a Hub source keeps repo@sha
    code, doc = check(cli, tmp_path / "remote", *llama_pair)  # projected from the Hub, checked locally
    assert code == 0, doc["message"]


def test_a_rerun_on_a_copy_of_the_pair_is_a_no_op(cli: Cli, sanitized: Path, llama_pair: Pair, tmp_path: Path) -> None:
    before = (sanitized / "adapter_model.safetensors").read_bytes()
    again = project(cli, sanitized, copy(llama_pair[0], tmp_path / "b"), copy(llama_pair[1], tmp_path / "a"))
    assert any("nothing to do" in note for note in again["notes"])
    assert (sanitized / "adapter_model.safetensors").read_bytes() == before


# --- the attacker: another weight under the same name ------------------------------------------------


@pytest.mark.parametrize("role", ["base", "aligned"])
def test_a_changed_targeted_weight_is_another_pair(
    cli: Cli, sanitized: Path, llama_pair: Pair, tmp_path: Path, role: str
) -> None:
    base, aligned = copy(llama_pair[0], tmp_path / "b"), copy(llama_pair[1], tmp_path / "a")
    flip(base if role == "base" else aligned, TARGET, offset=4 * 7 + 1)
    code, doc = check(cli, sanitized, base, aligned)
    assert (code, doc["status"]) == (3, "other_pair")
    # An untargeted weight is not part of the identity: changing one keeps the pair.
    base2, aligned2 = copy(llama_pair[0], tmp_path / "b2"), copy(llama_pair[1], tmp_path / "a2")
    flip(base2, "model.layers.0.mlp.down_proj.weight")
    assert check(cli, sanitized, base2, aligned2)[0] == 0


def test_a_tampered_checkpoint_is_caught_even_when_the_projection_cache_vouches_for_it(
    cli: Cli, sanitized: Path, llama_pair: Pair, tmp_path: Path
) -> None:
    """check trusts no shared cache: a forged digest memo in the projection cache changes nothing."""
    base, aligned = copy(llama_pair[0], tmp_path / "b"), copy(llama_pair[1], tmp_path / "a")
    flip(base, TARGET)
    recorded = json.loads(metadata(sanitized)["safelora.base_tensors"])
    with closing(open_local(base)) as src:
        DigestMemo(ProjectionCache().root, RULE, None).save(
            src.cache_identity(), recorded
        )  # the lie, in the shared cache
    assert check(cli, sanitized, base, aligned)[0] == 3
    # ... while check's own memo is private: in the backup store, mode 0600 in a 0700 directory.
    memo = BackupStore().root / "digests"
    assert memo.is_dir() and oct(memo.stat().st_mode & 0o777) == oct(0o700)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in memo.iterdir())


def test_a_stamp_listing_tensors_the_checkpoint_lacks_is_another_pair(
    cli: Cli, sanitized: Path, llama_pair: Pair
) -> None:
    """The recorded map is compared both ways: names must exist, digests must match; a malformed or
    empty map proves nothing."""
    from safelora_cli.run.audit import same_pair

    prov = metadata(sanitized)
    with closing(open_local(llama_pair[0])) as base, closing(open_local(llama_pair[1])) as aligned:
        assert same_pair(prov, base, aligned)
        assert not same_pair(prov, aligned, base)  # swapped
        for bad in ('{"model.nope.weight": "' + "0" * 64 + '"}', "{}", "not json", '{"x": 1}'):
            assert not same_pair({**prov, "safelora.base_tensors": bad}, base, aligned)


def test_a_copy_of_one_checkpoint_as_both_is_refused(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    r = cli(
        "project",
        "--adapter",
        llama_adapter,
        "--base",
        llama_pair[0],
        "--aligned",
        copy(llama_pair[0], tmp_path / "c"),
        "--output",
        tmp_path / "out",
    )
    assert r.exit_code == 1 and "same checkpoint" in r.stderr
    assert not (tmp_path / "out").exists()


# --- cost: a cached rerun reads nothing --------------------------------------------------------------


def test_a_cached_rerun_reads_no_checkpoint_byte_and_records_the_same_identity(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, tmp_path: Path
) -> None:
    first = project(cli, llama_adapter, *llama_pair, "--output", tmp_path / "one")
    again = project(cli, llama_adapter, *llama_pair, "--output", tmp_path / "two")
    assert first["bytes_read"] > 0 and again["bytes_read"] == 0
    assert again["cache"]["served"] == again["layer_count"]
    assert metadata(tmp_path / "one") == metadata(tmp_path / "two")
    # A memo lost (or corrupt) is recomputed: the weights are read again, the identity is the same.
    for f in (ProjectionCache().root / "digests").iterdir():
        f.write_text("{not json")
    third = project(cli, llama_adapter, *llama_pair, "--output", tmp_path / "three")
    assert third["bytes_read"] > 0 and third["cache"]["served"] == third["layer_count"]
    assert metadata(tmp_path / "three") == metadata(tmp_path / "one")


# --- nothing of this machine is published ------------------------------------------------------------


def test_nothing_written_names_a_local_path(
    cli: Cli, llama_pair: Pair, llama_adapter: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    base, aligned = llama_pair[0].absolute(), llama_pair[1].absolute()
    doc = project(cli, adapter_dir.absolute(), base, aligned, "--model-card", "--summary", summary)
    assert doc["written"]
    prefixes = {str(tmp_path), str(base.parent), str(aligned.parent), "/tmp/"}
    pristine = {f.name: f.read_bytes() for f in llama_adapter.iterdir()}
    written = [f for f in adapter_dir.iterdir() if pristine.get(f.name) != f.read_bytes()]
    assert {f.name for f in written} == {"adapter_model.safetensors", "README.md"}
    written.append(summary)
    for f in written:
        text = f.read_bytes().decode("utf-8", "replace")
        before = pristine.get(f.name, b"").decode("utf-8", "replace").splitlines()
        added = "\n".join(line for line in text.splitlines() if line not in before)  # the user's own lines aside
        assert not [p for p in prefixes if p in added], f.name
    # A note naming a path (the aligned model taken from adapter_config.json) is published by name too.
    summary.unlink()
    r = cli(
        "project", "--adapter", adapter_dir.absolute(), "--base", base, "--dry-run", "--force", "--summary", summary
    )
    assert r.exit_code == 0, r.stderr
    text = summary.read_text()
    assert "base_model_name_or_path: aligned" in text and not [p for p in prefixes if p in text]
    meta = metadata(adapter_dir)
    assert meta["safelora.base"].startswith("base@blake3:") and meta["safelora.aligned"].startswith("aligned@blake3:")
    # The JSON report names paths as they were given: relative ones stay relative.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_pair[0], "b")
    shutil.copytree(llama_pair[1], "a")
    rel = project(cli, Path("adapter"), "b", "a", "--dry-run", "--force")
    assert (rel["adapter"], rel["base"]["source"], rel["aligned"]["source"]) == ("adapter", "b", "a")
