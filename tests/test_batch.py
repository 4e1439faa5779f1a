"""Batches as a release job runs them: each adapter's output in a directory of its own, one JSON line
per adapter whatever the count, each adapter's report its own, and honest reruns."""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from support import builders
from typer.testing import Result

import safelora_cli
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import SafeLoraError, UsageError

Cli = Callable[..., Result]


@pytest.fixture(scope="module")
def other_adapter(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real PEFT adapter on the aligned model, trained (randomly) with another seed."""
    return builders.make_adapter(llama_pair[1], tmp_path_factory.mktemp("other") / "adapter", seed=7)


def _pair(llama_pair: tuple[Path, Path]) -> list[str]:
    base, aligned = llama_pair
    return ["--base", str(base), "--aligned", str(aligned)]


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(src, dst))


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with its sha256: what a run may not change."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _lines(r: Result) -> list[dict[str, Any]]:
    """stdout as JSON Lines: every line one JSON object."""
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(isinstance(doc, dict) for doc in docs), r.stdout
    return docs


def _weights(adapter: Path) -> dict[str, bytes]:
    with safe_open(adapter / ADAPTER_FILE, "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


# --- 1. batches never collide --------------------------------------------------------------------


def test_a_batch_writes_each_adapter_to_a_directory_of_its_name(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    a1, a2 = _copy(llama_adapter, tmp_path / "in" / "a1"), _copy(other_adapter, tmp_path / "in" / "a2")
    before = _tree(tmp_path / "in")
    out = tmp_path / "out"

    r = cli("project", a1, a2, *_pair(llama_pair), "--output", out, "--json", "--threshold", 0.4)

    assert r.exit_code == 0, r.stderr
    assert [d["output"] for d in _lines(r)] == [str(out / "a1"), str(out / "a2")]
    assert sorted(p.name for p in out.iterdir()) == ["a1", "a2"]
    assert _tree(tmp_path / "in") == before  # the sources stay untouched
    # Each directory holds that adapter's own result: the one projecting it alone gives.
    for src in (a1, a2):
        alone = tmp_path / "alone" / src.name
        assert cli("project", src, *_pair(llama_pair), "--output", alone, "--threshold", 0.4).exit_code == 0
        assert _weights(out / src.name) == _weights(alone)
    assert _weights(out / "a1") != _weights(out / "a2")


def test_one_adapter_writes_the_output_directory_itself(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sanitized"
    r = cli("project", adapter_dir, *_pair(llama_pair), "--output", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert (out / ADAPTER_FILE).is_file()
    assert _lines(r)[0]["output"] == str(out)


def test_a_pattern_is_a_batch_whatever_it_matches(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    _copy(llama_adapter, tmp_path / "adapters" / "only")
    out = tmp_path / "out"
    r = cli("project", str(tmp_path / "adapters" / "*"), *_pair(llama_pair), "--output", out)
    assert r.exit_code == 0, r.stderr
    assert (out / "only" / ADAPTER_FILE).is_file()  # the layout a pattern matching two would give


@pytest.mark.parametrize("names", [("a", "a"), ("Adapter", "adapter")])
@pytest.mark.parametrize("extra", [[], ["--force"], ["--dry-run"], ["--dry-run", "--force"]])
def test_colliding_names_are_refused_up_front_naming_them(
    cli: Cli,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    names: tuple[str, str],
    extra: list[str],
) -> None:
    # Two adapters whose outputs would be one directory (case-folded: one directory on macOS or Windows).
    work = tmp_path / "work"
    first, second = _copy(llama_adapter, work / "x" / names[0]), _copy(llama_adapter, work / "y" / names[1])
    out = work / "out"
    before = _tree(work)

    r = cli("project", first, second, *_pair(llama_pair), "--output", out, *extra)

    assert r.exit_code == 2, r.stderr
    assert str(first) in r.stderr and str(second) in r.stderr
    assert _tree(work) == before and not out.exists()  # nothing written, not even the directory


def test_force_never_lets_one_adapter_overwrite_another(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    a1, a2 = _copy(llama_adapter, tmp_path / "a1"), _copy(other_adapter, tmp_path / "a2")
    out = tmp_path / "out"
    assert cli("project", a1, a2, *_pair(llama_pair), "--output", out).exit_code == 0
    first = {name: _weights(out / name) for name in ("a1", "a2")}

    # Again with --force: each output is replaced by its own adapter's result, never by the other's.
    r = cli("project", a1, a2, *_pair(llama_pair), "--output", out, "--force", "--json")
    assert r.exit_code == 0, r.stderr
    assert {name: _weights(out / name) for name in ("a1", "a2")} == first


@pytest.mark.parametrize("case", ["inside one adapter", "an adapter itself", "not empty"])
def test_a_dry_run_checks_what_the_run_checks_and_exits_as_it_would(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path, case: str
) -> None:
    work = tmp_path / "work"
    a1, a2 = _copy(llama_adapter, work / "a1"), _copy(other_adapter, work / "a2")
    out = {"inside one adapter": a1 / "out", "an adapter itself": work, "not empty": work / "out"}[case]
    if case == "not empty":
        (out / "a2").mkdir(parents=True)
        (out / "a2" / "keep.txt").write_text("someone's file")
    args = ["project", a1, a2, *_pair(llama_pair), "--output", out, "--json"]
    before = _tree(work)

    dry = cli(*args, "--dry-run")
    assert _tree(work) == before
    run = cli(*args)

    assert dry.exit_code == run.exit_code == 1, (dry.stderr, run.stderr)
    if case == "not empty":
        # That adapter's own failure, in the dry run as in the run; the other adapter goes on.
        for r in (dry, run):
            docs = _lines(r)
            assert "error" in docs[1] and "not empty" in docs[1]["error"]
            assert "error" not in docs[0]
        assert (out / "a2" / "keep.txt").read_text() == "someone's file"
        assert sorted(p.name for p in (out / "a2").iterdir()) == ["keep.txt"]
    else:
        assert _tree(work) == before  # refused before anything is written


# --- 2. one JSON shape for any count -----------------------------------------------------------------


def test_json_is_one_line_per_adapter_for_every_command(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    a1, a2 = _copy(llama_adapter, tmp_path / "a" / "a1"), _copy(other_adapter, tmp_path / "a" / "a2")
    pattern = str(tmp_path / "a" / "*")

    one = cli("project", a1, *_pair(llama_pair), "--json", "--dry-run")
    assert one.exit_code == 0, one.stderr
    assert isinstance(json.loads(one.stdout), dict)  # one adapter: still one JSON document
    assert len(one.stdout.splitlines()) == 1

    for command in (
        ["project", pattern, *_pair(llama_pair)],
        ["check", pattern],
        ["inspect", pattern],
        ["restore", pattern],
    ):
        r = cli(*command, "--json")
        assert r.exit_code == 0, (command, r.stderr)
        docs = _lines(r)
        assert [d["adapter"] for d in docs] == [str(a1), str(a2)], command
        # The same filter works on one adapter as on many.
        single = cli(*command[:1], a1, *command[2:], "--json")
        assert [d.keys() for d in _lines(single)] == [docs[0].keys()], command


def test_a_failed_batch_is_one_error_object_per_line(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    other = _copy(adapter_dir, tmp_path / "other")
    r = cli("project", adapter_dir, other, "--base", tmp_path / "nope", "--aligned", llama_pair[1], "--json")
    assert r.exit_code == 1
    assert [set(d) for d in _lines(r)] == [{"adapter", "error"}] * 2


def test_check_json_holds_provenance_lists_as_lists(cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path) -> None:
    assert cli("project", adapter_dir, *_pair(llama_pair), "--threshold", 0.4).exit_code == 0
    for command in ("check", "inspect"):
        r = cli(command, adapter_dir, "--json")
        assert r.exit_code == 0, r.stderr
        provenance = json.loads(r.stdout)["provenance"]
        projected, layers = provenance["safelora.projected"], provenance["safelora.layers"]
        assert isinstance(projected, list) and all(isinstance(m, str) for m in projected)
        assert isinstance(layers, list) and {layer["module"] for layer in layers if layer["projected"]} == set(
            projected
        )
        assert isinstance(provenance["safelora.base_tensors"], dict)
        assert isinstance(provenance["safelora.version"], str)  # scalars as written


def test_provenance_that_is_not_json_stays_a_string(adapter_dir: Path) -> None:
    # Whoever writes the file writes the metadata: nesting past the strict parser's depth, a
    # duplicate key, a broken list: each is shown as the string it is, never a crash.
    from safelora_cli.run.audit import structured

    hostile = {
        "safelora.layers": "[" * 100_000 + "]" * 100_000,
        "safelora.projected": '{"a": 1, "a": 2}',
        "safelora.base_tensors": "[1, 2",
        "safelora.aligned_tensors": "",
    }
    assert structured(hostile) == hostile


def test_the_api_returns_a_list_exactly_when_given_one(
    llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    base, aligned = map(str, llama_pair)
    a1, a2 = _copy(llama_adapter, tmp_path / "a" / "a1"), _copy(other_adapter, tmp_path / "a" / "a2")
    pattern = str(tmp_path / "a" / "*")

    assert isinstance(safelora_cli.project(a1, base=base, aligned=aligned, dry_run=True), safelora_cli.Report)
    [only] = safelora_cli.project([a1], base=base, aligned=aligned, dry_run=True)
    assert isinstance(only, safelora_cli.Report)
    assert len(safelora_cli.project([pattern], base=base, aligned=aligned, dry_run=True)) == 2
    with pytest.raises(UsageError, match="names 2 adapters"):
        safelora_cli.project(pattern, base=base, aligned=aligned, dry_run=True)

    safelora_cli.project([a1, a2], base=base, aligned=aligned)
    assert isinstance(safelora_cli.check(a1), safelora_cli.CheckResult)
    assert [r.adapter for r in safelora_cli.check([pattern])] == [a1, a2]  # type: ignore[union-attr]
    assert isinstance(safelora_cli.inspect(a2), safelora_cli.Inspection)
    assert len(safelora_cli.inspect([a1, a2])) == 2
    for call in (safelora_cli.check, safelora_cli.inspect, safelora_cli.restore):
        with pytest.raises(UsageError, match="names 2 adapters"):
            call(pattern)  # type: ignore[operator]
    [restored] = safelora_cli.restore([a1])
    assert isinstance(restored, safelora_cli.Restored)
    [missing] = safelora_cli.check([tmp_path / "missing"])
    assert isinstance(missing, SafeLoraError)


# --- 3. each adapter's report is its own -------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_adapter(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT adapter on modules the others leave alone (up_proj, down_proj)."""
    return builders.make_adapter(
        llama_pair[1], tmp_path_factory.mktemp("mlp") / "adapter", seed=3, target_modules=["up_proj", "down_proj"]
    )


def test_each_adapter_of_a_batch_reports_its_own_notes_bytes_and_seconds(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, mlp_adapter: Path, tmp_path: Path
) -> None:
    base, _ = llama_pair
    attn, mlp = _copy(llama_adapter, tmp_path / "attn"), _copy(mlp_adapter, tmp_path / "mlp")
    # Only this adapter names the base as the model it was trained on: only its report says "swapped".
    config = json.loads((mlp / "adapter_config.json").read_text())
    (mlp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    args = [*_pair(llama_pair), "--dry-run", "--json", "--no-cache"]

    alone = {p.name: _lines(cli("project", p, *args))[0] for p in (attn, mlp)}
    r = cli("project", attn, mlp, *args)

    assert r.exit_code == 0, r.stderr
    together = {Path(d["adapter"]).name: d for d in _lines(r)}
    assert [any("swapped" in n for n in together[name]["notes"]) for name in ("attn", "mlp")] == [False, True]
    for name in ("attn", "mlp"):
        # Its own modules' weights, as when projected alone; not the batch's.
        assert together[name]["bytes_read"] == alone[name]["bytes_read"] > 0
    # The batch's totals: in the summary line only, and the reports add up to them.
    total = together["attn"]["bytes_read"] + together["mlp"]["bytes_read"]
    [summary] = [line for line in r.stderr.splitlines() if "adapters done" in line]
    assert f"read {_size(total)}" in summary
    wall = float(summary.rsplit(";", 1)[1].split()[0])
    assert together["attn"]["seconds"] + together["mlp"]["seconds"] <= wall + 0.01


def test_a_module_shared_by_a_batch_is_read_once_and_counted_once(
    cli: Cli, llama_pair: tuple[Path, Path], llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    a1, a2 = _copy(llama_adapter, tmp_path / "a1"), _copy(other_adapter, tmp_path / "a2")
    args = [*_pair(llama_pair), "--dry-run", "--json", "--no-cache"]
    alone = _lines(cli("project", a1, *args))[0]["bytes_read"]
    docs = _lines(cli("project", a1, a2, *args))
    assert [d["bytes_read"] for d in docs] == [alone, 0]  # the first adapter that needed the weights read them


def _size(nbytes: int) -> str:
    from safelora_cli.cli.render import size

    return size(nbytes)


# --- 8. honest no-ops --------------------------------------------------------------------------------


def test_a_verified_rerun_reports_the_projection_that_is_there(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path
) -> None:
    args = ["project", adapter_dir, *_pair(llama_pair), "--num-layers", 3, "--json"]
    first = _lines(cli(*args))[0]
    weights = _weights(adapter_dir)

    r = cli(*args)

    assert r.exit_code == 0, r.stderr
    again = _lines(r)[0]
    assert (first["status"], again["status"]) == ("projected", "unchanged")
    assert again["written"] is False and _weights(adapter_dir) == weights
    assert 0 < again["projected_count"] == first["projected_count"] < again["layer_count"] == first["layer_count"]
    keys = ("module", "layer", "similarity", "projected", "norm_ratio")
    assert [{k: m[k] for k in keys} for m in again["layers"]] == [{k: m[k] for k in keys} for m in first["layers"]]
    assert again["median_norm_ratio"] == first["median_norm_ratio"] is not None
    assert f"{first['projected_count']} of {first['layer_count']} modules" in r.stderr


def test_output_on_a_verified_rerun_writes_the_complete_output(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    assert cli("project", adapter_dir, *_pair(llama_pair)).exit_code == 0
    out = tmp_path / "release"

    dry = cli("project", adapter_dir, *_pair(llama_pair), "--output", out, "--dry-run", "--json")
    assert dry.exit_code == 0 and not out.exists()
    r = cli("project", adapter_dir, *_pair(llama_pair), "--output", out, "--json")

    assert r.exit_code == 0, r.stderr
    doc = _lines(r)[0]
    assert (doc["status"], doc["written"], doc["output"]) == ("unchanged", True, str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in adapter_dir.iterdir())
    assert (out / ADAPTER_FILE).read_bytes() == (adapter_dir / ADAPTER_FILE).read_bytes()
    assert cli("check", out).exit_code == 0  # the output passes the gate as the adapter does


def test_a_rerun_on_a_stamp_without_the_per_module_record_says_so(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path
) -> None:
    # A stamp as safelora wrote it before it recorded each module: no safelora.layers, and the local
    # record of its digest (this machine's safelora wrote it).
    from safetensors.torch import save_file

    from safelora_cli.adapters import opened
    from safelora_cli.adapters.digest import DIGEST_KEY, file_digest
    from safelora_cli.stores.backups import BackupStore

    assert cli("project", adapter_dir, *_pair(llama_pair)).exit_code == 0
    with safe_open(adapter_dir / ADAPTER_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = {k: v for k, v in f.metadata().items() if k not in ("safelora.layers", DIGEST_KEY)}
    save_file(tensors, adapter_dir / ADAPTER_FILE, metadata)
    with opened(adapter_dir) as adapter:
        digest = file_digest(adapter, metadata)
    save_file(tensors, adapter_dir / ADAPTER_FILE, {**metadata, DIGEST_KEY: digest})
    BackupStore().record_written(digest, {"adapter": str(adapter_dir), "output": None, "stamp": metadata}, None)

    r = cli("project", adapter_dir, *_pair(llama_pair), "--json")

    assert r.exit_code == 0, r.stderr
    doc = _lines(r)[0]
    assert doc["status"] == "unchanged"
    assert (doc["layers"], doc["layer_count"], doc["projected_count"]) == (None, None, None)
    assert any("safelora.layers" in note for note in doc["notes"])


# --- 9. how much of the fine-tune remains --------------------------------------------------------------


def test_the_median_norm_ratio_of_the_projected_modules_is_reported_everywhere(
    cli: Cli, llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    out, summary = tmp_path / "out", tmp_path / "summary.md"
    r = cli("project", adapter_dir, *_pair(llama_pair), "--output", out, "--json", "--model-card", "--summary", summary)
    assert r.exit_code == 0, r.stderr
    doc = _lines(r)[0]
    ratios = sorted(m["norm_ratio"] for m in doc["layers"] if m["projected"])
    assert len(ratios) >= 2
    median = statistics.median(ratios)
    assert doc["median_norm_ratio"] == pytest.approx(median)
    shown = f"{median:.4f}"
    [line] = [line for line in r.stderr.splitlines() if "modules projected" in line]
    assert f"; median ‖CB‖/‖B‖ {shown}; " in line
    assert f"median ‖CB‖/‖B‖ of the projected modules {shown}" in summary.read_text()
    assert f"median ‖CB‖/‖B‖ of the projected modules {shown}" in (out / "README.md").read_text()
    assert "warning" not in r.stderr  # a figure, not a warning

    none = cli("project", adapter_dir, *_pair(llama_pair), "--threshold", 0, "--dry-run", "--json")
    assert _lines(none)[0]["projected_count"] == 0
    assert _lines(none)[0]["median_norm_ratio"] is None  # nothing projected: no figure
