"""MLX-LM adapters: found by content, projected like the PEFT adapter they equal, in place or to
``--output``, restored byte for byte, checked; hostile configs and files refused in one line."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.keys import write_key
from support.mlx_adapters import mlx_config, mlx_from_peft, write_config
from typer.testing import Result

from safelora_cli import adapters
from safelora_cli.adapters.mlx import MLX

Cli = Callable[..., Result]
WEIGHTS = "adapters.safetensors"


@pytest.fixture
def pair(llama_pair: tuple[Path, Path]) -> list[str]:
    base, aligned = llama_pair
    return ["--base", str(base), "--aligned", str(aligned)]


@pytest.fixture
def mlx_dir(llama_adapter: Path, tmp_path: Path) -> Path:
    """The MLX-LM adapter equal to the session's PEFT adapter (q_proj/v_proj, r=8, every block)."""
    return mlx_from_peft(llama_adapter, tmp_path / "mlx")


def tensors(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / WEIGHTS)


def metadata(adapter: Path) -> dict[str, str]:
    with safe_open(str(adapter / WEIGHTS), "pt") as f:
        return dict(f.metadata() or {})


def rewrite(adapter: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    t = tensors(adapter)
    edit(t)
    save_file(t, adapter / WEIGHTS, metadata=metadata(adapter))


def refused(cli: Cli, adapter: Path, pair: list[str], *expected: str) -> str:
    """Project ``adapter``: exit 1, one line naming each of ``expected``, every file left as it was."""
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    result = cli("project", "--adapter", adapter, *pair)
    assert result.exit_code == 1, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    return message


# --- found by content ----------------------------------------------------------------------------


def test_an_mlx_directory_is_found_by_its_config_not_its_name(mlx_dir: Path, tmp_path: Path) -> None:
    renamed = mlx_dir.rename(tmp_path / "adapter_model")
    with adapters.opened(renamed) as adapter:
        assert adapter.format is MLX
        assert adapter.file == renamed / WEIGHTS
        assert len(adapter.modules) == 8
        assert adapter.format.kept_files(adapter) == (WEIGHTS,)
        assert set(adapter.format.attested_files(adapter)) == {"adapter_config.json", WEIGHTS}
        m = adapter.modules[0]
        # A r×in and B out×r, as for PEFT, though the file holds lora_a in×r and lora_b r×out.
        assert adapter.tensor(m.a_key).shape == (8, m.in_features)
        assert adapter.tensor(m.b_key).shape == (m.out_features, 8)
        assert adapter.header.tensors[m.b_key].shape == (8, m.out_features)


def test_a_peft_config_with_an_adapters_file_beside_it_stays_peft(adapter_dir: Path, mlx_dir: Path) -> None:
    shutil.copy(mlx_dir / WEIGHTS, adapter_dir / WEIGHTS)
    with adapters.opened(adapter_dir) as adapter:
        assert adapter.format.name == "PEFT"


def test_an_mlx_config_without_its_weights_is_refused_as_mlx(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    (mlx_dir / WEIGHTS).unlink()
    refused(cli, mlx_dir, pair, f"{mlx_dir / WEIGHTS}: missing", "MLX-LM")


# --- projected as the PEFT adapter it equals -----------------------------------------------------


def test_projecting_mlx_equals_projecting_the_equivalent_peft_adapter(
    cli: Cli, mlx_dir: Path, adapter_dir: Path, pair: list[str]
) -> None:
    original = tensors(mlx_dir)
    for adapter in (mlx_dir, adapter_dir):
        result = cli("project", "--adapter", adapter, *pair, "--threshold", "0.2", "--json")
        assert result.exit_code == 0, result.stderr
    peft = load_file(adapter_dir / "adapter_model.safetensors")
    projected = tensors(mlx_dir)
    changed = 0
    for key, b in projected.items():
        module, part = key.rsplit(".", 1)
        want = peft[f"base_model.model.{module}.lora_{part[-1].upper()}.weight"].T
        torch.testing.assert_close(b, want, rtol=1e-6, atol=1e-7)
        changed += not torch.equal(b, original[key])
        if part == "lora_a":
            assert torch.equal(b, original[key])
    assert 0 < changed < 8  # some modules projected at τ = 0.2, some kept
    assert metadata(mlx_dir)["safelora.stamp_version"] == "2"


def test_in_place_restore_and_check(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    before = (mlx_dir / WEIGHTS).read_bytes()
    config = (mlx_dir / "adapter_config.json").read_bytes()
    assert cli("check", "--adapter", mlx_dir).exit_code == 3
    assert cli("project", "--adapter", mlx_dir, *pair, "--quiet").exit_code == 0
    assert (mlx_dir / WEIGHTS).read_bytes() != before
    assert (mlx_dir / "adapter_config.json").read_bytes() == config
    result = cli("check", "--adapter", mlx_dir, *pair, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["status"] == "sanitized"
    inspected = json.loads(cli("inspect", "--adapter", mlx_dir, "--json").stdout)
    assert inspected["modules"] == 8 and inspected["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert cli("restore", "--adapter", mlx_dir).exit_code == 0
    assert (mlx_dir / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in mlx_dir.iterdir()) == ["adapter_config.json", WEIGHTS]


def test_output_writes_a_whole_mlx_directory_and_leaves_the_source(
    cli: Cli, mlx_dir: Path, pair: list[str], tmp_path: Path
) -> None:
    (mlx_dir / "0000100_adapters.safetensors").write_bytes(b"a checkpoint mlx-lm saved on the way")
    before = {p.name: p.read_bytes() for p in mlx_dir.iterdir()}
    out = tmp_path / "sanitized"
    assert cli("project", "--adapter", mlx_dir, *pair, "--output", out, "--quiet").exit_code == 0
    assert {p.name: p.read_bytes() for p in mlx_dir.iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert (out / "adapter_config.json").read_bytes() == before["adapter_config.json"]
    assert cli("check", "--adapter", out, *pair).exit_code == 0


def test_a_stamp_covers_what_the_adapter_does_not_training_settings(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    assert cli("project", "--adapter", mlx_dir, *pair, "--quiet").exit_code == 0
    write_config(mlx_dir, mlx_config(learning_rate=0.5, iters=9, lora_parameters=mlx_config()["lora_parameters"]))
    assert cli("check", "--adapter", mlx_dir).exit_code == 0
    params = mlx_config()["lora_parameters"] | {"dropout": 0.3}
    write_config(mlx_dir, mlx_config(lora_parameters=params))
    assert cli("check", "--adapter", mlx_dir).exit_code == 0
    write_config(mlx_dir, mlx_config(lora_parameters=params | {"scale": 20.0}))
    result = cli("check", "--adapter", mlx_dir, "--json")
    assert result.exit_code == 3 and json.loads(result.stdout)["status"] == "modified"


def test_an_older_file_saying_lora_layers_reads_as_num_layers(cli: Cli, llama_adapter: Path, tmp_path: Path) -> None:
    config = mlx_config()
    del config["num_layers"]
    old = mlx_from_peft(llama_adapter, tmp_path / "old", lora_layers=4)
    write_config(old, config | {"lora_layers": 4})
    with adapters.opened(old) as adapter:
        assert adapter.format is MLX and len(adapter.modules) == 8


def test_qlora_a_float_lora_on_a_quantized_model_is_projected(
    cli: Cli, llama_adapter: Path, tmp_path: Path, pair: list[str]
) -> None:
    qlora = mlx_from_peft(
        llama_adapter, tmp_path / "qlora", model="mlx-community/tiny-4bit", quantization={"group_size": 64, "bits": 4}
    )
    assert cli("project", "--adapter", qlora, *pair, "--quiet").exit_code == 0
    assert cli("check", "--adapter", qlora).exit_code == 0


def test_dora_is_refused_without_allow_dora_and_keeps_its_magnitudes(
    cli: Cli, llama_adapter: Path, tmp_path: Path, pair: list[str]
) -> None:
    dora = mlx_from_peft(llama_adapter, tmp_path / "dora", fine_tune_type="dora")
    rewrite(
        dora,
        lambda t: t.update(
            {k.replace("lora_b", "m"): torch.rand(v.shape[1]) + 1 for k, v in list(t.items()) if k.endswith("lora_b")}
        ),
    )
    magnitudes = {k: v for k, v in tensors(dora).items() if k.endswith(".m")}
    refused(cli, dora, pair, "DoRA", "--allow-dora")
    assert cli("project", "--adapter", dora, *pair, "--allow-dora", "--quiet").exit_code == 0
    after = tensors(dora)
    assert all(torch.equal(after[k], v) for k, v in magnitudes.items())
    assert metadata(dora)["safelora.dora"]


# --- refused in one line, nothing written --------------------------------------------------------


def test_full_fine_tuning_is_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    write_config(mlx_dir, mlx_config(fine_tune_type="full"))
    refused(cli, mlx_dir, pair, "fine_tune_type is full", "not a LoRA update")


def test_switch_layers_of_experts_are_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    key = "model.layers.0.mlp.switch_mlp.gate_proj"
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": None}))
    rewrite(
        mlx_dir, lambda t: t.update({f"{key}.lora_a": torch.zeros(4, 8, 64), f"{key}.lora_b": torch.zeros(4, 128, 8)})
    )
    refused(cli, mlx_dir, pair, f"{key}.lora_", "mixture-of-experts switch layer")


@pytest.mark.parametrize(
    "extra",
    [
        {"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(64, 1, dtype=torch.int32)},
        {"model.layers.0.self_attn.q_proj.lora_b.scales": torch.zeros(8, 1)},
    ],
    ids=["packed-integers", "scales"],
)
def test_quantized_lora_tensors_are_refused(
    cli: Cli, mlx_dir: Path, pair: list[str], extra: dict[str, torch.Tensor]
) -> None:
    rewrite(mlx_dir, lambda t: t.update(extra))
    refused(cli, mlx_dir, pair, next(iter(extra)), "quantized LoRA tensor")


def test_a_config_naming_a_module_the_model_lacks_is_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    keys = ["self_attn.q_proj", "self_attn.v_proj", "block_sparse_moe.gate"]
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": keys}))
    refused(cli, mlx_dir, pair, "lora_parameters.keys names block_sparse_moe.gate", "no such module")


def test_weights_for_a_module_the_checkpoint_lacks_are_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    keys = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.qkv_proj"]
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": keys}))
    key = "model.layers.1.self_attn.qkv_proj"
    rewrite(mlx_dir, lambda t: t.update({f"{key}.lora_a": torch.ones(64, 8), f"{key}.lora_b": torch.ones(8, 192)}))
    refused(cli, mlx_dir, pair, "self_attn.qkv_proj")


def test_weights_the_config_does_not_target_are_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": ["self_attn.q_proj"]}))
    refused(cli, mlx_dir, pair, "model.layers.0.self_attn.v_proj but lora_parameters keys do not name it")


def test_a_model_level_module_needs_a_key_naming_it(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": None}))
    rewrite(mlx_dir, lambda t: t.update({"lm_head.lora_a": torch.ones(64, 8), "lm_head.lora_b": torch.ones(8, 128)}))
    refused(cli, mlx_dir, pair, "lm_head", "has no keys, so mlx-lm puts LoRA layers inside the blocks only")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"num_layers": 2},
            "blocks 0 to 3 but adapter_config.json says num_layers=2 (the last 2); config and weights do not "
            "belong together",
        ),
        ({"num_layers": 10**40}, "not valid JSON (integer of 41 digits)"),
        ({"num_layers": "16"}, "num_layers is '16'"),
        ({"num_layers": True}, "num_layers is True"),
        ({"num_layers": 1.5}, "num_layers is 1.5"),
        ({"num_layers": None}, "num_layers is None"),
        ({"fine_tune_type": "lokr"}, "fine_tune_type is 'lokr'"),
        ({"lora_parameters": [8]}, "lora_parameters is [8]"),
        ({"lora_parameters": {"rank": 0, "scale": 2.0}}, "rank 0"),
        ({"lora_parameters": {"rank": 8, "scale": "2"}}, "scale '2'"),
        (
            {"lora_parameters": {"rank": 4, "scale": 2.0}},
            "rank 8 but adapter_config.json says lora_parameters.rank=4; config and weights do not belong together",
        ),
        ({"lora_parameters": {"rank": 8, "scale": 2.0, "keys": ["self_attn..q_proj"]}}, "lora_parameters.keys is"),
        ({"lora_parameters": {"rank": 8, "scale": 2.0, "keys": ["x"] * 5000}}, "at most 4096"),
        ({"lora_parameters": {"rank": 8, "scale": 2.0, "keys": []}}, "lora_parameters.keys is []"),
        ({"model": 7}, "model is 7"),
    ],
)
def test_hostile_configs_are_refused_in_one_line(
    cli: Cli, mlx_dir: Path, pair: list[str], overrides: dict[str, Any], expected: str
) -> None:
    write_config(mlx_dir, mlx_config(**overrides))
    # The config alone is wrong, or it and the weights do not agree (then the weights file is named).
    named = WEIGHTS if "belong together" in expected else "adapter_config.json"
    refused(cli, mlx_dir, pair, str(mlx_dir / named), expected)


@pytest.mark.parametrize("count", [2**63, -(2**63), 0, 4])
def test_any_whole_number_of_layers_reads_as_mlx_lm_reads_it(mlx_dir: Path, count: int) -> None:
    # mlx-lm takes the last max(num_layers, 0) blocks of its list: zero or less means every block,
    # more than there are too; nothing is sized by the number.
    write_config(mlx_dir, mlx_config(num_layers=count))
    with adapters.opened(mlx_dir) as adapter:
        assert len(adapter.modules) == 8


def test_rank_mismatch_between_a_and_b_is_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    key = "model.layers.0.self_attn.q_proj.lora_b"
    rewrite(mlx_dir, lambda t: t.update({key: torch.ones(4, 64)}))
    refused(cli, mlx_dir, pair, key, "ranks differ")


def test_a_lora_a_without_its_lora_b_is_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    rewrite(mlx_dir, lambda t: t.pop("model.layers.2.self_attn.v_proj.lora_b"))
    refused(cli, mlx_dir, pair, "model.layers.2.self_attn.v_proj.lora_a has no matching lora_b")


# --- with the rest of safelora -------------------------------------------------------------------


def test_check_recomputes_an_mlx_adapter_from_its_original(
    cli: Cli, mlx_dir: Path, pair: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Path(shutil.copytree(mlx_dir, tmp_path / "original"))
    assert cli("project", "--adapter", mlx_dir, *pair, "--threshold", "0.2", "--quiet").exit_code == 0
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "elsewhere"))  # no local record: recompute
    result = cli("check", "--adapter", mlx_dir, *pair, "--original", original, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["verified_by"] == "recomputation"
    rewrite(mlx_dir, lambda t: t["model.layers.3.self_attn.q_proj.lora_b"].mul_(1.5))
    assert cli("check", "--adapter", mlx_dir, *pair, "--original", original).exit_code == 3


def test_a_batch_mixes_mlx_and_peft_adapters(cli: Cli, mlx_dir: Path, adapter_dir: Path, pair: list[str]) -> None:
    result = cli("project", "--adapter", mlx_dir, "--adapter", adapter_dir, *pair, "--json")
    assert result.exit_code == 0, result.stderr
    assert cli("check", "--adapter", mlx_dir, "--adapter", adapter_dir).exit_code == 0
    assert "safelora.digest" in metadata(mlx_dir)


def test_ctrl_c_says_an_mlx_adapter_is_unchanged(
    cli: Cli, mlx_dir: Path, pair: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safelora_cli.run import pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "project_adapters", interrupted)
    result = cli("project", "--adapter", mlx_dir, *pair)
    assert result.exit_code == 130
    assert result.stderr == f"interrupted; unchanged: {mlx_dir}\n"


def test_a_tensor_name_with_a_line_break_stays_on_one_line(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    key = "model.layers.0.self_attn.q\nproj"
    rewrite(mlx_dir, lambda t: t.update({f"{key}.lora_a": torch.ones(64, 8), f"{key}.lora_b": torch.ones(8, 64)}))
    refused(cli, mlx_dir, pair, "do not belong together")


def test_a_one_dimensional_lora_weight_is_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    key = "model.layers.0.self_attn.q_proj.lora_a"
    rewrite(mlx_dir, lambda t: t.update({key: torch.ones(512)}))
    refused(cli, mlx_dir, pair, key, "expected a 2-D LoRA weight")


def test_magnitudes_without_any_lora_pair_are_refused(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    save_file({"model.layers.0.self_attn.q_proj.m": torch.ones(64)}, mlx_dir / WEIGHTS)
    write_config(mlx_dir, mlx_config(lora_parameters=mlx_config()["lora_parameters"] | {"keys": None}))
    refused(cli, mlx_dir, pair, "no 2-D lora_a/lora_b pairs")


def test_a_symlinked_weights_file_is_not_rewritten_in_place(cli: Cli, mlx_dir: Path, pair: list[str]) -> None:
    target = mlx_dir.parent / "elsewhere.safetensors"
    (mlx_dir / WEIGHTS).rename(target)
    (mlx_dir / WEIGHTS).symlink_to(target)
    before = target.read_bytes()
    refused(cli, mlx_dir, pair, "is a symbolic link")
    assert target.read_bytes() == before


def test_the_covered_config_fills_defaults_and_drops_only_the_inert_table(tmp_path: Path) -> None:
    from safelora_cli.adapters.mlx_config import covered_config

    def covered(config: dict[str, Any]) -> bytes:
        return covered_config(json.dumps(config).encode(), tmp_path / "adapter_config.json")

    params = {"rank": 8, "scale": 20.0}
    plain = covered({"num_layers": 4, "lora_parameters": params})
    assert plain == covered({"lora_layers": 4, "lora_parameters": params | {"dropout": 0.1}, "fine_tune_type": "lora"})
    assert plain == covered({"num_layers": 4, "lora_parameters": params | {"keys": None}, "seed": 3, "iters": 9})
    for changed in (
        {"num_layers": 5, "lora_parameters": params},
        {"num_layers": 4, "lora_parameters": params | {"scale": 10.0}},
        {"num_layers": 4, "lora_parameters": params | {"keys": ["self_attn.q_proj"]}},
        {"num_layers": 4, "lora_parameters": params, "fine_tune_type": "dora"},
        {"num_layers": 4, "lora_parameters": params, "model": "other"},
        {"num_layers": 4, "lora_parameters": params, "something_new": 1},
    ):
        assert covered(changed) != plain, changed


def test_a_signed_mlx_adapter_names_its_files_and_verifies_elsewhere(
    cli: Cli, mlx_dir: Path, pair: list[str], tmp_path: Path
) -> None:
    """The attestation names mlx-lm's weights and config; a changed weight after signing reads modified."""
    private, public, keyid = write_key(tmp_path / "keys")
    assert cli("project", "--adapter", mlx_dir, *pair, "--sign-key", private, "--quiet").exit_code == 0
    envelope = json.loads((mlx_dir / "safelora.intoto.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert sorted(s["name"] for s in statement["subject"]) == ["adapter_config.json", WEIGHTS]
    verdict = cli("check", "--adapter", mlx_dir, "--public-key", public, "--json")
    assert verdict.exit_code == 0, verdict.stderr
    assert json.loads(verdict.stdout)["signed_by"] == keyid
    rewrite(mlx_dir, lambda t: t.update({k: v * 2 for k, v in t.items() if k.endswith("lora_b")}))
    assert (
        json.loads(cli("check", "--adapter", mlx_dir, "--public-key", public, "--json").stdout)["status"] == "modified"
    )
