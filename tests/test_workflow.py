"""The CI workflow: `check` exit codes, `inspect`, YAML configs, presets, terminal manners."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support import builders
from typer.testing import CliRunner

from safelora_cli import config
from safelora_cli.cli import app

runner = CliRunner()


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def pair(llama_pair: tuple[Path, Path]) -> list[str]:
    base, aligned = llama_pair
    return ["--base", str(base), "--aligned", str(aligned)]


@pytest.fixture
def sanitized(adapter_dir: Path, pair: list[str]) -> Path:
    code, _, err = run("project", "--adapter", adapter_dir, *pair, "--quiet")
    assert code == 0, err
    return adapter_dir


# --- check -------------------------------------------------------------------------------------------


def check(adapter: Path, *extra: str) -> tuple[int, dict[str, object]]:
    code, out, _ = run("check", "--adapter", adapter, *extra, "--json")
    return code, json.loads(out) if out.strip() else {}


def test_check_passes_a_sanitized_adapter_with_or_without_the_pair(sanitized: Path, pair: list[str]) -> None:
    assert check(sanitized)[0] == 0
    code, doc = check(sanitized, *pair)
    assert code == 0
    assert doc["ok"] is True and doc["status"] == "sanitized"


def test_check_fails_an_adapter_that_was_never_sanitized(adapter_dir: Path) -> None:
    code, doc = check(adapter_dir)
    assert code == 3
    assert doc["status"] == "never_sanitized"


def test_check_fails_an_adapter_sanitized_against_another_pair(sanitized: Path, llama_pair: tuple[Path, Path]) -> None:
    aligned = llama_pair[1]
    code, doc = check(sanitized, "--base", str(aligned), "--aligned", str(aligned))
    assert code == 3
    assert doc["status"] == "other_pair"


def test_check_fails_an_adapter_modified_after_sanitizing(sanitized: Path) -> None:
    path = sanitized / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] += 1.0
    save_file(tensors, path, metadata=metadata)
    code, doc = check(sanitized)
    assert code == 3
    assert doc["status"] == "modified"


def test_check_fails_when_provenance_has_no_digest(sanitized: Path) -> None:
    path = sanitized / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "safelora.digest"}
    save_file(load_file(path), path, metadata=metadata)
    assert check(sanitized)[0] == 3


def test_check_errors_are_exit_1(tmp_path: Path) -> None:
    code, _, err = run("check", "--adapter", tmp_path / "missing")
    assert code == 1
    assert "missing" in err and "Traceback" not in err


def test_check_needs_both_or_neither_of_base_and_aligned(sanitized: Path, pair: list[str]) -> None:
    code, _, _ = run("check", "--adapter", sanitized, *pair[:2])
    assert code == 2


# --- inspect -----------------------------------------------------------------------------------------


def test_inspect_describes_the_adapter_and_its_provenance(sanitized: Path) -> None:
    code, out, _ = run("inspect", sanitized, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["modules"] == 8
    assert doc["ranks"] == {"8": 8}
    assert doc["dtypes"] == {"F32": 16}
    assert sorted(doc["target_modules"]) == ["q_proj", "v_proj"]
    assert doc["dora"] is False and doc["embeddings"] is False and doc["modules_to_save"] is False
    assert doc["size_bytes"] == (sanitized / "adapter_model.safetensors").stat().st_size
    assert doc["provenance"]["safelora.mode"] == "threshold"


def test_inspect_of_a_fresh_adapter_has_no_provenance(adapter_dir: Path) -> None:
    code, out, _ = run("inspect", adapter_dir, "--json")
    assert code == 0
    assert json.loads(out)["provenance"] == {}


# --- configs and presets -----------------------------------------------------------------------------


def project_json(*args: str | Path) -> dict[str, object]:
    code, out, err = run("project", *args, "--dry-run", "--json", "--quiet")
    assert code == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_carries_project_options(adapter_dir: Path, llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, aligned = llama_pair
    cfg = write_yaml(tmp_path / "c.yaml", f"base: {base}\naligned: {aligned}\nnum-layers: 3\nprecision: float64\n")
    doc = project_json("--adapter", adapter_dir, "--config", cfg)
    assert doc["mode"] == "number" and doc["num_layers"] == 3
    assert doc["projected_count"] == 3


def test_command_line_flags_override_the_config(adapter_dir: Path, pair: list[str], tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", "num_layers: 3\n")
    doc = project_json("--adapter", adapter_dir, *pair, "--config", cfg, "--threshold", "0.2")
    assert doc["mode"] == "threshold" and doc["threshold"] == 0.2
    cfg = write_yaml(tmp_path / "d.yaml", "threshold: 0.2\n")
    doc = project_json("--adapter", adapter_dir, *pair, "--config", cfg, "--num-layers", "1")
    assert doc["mode"] == "number" and doc["projected_count"] == 1


def test_boolean_options_from_a_config_can_be_turned_off(adapter_dir: Path, pair: list[str], tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", "dry_run: true\n")
    before = (adapter_dir / "adapter_model.safetensors").read_bytes()
    code, _, err = run("project", "--adapter", adapter_dir, *pair, "--config", cfg, "--quiet")
    assert code == 0, err
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() == before
    code, _, err = run("project", "--adapter", adapter_dir, *pair, "--config", cfg, "--no-dry-run", "--quiet")
    assert code == 0, err
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("thresold: 0.3\n", "thresold"),
        ("- a list\n", "mapping"),
        ("threshold: [unclosed\n", "not valid YAML"),
        ("threshold: 0.2\nnum_layers: 3\n", "not both"),
    ],
)
def test_bad_configs_are_usage_errors_naming_the_problem(
    adapter_dir: Path, pair: list[str], tmp_path: Path, text: str, needle: str
) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", text)
    code, _, err = run("project", "--adapter", adapter_dir, *pair, "--config", cfg)
    assert code == 2
    assert needle in err


def test_every_shipped_preset_names_a_real_pair_and_a_documented_setting() -> None:
    shipped = config.presets()
    assert set(shipped) == {
        "llama-2-7b",
        "llama-2-13b",
        "llama-3-8b",
        "llama-3.1-8b",
        "mistral-7b",
        "qwen2.5-7b",
        "gemma-2-9b",
    }
    assert shipped["llama-2-7b"].base == "meta-llama/Llama-2-7b-hf"
    assert shipped["llama-2-7b"].aligned == "meta-llama/Llama-2-7b-chat-hf"
    assert shipped["qwen2.5-7b"].aligned == "Qwen/Qwen2.5-7B-Instruct"
    assert shipped["gemma-2-9b"].aligned == "google/gemma-2-9b-it"
    known = {"base", "aligned", "threshold", "num_layers"}
    for preset in shipped.values():
        assert set(preset.options) <= known
        assert ("threshold" in preset.options) != ("num_layers" in preset.options)


def test_a_preset_is_found_from_its_aligned_model() -> None:
    match = config.preset_for_aligned("meta-llama/Meta-Llama-3-8B-Instruct")
    assert match is not None and match.base == "meta-llama/Meta-Llama-3-8B"
    assert config.preset_for_aligned("someone/else") is None


def test_a_config_beside_a_preset_wins(adapter_dir: Path, pair: list[str], tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", "num_layers: 2\n")
    for order in (["--preset", "llama-2-7b", "--config", str(cfg)], ["--config", str(cfg), "--preset", "llama-2-7b"]):
        doc = project_json("--adapter", adapter_dir, *pair, *order)
        assert doc["mode"] == "number" and doc["projected_count"] == 2


def test_unknown_preset_lists_the_choices(adapter_dir: Path) -> None:
    code, _, err = run("project", "--adapter", adapter_dir, "--preset", "llama-9")
    assert code == 2
    assert "llama-2-7b" in err


def test_base_is_required_when_no_preset_matches(adapter_dir: Path, llama_pair: tuple[Path, Path]) -> None:
    code, _, err = run("project", "--adapter", adapter_dir, "--aligned", llama_pair[1])
    assert code == 2
    assert "--base" in err


# --- terminal manners --------------------------------------------------------------------------------


COLOR_CODE = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-9]|9[0-7])[;m]")


def test_output_to_a_pipe_has_no_escape_codes(adapter_dir: Path, pair: list[str]) -> None:
    # CliRunner's streams are pipes, not terminals, as in a CI log.
    code, out, err = run("project", "--adapter", adapter_dir, *pair, "--dry-run")
    assert code == 0, err
    assert "model.layers.0.self_attn.q_proj" in out
    assert "\x1b[" not in out + err


def test_no_color_is_respected_even_on_a_forced_terminal(
    adapter_dir: Path, pair: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("project", "--adapter", adapter_dir, *pair, "--dry-run")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert COLOR_CODE.search(run(*args)[1]), "the check below would prove nothing"
    monkeypatch.setenv("NO_COLOR", "1")
    code, out, err = run(*args)
    assert code == 0, err
    assert not COLOR_CODE.search(out + err)


def test_quiet_prints_nothing_but_the_json(adapter_dir: Path, pair: list[str]) -> None:
    code, out, err = run("project", "--adapter", adapter_dir, *pair, "--dry-run", "--quiet", "--json")
    assert code == 0
    assert err == ""
    assert json.loads(out)["layer_count"] == 8


def test_version_and_completion_are_available() -> None:
    assert run("--version")[1].startswith("safelora ")
    assert "--install-completion" in run("--help")[1]


def test_the_demo_example_is_buildable_anywhere(tmp_path: Path) -> None:
    code, out, err = run("demo", "--keep", tmp_path / "demo")
    assert code == 0, err
    assert "modules projected" in out
    shutil.rmtree(tmp_path / "demo")


def test_inspect_sees_modules_to_save_as_peft_writes_them(llama_pair: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = builders.make_adapter(llama_pair[1], tmp_path / "adapter", modules_to_save=["lm_head"])
    code, out, _ = run("inspect", adapter, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["modules_to_save"] is True
    assert any("lm_head" in s["key"] for s in doc["skipped"])


# --- batches -----------------------------------------------------------------------------------------


@pytest.fixture
def three_adapters(llama_adapter: Path, tmp_path: Path) -> list[Path]:
    return [Path(shutil.copytree(llama_adapter, tmp_path / "batch" / f"a{i}")) for i in range(3)]


def test_a_batch_reads_each_weight_once_for_all_adapters(
    three_adapters: list[Path], adapter_dir: Path, pair: list[str]
) -> None:
    code, out, err = run("project", "--adapter", adapter_dir, *pair, "--dry-run", "--json", "--no-cache")
    assert code == 0, err
    single = json.loads(out)
    args = [a for path in three_adapters for a in ("--adapter", str(path))]
    code, out, err = run("project", *args, *pair, "--dry-run", "--json", "--no-cache")
    assert code == 0, err
    reports = [json.loads(line) for line in out.splitlines()]
    assert [r["adapter"] for r in reports] == [str(p) for p in three_adapters]
    assert all(r["layers"] == single["layers"] for r in reports)
    # Three adapters on the same modules: the checkpoints were read once, not three times, by the
    # first adapter that needed them; each report counts its own reads.
    assert [r["bytes_read"] for r in reports] == [single["bytes_read"], 0, 0] and single["bytes_read"] > 0


def test_a_batch_writes_what_single_runs_write(three_adapters: list[Path], adapter_dir: Path, pair: list[str]) -> None:
    code, _, err = run("project", "--adapter", adapter_dir, *pair, "--quiet", "--no-cache")
    assert code == 0, err
    code, _, err = run("project", "--adapter", str(three_adapters[0].parent / "a*"), *pair, "--quiet", "--no-cache")
    assert code == 0, err
    expected = (adapter_dir / "adapter_model.safetensors").read_bytes()
    for path in three_adapters:
        assert (path / "adapter_model.safetensors").read_bytes() == expected


def test_one_broken_adapter_does_not_stop_the_others(three_adapters: list[Path], pair: list[str]) -> None:
    broken = three_adapters[1]
    (broken / "adapter_config.json").write_text("{not json")
    before = (broken / "adapter_model.safetensors").read_bytes()
    args = [a for path in three_adapters for a in ("--adapter", str(path))]
    code, out, err = run("project", *args, *pair, "--json", "--quiet")
    assert code == 1
    reports = [json.loads(line) for line in out.splitlines()]
    assert "error" in reports[1] and "adapter_config.json" in reports[1]["error"]
    assert reports[0]["written"] and reports[2]["written"]
    assert err.count("error:") == 1 and "Traceback" not in err
    assert (broken / "adapter_model.safetensors").read_bytes() == before
    assert check(three_adapters[0])[0] == 0 and check(three_adapters[2])[0] == 0


def test_an_adapter_of_another_model_fails_alone(three_adapters: list[Path], pair: list[str], tmp_path: Path) -> None:
    gpt2_base, _ = builders.gpt2_pair(tmp_path / "gpt2")
    other = builders.make_adapter(
        gpt2_base, tmp_path / "batch" / "gpt2", model_cls=builders.GPT2LMHeadModel, target_modules=["c_attn"]
    )
    args = [a for path in [three_adapters[0], other] for a in ("--adapter", str(path))]
    code, out, _ = run("project", *args, *pair, "--json", "--quiet", "--dry-run")
    assert code == 1
    reports = [json.loads(line) for line in out.splitlines()]
    assert reports[0]["projected_count"] > 0
    assert "error" in reports[1]


def test_a_glob_that_matches_nothing_is_a_usage_error(pair: list[str], tmp_path: Path) -> None:
    code, _, err = run("project", "--adapter", str(tmp_path / "nothing-*"), *pair)
    assert code == 2
    assert "matches no adapter" in err


def test_check_names_local_checkpoints_the_same_from_any_directory(
    sanitized: Path, llama_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, aligned = llama_pair
    monkeypatch.chdir(base.parent)
    code, doc = check(sanitized, "--base", base.name, "--aligned", aligned.name)
    assert code == 0, doc
