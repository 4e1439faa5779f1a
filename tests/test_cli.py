"""`safelora project` from the outside: exit codes, the JSON document, where output goes, defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import Result

from safelora_cli import __version__
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft_config import ADAPTER_FILE

Cli = Callable[..., Result]

REPORT_KEYS = {
    "safelora_version",
    "adapter",
    "output",
    "written",
    "dry_run",
    "base",
    "aligned",
    "mode",
    "threshold",
    "num_layers",
    "layer_count",
    "projected_count",
    "layers",
    "skipped",
}
LAYER_KEYS = {"module", "similarity", "projected", "reason", "norm_ratio"}
PASSED_THROUGH = "base_model.model.model.norm.modules_to_save.default.weight"


@pytest.fixture
def pair_args(llama_pair: tuple[Path, Path]) -> tuple[str, ...]:
    base, aligned = llama_pair
    return ("--base", str(base), "--aligned", str(aligned))


def flat(text: str) -> str:
    """Terminal output with Rich's line wrapping undone."""
    return " ".join(text.split())


def test_json_is_one_document_on_stdout_in_the_documented_schema(
    cli: Cli, adapter_dir: Path, llama_pair: tuple[Path, Path], pair_args: tuple[str, ...]
) -> None:
    # A tensor Safe LoRA does not define, so that "skipped" has an entry to check.
    with safe_open(adapter_dir / ADAPTER_FILE, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = f.metadata()
    save_file({**tensors, PASSED_THROUGH: torch.ones(64)}, adapter_dir / ADAPTER_FILE, metadata)

    result = cli("project", *pair_args, "--adapter", adapter_dir, "--threshold", 0.2, "--json")

    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # fails on anything but exactly one JSON document
    assert doc.keys() >= REPORT_KEYS
    base, aligned = llama_pair
    assert doc["safelora_version"] == __version__
    assert (doc["adapter"], doc["output"], doc["written"], doc["dry_run"]) == (str(adapter_dir), None, True, False)
    assert (doc["base"]["source"], doc["base"]["revision"]) == (str(base), None)
    assert (doc["aligned"]["source"], doc["aligned"]["revision"]) == (str(aligned), None)
    assert (doc["mode"], doc["threshold"], doc["num_layers"]) == ("threshold", 0.2, None)
    assert doc["layer_count"] == len(doc["layers"]) == 8
    assert doc["projected_count"] == sum(layer["projected"] for layer in doc["layers"])
    for layer in doc["layers"]:
        assert layer.keys() >= LAYER_KEYS
        assert layer["module"].startswith("model.layers.")  # PEFT's base_model.model. removed
        assert isinstance(layer["similarity"], float) and layer["reason"] is None
        assert layer["projected"] == (round(layer["similarity"], 5) <= 0.2)
        assert isinstance(layer["norm_ratio"], float)
    assert doc["skipped"] == [{"key": PASSED_THROUGH, "reason": "modules_to_save weight: passed through"}]
    # People get the table and summary, on stderr so that stdout stays parseable.
    assert "model.layers.3.self_attn.v_proj" in result.stderr
    assert f"{doc['projected_count']} of 8 modules projected" in flat(result.stderr)


def test_number_mode_reports_tau_k(cli: Cli, adapter_dir: Path, pair_args: tuple[str, ...]) -> None:
    result = cli("project", *pair_args, "--adapter", adapter_dir, "--num-layers", 2, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["mode"], doc["num_layers"], doc["dry_run"], doc["written"]) == ("number", 2, True, False)
    sims = sorted(round(layer["similarity"], 5) for layer in doc["layers"])
    assert doc["threshold"] == sims[1]
    assert doc["projected_count"] == 2


def test_human_output_goes_to_stdout_without_json(cli: Cli, adapter_dir: Path, pair_args: tuple[str, ...]) -> None:
    result = cli("project", *pair_args, "--adapter", adapter_dir, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "would project 8 of 8 modules (τ = 0.5); dry run, nothing written" in flat(result.stdout)


def test_aligned_defaults_to_the_adapters_base_model_and_says_so(
    cli: Cli, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    """PEFT records the model the adapter was trained on, which is the aligned one, never the base."""
    base, aligned = llama_pair
    result = cli("project", "--base", base, "--adapter", adapter_dir, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["aligned"]["source"] == str(aligned)
    assert f"aligned model taken from adapter_config.json's base_model_name_or_path: {aligned}" in flat(result.stderr)


def test_aligned_default_that_is_neither_a_local_directory_nor_a_repo_id_is_a_usage_error(
    cli: Cli, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = "/gone/Llama-2-7b-chat-hf"  # a repo id would be read from the Hub
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config))
    result = cli("project", "--base", llama_pair[0], "--adapter", adapter_dir)
    assert result.exit_code == 2
    assert "--aligned" in result.stderr and "/gone/Llama-2-7b-chat-hf" in flat(result.stderr)


def _missing_adapter(adapter: Path, base: Path) -> tuple[Path, Path]:
    return adapter.parent / "no-such-adapter", base


def _empty_base(adapter: Path, base: Path) -> tuple[Path, Path]:
    empty = adapter.parent / "empty-model"
    empty.mkdir()
    return adapter, empty


def _truncated_adapter(adapter: Path, base: Path) -> tuple[Path, Path]:
    data = (adapter / ADAPTER_FILE).read_bytes()
    (adapter / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    return adapter, base


def _config_not_json(adapter: Path, base: Path) -> tuple[Path, Path]:
    (adapter / CONFIG_FILE).write_text("{not json")
    return adapter, base


@pytest.mark.parametrize(
    ("break_input", "message"),
    [
        (_missing_adapter, "does not exist"),
        (_empty_base, "no model.safetensors"),
        (_truncated_adapter, "truncated"),
        (_config_not_json, "not valid JSON"),
    ],
)
def test_input_errors_exit_1_with_one_line_and_no_traceback(
    cli: Cli,
    adapter_dir: Path,
    llama_pair: tuple[Path, Path],
    break_input: Callable[[Path, Path], tuple[Path, Path]],
    message: str,
) -> None:
    adapter, base = break_input(adapter_dir, llama_pair[0])
    result = cli("project", "--base", base, "--aligned", llama_pair[1], "--adapter", adapter, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # --json always gives JSON: the failure as an {"adapter", "error"} object
    assert doc["adapter"] == str(adapter) and message in doc["error"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_safelora_debug_shows_the_traceback(
    cli: Cli, tmp_path: Path, pair_args: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFELORA_DEBUG", "1")
    result = cli("project", *pair_args, "--adapter", tmp_path / "no-such-adapter")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "AdapterError" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--threshold", "0.3", "--num-layers", "2"), "not both"),
        (("--no-such-option",), "No such option"),
        (("--precision", "float16"), "float32, float64"),
        (("--threshold", "1.5"), "--threshold"),
        (("--num-layers", "0"), "--num-layers"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(
    cli: Cli, adapter_dir: Path, pair_args: tuple[str, ...], args: tuple[str, ...], message: str
) -> None:
    before = (adapter_dir / ADAPTER_FILE).read_bytes()
    result = cli("project", *pair_args, "--adapter", adapter_dir, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before


def test_adapter_is_required(cli: Cli, pair_args: tuple[str, ...]) -> None:
    result = cli("project", *pair_args)
    assert result.exit_code == 2
    assert "--adapter" in result.stderr


def test_demo_runs_without_downloads(cli: Cli, tmp_path: Path) -> None:
    """The demo's even layers learn along the alignment directions and keep their update."""
    result = cli("demo", "--json", "--keep", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["written"] and doc["layer_count"] == 8
    assert {layer["module"] for layer in doc["layers"] if layer["projected"]} == {
        f"model.layers.{i}.self_attn.{proj}" for i in (1, 3) for proj in ("q_proj", "v_proj")
    }
    assert (tmp_path / "demo" / "adapter" / ADAPTER_FILE).is_file()


def test_demo_in_a_temporary_directory(cli: Cli) -> None:
    result = cli("demo")
    assert result.exit_code == 0, result.stderr
    assert "4 of 8 modules projected" in flat(result.stdout)


def test_version(cli: Cli) -> None:
    result = cli("--version")
    assert (result.exit_code, result.stdout) == (0, f"safelora {__version__}\n")


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safelora_cli", "project", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--num-layers" in result.stdout and "--adapter" in result.stdout


def test_a_local_run_imports_neither_the_hub_stack_nor_yaml(adapter_dir: Path, pair_args: tuple[str, ...]) -> None:
    """huggingface_hub (with its HTTP stack) and PyYAML cost ~0.35 s of every start-up: a run on
    local checkpoints without --config or --preset must not pay for them."""
    args = ["project", *pair_args, "--adapter", str(adapter_dir), "--dry-run", "--quiet"]
    code = (
        "import sys\n"
        "from safelora_cli.cli import app\n"
        f"app({args!r}, standalone_mode=False)\n"
        "print(sorted(m for m in ('huggingface_hub', 'httpx2', 'yaml') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["project", "--help"], ["cache", "--help"]])
def test_help_and_version_answer_without_importing_torch(args: list[str]) -> None:
    """torch takes seconds to import; --help, --version and shell completion must not wait for it."""
    code = (
        "import sys\n"
        "from safelora_cli.cli import main\n"
        f"sys.argv = ['safelora', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "False"
    assert result.stdout
