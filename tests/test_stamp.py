"""The stamp, attacked: someone who can write every byte of an adapter's files tries to make `check`
pass, `project` skip the work, or `restore` hand over another adapter's original.

What holds (issue 18, points 2, 4, 5, 6): the stamp digest covers every tensor, every `safelora.*`
entry and the config; an intact stamp passes `check` only when something verifies it (safelora's
local record on this machine, recomputation from the original, or `--trust-stamp` by choice); a
backup serves only the results it produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import Result

from safelora_cli.adapters import opened
from safelora_cli.adapters.digest import DIGEST_KEY, file_digest, v1_digest

Cli = Callable[..., Result]
Pair = tuple[Path, Path]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def project(cli: Cli, pair: Pair, adapter: Path, *args: object, code: int = 0) -> Result:
    result = cli("project", "--base", pair[0], "--aligned", pair[1], "--adapter", adapter, "--json", *args)
    assert result.exit_code == code, result.output
    return result


def check(cli: Cli, adapter: Path, *args: object) -> tuple[int, dict[str, Any]]:
    result = cli("check", adapter, "--json", *args)
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def one_error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def metadata(adapter: Path) -> dict[str, str]:
    with safe_open(str(adapter / WEIGHTS), "pt") as f:
        return dict(f.metadata() or {})


def rewrite(adapter: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor] | None = None) -> None:
    save_file(load_file(adapter / WEIGHTS) if tensors is None else tensors, adapter / WEIGHTS, metadata=meta)


def forge(adapter: Path, stamp: dict[str, str]) -> None:
    """Paste ``stamp`` onto ``adapter`` with the digest recomputed, as anyone can (the algorithm is public)."""
    rewrite(adapter, {**{k: v for k, v in metadata(adapter).items() if not k.startswith("safelora.")}, **stamp})
    with opened(adapter) as a:
        digest = file_digest(a)
    rewrite(adapter, {**metadata(adapter), DIGEST_KEY: digest})


def snapshot(adapter: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(adapter.iterdir()) if p.is_file()}


def pair_args(pair: Pair) -> list[object]:
    return ["--base", pair[0], "--aligned", pair[1]]


@pytest.fixture
def sanitized(cli: Cli, llama_pair: Pair, adapter_dir: Path) -> Path:
    project(cli, llama_pair, adapter_dir)
    return adapter_dir


@pytest.fixture
def other(llama_adapter: Path, tmp_path: Path) -> Path:
    """Another never-projected adapter: the pristine one with its lora_A and lora_B changed."""
    where = Path(shutil.copytree(llama_adapter, tmp_path / "other"))
    tensors = load_file(where / WEIGHTS)
    for key in tensors:
        tensors[key] = tensors[key] * (3.0 if "lora_B" in key else -1.0)
    save_file(tensors, where / WEIGHTS, metadata=metadata(where))
    return where


# --- the honest path holds ------------------------------------------------------------------------------


def test_check_right_after_a_local_run_passes_by_the_local_record(cli: Cli, sanitized: Path, llama_pair: Pair) -> None:
    meta = metadata(sanitized)
    assert meta["safelora.stamp_version"] == "2"
    layers = json.loads(meta["safelora.layers"])
    assert {"module", "similarity", "projected"} <= set(layers[0])
    code, doc = check(cli, sanitized)
    assert (code, doc["status"], doc["verified_by"]) == (0, "sanitized", "local-record")
    code, doc = check(cli, sanitized, *pair_args(llama_pair))
    assert (code, doc["verified_by"]) == (0, "local-record")


def test_a_verified_rerun_is_a_no_op_that_reports_the_recorded_layers(
    cli: Cli, sanitized: Path, llama_pair: Pair
) -> None:
    before = snapshot(sanitized)
    doc = json.loads(project(cli, llama_pair, sanitized).stdout)
    assert doc["written"] is False and doc["layer_count"] == 8
    assert snapshot(sanitized) == before


# --- 1: the pasted stamp ----------------------------------------------------------------------------------


def test_a_pasted_stamp_with_a_v1_style_digest_reads_modified(cli: Cli, sanitized: Path, other: Path) -> None:
    stamp = {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")}
    rewrite(other, {**metadata(other), **stamp})
    with opened(other) as a:
        stamp[DIGEST_KEY] = v1_digest(a)  # the plain sha256 anyone could compute before
    rewrite(other, {**metadata(other), **stamp})
    code, doc = check(cli, other)
    assert (code, doc["status"]) == (3, "modified")


def test_a_pasted_stamp_with_a_recomputed_digest_is_unverified(
    cli: Cli, sanitized: Path, other: Path, llama_pair: Pair, llama_adapter: Path
) -> None:
    forge(other, {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")})
    for args in ([], pair_args(llama_pair)):
        code, doc = check(cli, other, *args)
        assert (code, doc["status"], doc["ok"]) == (3, "unverified", False), doc
    # and project does not take its word for it: one line, exit 1, nothing written
    before = snapshot(other)
    line = one_error(project(cli, llama_pair, other, code=1))
    assert str(other / WEIGHTS) in line and "--original" in line and "restore" in line
    assert snapshot(other) == before
    # with the original of the adapter that was sanitized, recomputation does not reproduce this one
    code, doc = check(cli, other, *pair_args(llama_pair), "--original", llama_adapter)
    assert (code, doc["status"]) == (3, "unverified")


def test_force_projects_what_is_there_on_an_unverified_stamp(
    cli: Cli, sanitized: Path, other: Path, llama_pair: Pair
) -> None:
    stamp = {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.") and k != "safelora.original"}
    forge(other, stamp)
    doc = json.loads(project(cli, llama_pair, other, "--force").stdout)
    assert doc["written"] is True and any("on top of the earlier projection" in n for n in doc["notes"])
    # naming another adapter's backup, even --force does not start from it (see below)
    forge(other, {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")})
    one_error(project(cli, llama_pair, other, "--force", code=1))


def test_trust_stamp_keeps_the_old_meaning(cli: Cli, sanitized: Path, other: Path) -> None:
    forge(other, {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")})
    code, doc = check(cli, other, "--trust-stamp")
    assert (code, doc["status"], doc["verified_by"]) == (0, "sanitized", "trust-stamp")
    help_text = cli("check", "--help").stdout
    assert "--trust-stamp" in help_text and "accident" in help_text


# --- 2: everything the stamp covers ----------------------------------------------------------------------


def test_each_safelora_entry_edited_reads_modified(cli: Cli, sanitized: Path, tmp_path: Path) -> None:
    meta = metadata(sanitized)
    keys = [k for k in meta if k.startswith("safelora.") and k != DIGEST_KEY]
    assert {"safelora.base", "safelora.aligned", "safelora.layers", "safelora.threshold"} <= set(keys)
    for key in keys:
        copy = Path(shutil.copytree(sanitized, tmp_path / f"edit-{key}"))
        rewrite(copy, {**meta, key: meta[key] + " "})
        code, doc = check(cli, copy)
        assert (code, doc["status"]) == (3, "modified"), key
    copy = Path(shutil.copytree(sanitized, tmp_path / "added"))
    rewrite(copy, {**meta, "safelora.extra": "1"})
    assert check(cli, copy)[1]["status"] == "modified"


@pytest.mark.parametrize(
    "edit",
    [
        {"lora_alpha": 1600},
        {"use_rslora": True},
        {"alpha_pattern": {"q_proj": 64}},
        {"base_model_name_or_path": "someone/else"},
        {"an_unknown_key": 1},
        {"r": 8, "bias": "all"},
    ],
    ids=["lora_alpha", "use_rslora", "alpha_pattern", "base_model", "unknown", "bias"],
)
def test_each_config_field_edited_reads_modified(cli: Cli, sanitized: Path, edit: dict[str, object]) -> None:
    config = json.loads((sanitized / CONFIG).read_text())
    if "lora_alpha" in edit:
        edit = {"lora_alpha": config["lora_alpha"] * 100}
    (sanitized / CONFIG).write_text(json.dumps(config | edit))
    code, doc = check(cli, sanitized)
    assert (code, doc["status"]) == (3, "modified")


def test_inert_config_fields_and_spelled_defaults_keep_the_stamp(cli: Cli, sanitized: Path) -> None:
    config = json.loads((sanitized / CONFIG).read_text())
    config = {k: v for k, v in config.items() if k not in ("use_dora",)}  # a default left out
    config |= {"inference_mode": not config.get("inference_mode", True), "lora_dropout": 0.3, "revision": "x"}
    (sanitized / CONFIG).write_text(json.dumps(config, indent=4))
    code, doc = check(cli, sanitized)
    assert (code, doc["status"]) == (0, "sanitized"), doc


def test_two_keys_normalizing_to_one_name_are_refused(cli: Cli, adapter_dir: Path, llama_pair: Pair) -> None:
    tensors = load_file(adapter_dir / WEIGHTS)
    tensors["base_model.model.extra.weight"] = torch.ones(2)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    before = snapshot(adapter_dir)
    line = one_error(project(cli, llama_pair, adapter_dir, code=1))
    assert "extra.weight" in line and "one tensor" in line
    assert snapshot(adapter_dir) == before


def test_a_peft_style_widening_keeps_the_stamp(cli: Cli, adapter_dir: Path, llama_pair: Pair) -> None:
    half = {k: v.half() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(half, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    project(cli, llama_pair, adapter_dir)
    wide = {k: v.float() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(wide, adapter_dir / WEIGHTS, metadata=metadata(adapter_dir))
    code, doc = check(cli, adapter_dir)
    assert (code, doc["status"], doc["verified_by"]) == (0, "sanitized", "local-record")


# --- 4: records, and verification by recomputation ---------------------------------------------------------


def test_a_record_forged_in_the_shared_projection_cache_is_ignored(cli: Cli, sanitized: Path, other: Path) -> None:
    forge(other, {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")})
    digest = metadata(other)[DIGEST_KEY]
    cache = Path(os.environ["SAFELORA_CACHE"])
    for where in [cache, *[p for p in cache.rglob("*") if p.is_dir()]]:
        where.mkdir(parents=True, exist_ok=True)
        (where / f"written-{digest}.json").write_text(json.dumps({"digest": digest}))
    code, doc = check(cli, other)
    assert (code, doc["status"]) == (3, "unverified")


def test_an_adapter_written_elsewhere_is_unverified_without_and_sanitized_with_the_original(
    cli: Cli, llama_adapter: Path, adapter_dir: Path, llama_pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(cli, llama_pair, adapter_dir)
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "another-machine"))
    code, doc = check(cli, adapter_dir)
    assert (code, doc["status"]) == (3, "unverified")
    assert "original" in doc["message"]
    code, doc = check(cli, adapter_dir, *pair_args(llama_pair), "--original", llama_adapter)
    assert (code, doc["status"], doc["verified_by"]) == (0, "sanitized", "recomputation"), doc
    # nothing was recorded by the recomputation
    assert (
        not list((tmp_path / "another-machine").glob("written-*")) if (tmp_path / "another-machine").exists() else True
    )


def test_the_original_of_another_adapter_does_not_verify(
    cli: Cli, other: Path, adapter_dir: Path, llama_pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(cli, llama_pair, adapter_dir)
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "elsewhere"))
    code, doc = check(cli, adapter_dir, *pair_args(llama_pair), "--original", other)
    assert (code, doc["status"]) == (3, "unverified")


def test_original_needs_the_pair(cli: Cli, sanitized: Path, llama_adapter: Path) -> None:
    assert cli("check", sanitized, "--original", llama_adapter).exit_code == 2


def test_clearing_the_backups_removes_the_records(cli: Cli, sanitized: Path) -> None:
    assert check(cli, sanitized)[0] == 0
    assert cli("cache", "clear", "--backups", "--yes").exit_code == 0
    code, doc = check(cli, sanitized)
    assert (code, doc["status"]) == (3, "unverified")


def test_a_version_1_stamp_passes_only_when_trusted(cli: Cli, sanitized: Path) -> None:
    meta = {k: v for k, v in metadata(sanitized).items() if k not in ("safelora.stamp_version", "safelora.layers")}
    rewrite(sanitized, meta)
    with opened(sanitized) as a:
        meta[DIGEST_KEY] = v1_digest(a)
    rewrite(sanitized, meta)
    code, doc = check(cli, sanitized)
    assert (code, doc["status"]) == (3, "unverified")
    code, doc = check(cli, sanitized, "--trust-stamp")
    assert (code, doc["verified_by"]) == (0, "trust-stamp")
    assert "config not covered" in doc["notes"]


# --- 6: a backup belongs to what it produced ---------------------------------------------------------------


def test_a_stamp_naming_another_adapters_backup_gets_nothing(
    cli: Cli, sanitized: Path, other: Path, llama_pair: Pair
) -> None:
    forge(other, {k: v for k, v in metadata(sanitized).items() if k.startswith("safelora.")})
    before = snapshot(other)
    for args in ([], ["--force"]):
        line = one_error(cli("restore", other, *args))
        assert str(other / WEIGHTS) in line
        assert snapshot(other) == before
    # nor does re-projecting from it with other settings
    one_error(project(cli, llama_pair, other, "--threshold", "0.1", code=1))
    assert snapshot(other) == before


def test_restore_and_reprojection_still_work_for_what_safelora_wrote(
    cli: Cli, llama_adapter: Path, sanitized: Path, llama_pair: Pair
) -> None:
    project(cli, llama_pair, sanitized, "--threshold", "0.1")
    code, doc = check(cli, sanitized)
    assert code == 0, doc
    assert cli("restore", sanitized).exit_code == 0
    assert (
        hashlib.sha256((sanitized / WEIGHTS).read_bytes()).digest()
        == hashlib.sha256((llama_adapter / WEIGHTS).read_bytes()).digest()
    )


def test_force_restores_an_edited_adapter_whose_lora_a_is_the_backups(
    cli: Cli, llama_adapter: Path, sanitized: Path
) -> None:
    tensors = load_file(sanitized / WEIGHTS)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] += 1.0
    rewrite(sanitized, metadata(sanitized), tensors)
    one_error(cli("restore", sanitized))
    assert cli("restore", sanitized, "--force").exit_code == 0
    assert (sanitized / WEIGHTS).read_bytes() == (llama_adapter / WEIGHTS).read_bytes()


def test_the_unverified_line_names_the_ways_to_verify(
    cli: Cli, sanitized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "elsewhere"))
    result = cli("check", sanitized)
    assert result.exit_code == 3
    [line] = result.stdout.strip().splitlines()
    assert line.startswith("unverified") and "--original" in line and "--trust-stamp" in line


def test_recomputation_verifies_a_half_precision_adapter(
    cli: Cli, adapter_dir: Path, llama_pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    half = {k: v.half() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(half, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    original = Path(shutil.copytree(adapter_dir, tmp_path / "original"))
    project(cli, llama_pair, adapter_dir, "--threshold", "0.3")
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "elsewhere"))
    code, doc = check(cli, adapter_dir, *pair_args(llama_pair), "--original", original)
    assert (code, doc["verified_by"]) == (0, "recomputation"), doc


def test_a_projection_undone_under_a_forged_stamp_does_not_reproduce(
    cli: Cli, llama_adapter: Path, adapter_dir: Path, llama_pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One projected module's lora_B put back to the original's, the stamp's digest recomputed."""
    project(cli, llama_pair, adapter_dir)
    tensors = load_file(adapter_dir / WEIGHTS)
    pristine = load_file(llama_adapter / WEIGHTS)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = pristine[key]
    rewrite(adapter_dir, metadata(adapter_dir), tensors)
    forge(adapter_dir, {k: v for k, v in metadata(adapter_dir).items() if k.startswith("safelora.")})
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "elsewhere"))
    code, doc = check(cli, adapter_dir, *pair_args(llama_pair), "--original", llama_adapter)
    assert (code, doc["status"]) == (3, "unverified"), doc
    assert "projected" in doc["message"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_widening_is_exact_however_the_bytes_are_chunked(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """An element split across two reads (a sparse file's segments) widens as a whole one does."""
    from safelora_cli.adapters import digest as stamp
    from safelora_cli.io import stfile

    values = torch.randn(1001, generator=torch.Generator().manual_seed(1)).to(dtype)
    raw = stfile.tensor_bytes(values)
    name = stfile.DTYPE_NAMES[dtype]
    whole = b"".join(bytes(p) for p in stamp._float32_pieces(name, raw))
    monkeypatch.setattr(stamp.ranges, "pieces", lambda data: iter([data[:7], data[7:1001], data[1001:]]))
    split = b"".join(bytes(p) for p in stamp._float32_pieces(name, raw))
    assert whole == split == stfile.tensor_bytes(values.float())


def test_a_bfloat16_widening_keeps_the_stamp(cli: Cli, adapter_dir: Path, llama_pair: Pair) -> None:
    bf16 = {k: v.bfloat16() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(bf16, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    project(cli, llama_pair, adapter_dir)
    wide = {k: v.float() for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(wide, adapter_dir / WEIGHTS, metadata=metadata(adapter_dir))
    assert check(cli, adapter_dir)[1]["verified_by"] == "local-record"
    narrow = {k: v.half() for k, v in wide.items()}  # lossy: another adapter
    save_file(narrow, adapter_dir / WEIGHTS, metadata=metadata(adapter_dir))
    assert check(cli, adapter_dir)[1]["status"] == "modified"


def test_a_record_in_a_store_others_can_write_verifies_nothing(cli: Cli, sanitized: Path) -> None:
    root = Path(os.environ["SAFELORA_BACKUPS"])
    assert check(cli, sanitized)[0] == 0
    root.chmod(0o777)  # anyone could have planted the record
    try:
        code, doc = check(cli, sanitized)
        assert (code, doc["status"]) == (3, "unverified")
    finally:
        root.chmod(0o700)
