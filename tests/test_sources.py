"""Checkpoint sources: every local layout gives the same answer, reads only what it needs, runs no code."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import builders
from support.run import project_adapter
from typer.testing import CliRunner

from safelora_cli import sources
from safelora_cli.adapters import opened
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.api import Report
from safelora_cli.cli import app
from safelora_cli.errors import SourceError
from safelora_cli.results import Settings
from safelora_cli.sources import Source, open_local, registry

LAYOUTS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


def run(adapter: Path, base: Source, aligned: Source, out: Path) -> Report:
    try:
        return project_adapter(adapter, base, aligned, Settings(mode="number", num_layers=3, output=out))
    finally:
        base.close()
        aligned.close()


@pytest.fixture(scope="session")
def layouts(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """The conftest pair rewritten in each layout: layout → (base_dir, aligned_dir)."""
    root = tmp_path_factory.mktemp("layouts")
    states = [builders.load_state(d) for d in llama_pair]
    return {
        layout: tuple(  # type: ignore[misc]
            builders.save_checkpoint(state, root / layout / name, layout)
            for state, name in zip(states, ("base", "aligned"), strict=True)
        )
        for layout in LAYOUTS
    }


@pytest.fixture(scope="session")
def expected(
    llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Report, dict[str, torch.Tensor]]:
    """The run against the sharded checkpoints transformers itself wrote."""
    out = tmp_path_factory.mktemp("expected") / "out"
    report = run(llama_adapter, open_local(llama_pair[0]), open_local(llama_pair[1]), out)
    return report, load_file(out / ADAPTER_FILE)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_identical_results(
    layouts: dict[str, tuple[Path, Path]],
    llama_adapter: Path,
    expected: tuple[Report, dict[str, torch.Tensor]],
    tmp_path: Path,
    layout: str,
) -> None:
    base, aligned = layouts[layout]
    report = run(llama_adapter, open_local(base), open_local(aligned), tmp_path / "out")

    want, want_tensors = expected
    assert 0 < report.projected_count < len(report.layers)
    assert [(x.module, x.similarity, x.projected) for x in report.layers] == [
        (x.module, x.similarity, x.projected) for x in want.layers
    ]
    got = load_file(tmp_path / "out" / ADAPTER_FILE)
    assert got.keys() == want_tensors.keys()
    assert all(torch.equal(got[k], want_tensors[k]) for k in got)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded"])
def test_safetensors_sources_read_only_the_targeted_weights(
    layouts: dict[str, tuple[Path, Path]], llama_adapter: Path, tmp_path: Path, layout: str
) -> None:
    base, aligned = (open_local(d) for d in layouts[layout])
    with opened(llama_adapter) as adapter:
        modules = adapter.modules
    for src in (base, aligned):
        assert {src.resolve(m.module) for m in modules} <= set(src.names())
        assert src.bytes_read == 0, "names, shapes and resolution come from headers and the index"
    report = run(llama_adapter, base, aligned, tmp_path / "out")

    state = builders.load_state(layouts[layout][0])
    targeted = sum(state[f"{x.module}.weight"].nbytes for x in report.layers)
    assert len(report.layers) == 8
    assert base.bytes_read == aligned.bytes_read == targeted
    assert report.bytes_read == 2 * targeted
    assert targeted < sum(t.nbytes for t in state.values()) / 4


class _RunsCode:
    """A pickle payload that creates a file when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "one shard of an index"])
def test_a_bin_that_would_run_code_is_refused(
    layouts: dict[str, tuple[Path, Path]], adapter_dir: Path, tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    if how == "one shard of an index":
        bad = builders.save_checkpoint(builders.load_state(layouts["bin"][0]), evil, "bin-sharded")
        index = json.loads((evil / "pytorch_model.bin.index.json").read_text())
        victim = evil / index["weight_map"]["model.layers.3.self_attn.v_proj.weight"]  # a shard the run needs
        torch.save({**torch.load(victim, weights_only=True), "payload": _RunsCode(marker)}, victim)
    else:
        evil.mkdir()
        victim = evil / "pytorch_model.bin"
        state = {**builders.load_state(layouts["bin"][0]), "payload": _RunsCode(marker)}
        if how == "torch.save":
            torch.save(state, victim)
        else:
            with victim.open("wb") as f:
                pickle.dump(state, f)
        bad = evil
    before = (adapter_dir / ADAPTER_FILE).read_bytes()

    with pytest.raises(SourceError, match="refused to unpickle"):
        run(adapter_dir, open_local(bad), open_local(layouts["bin"][1]), tmp_path / "out")
    result = CliRunner().invoke(
        app, ["project", "--base", str(bad), "--aligned", str(layouts["bin"][1]), "--adapter", str(adapter_dir)]
    )

    assert result.exit_code == 1
    assert victim.name in result.output
    assert not marker.exists(), "the pickle's code ran"
    assert (adapter_dir / ADAPTER_FILE).read_bytes() == before


def test_a_legacy_format_bin_is_read(
    layouts: dict[str, tuple[Path, Path]],
    llama_adapter: Path,
    expected: tuple[Report, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    """Checkpoints saved before torch 1.6 are not zip files and cannot be memory-mapped."""
    dirs = []
    for d in layouts["bin"]:
        (tmp_path / d.name).mkdir()
        torch.save(
            builders.load_state(d), tmp_path / d.name / "pytorch_model.bin", _use_new_zipfile_serialization=False
        )
        dirs.append(tmp_path / d.name)
    report = run(llama_adapter, open_local(dirs[0]), open_local(dirs[1]), tmp_path / "out")

    assert [x.similarity for x in report.layers] == [x.similarity for x in expected[0].layers]


# ---------------------------------------------------------------- pairing names


@pytest.fixture(scope="session")
def named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    """One tiny checkpoint with awkward names, as a safetensors and as a .bin source."""
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "h.0.attn.c_attn.weight",
        "h.0.attn.c_attn.bias",
        "language_model.model.layers.1.mlp.up_proj.weight",
        "text.blocks.0.attn.qkv.weight",
        "vision.blocks.0.attn.qkv.weight",
    ]
    state = {name: torch.full((2, 3), float(i)) for i, name in enumerate(names)}
    root = tmp_path_factory.mktemp("named")
    save_file(state, str(root / "model.safetensors"))
    (root / "bin").mkdir()
    torch.save(state, root / "bin" / "pytorch_model.bin")
    return {"safetensors": open_local(root / "model.safetensors"), "bin": open_local(root / "bin")}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight"),
        ("transformer.h.0.attn.c_attn", "h.0.attn.c_attn.weight"),
        ("model.layers.1.mlp.up_proj", "language_model.model.layers.1.mlp.up_proj.weight"),
        ("layers.1.mlp.up_proj", "language_model.model.layers.1.mlp.up_proj.weight"),
    ],
)
def test_resolve_pairs_by_name_and_unique_suffix(named: dict[str, Source], kind: str, module: str, name: str) -> None:
    assert named[kind].resolve(module) == name


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("blocks.0.attn.qkv", "matches several weights"),
        ("model.layers.0.self_attn.k_proj", "no weight for module"),
        ("transformer.h.1.attn.c_attn", "no weight for module"),
        ("odel.layers.0.self_attn.q_proj", "no weight for module"),  # suffixes match whole name parts only
    ],
)
def test_resolve_refuses_ambiguous_or_absent_names(
    named: dict[str, Source], kind: str, module: str, message: str
) -> None:
    with pytest.raises(SourceError, match=message) as e:
        named[kind].resolve(module)
    assert repr(module) in str(e.value)


def test_an_index_naming_a_missing_shard_is_an_error(layouts: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    state = builders.load_state(layouts["safetensors"][0])
    sharded = builders.save_checkpoint(state, tmp_path / "ckpt", "safetensors-sharded")
    missing = sorted(sharded.glob("model-*.safetensors"))[-1]
    missing.unlink()

    with pytest.raises(SourceError, match=f"{missing.name}.*missing"):
        open_local(sharded)


# ---------------------------------------------------------------- kinds of source


@dataclass(frozen=True)
class Mem:
    """A made-up kind's own settings: its models by name."""

    models: dict[str, Path]


def test_the_built_in_kinds_register_as_any_other_and_a_prefix_claims_before_every_rule(
    llama_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[sources.SourceKind[Any]] = []
    sources.local.register_sources(registered.append)
    sources.hub.register_sources(registered.append)
    assert [(k.name, k.open) for k in registered] == [(k.name, k.open) for k in sources.kinds()]

    asked: list[sources.Request] = []

    def open_mem(request: sources.Request, mem: Mem) -> Source:
        asked.append(request)
        return open_local(mem.models[request.spec.removeprefix("mem://")])

    monkeypatch.setattr(registry, "_KINDS", list(registry._KINDS))  # a registration lasts the process: undone after
    mem_kind = sources.SourceKind(name="mem", settings=Mem, defaults=lambda: Mem({}), open=open_mem, prefix="mem://")
    sources.register(mem_kind)
    with pytest.raises(ValueError, match="registered already"):
        sources.register(mem_kind)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mem:" / "base").mkdir(parents=True)  # "mem://base" names this directory too: the prefix wins
    hub = sources.Hub.from_env(None, None)
    src = sources.open_source(
        "mem://base",
        None,
        role="base",
        transfer=sources.QuietTransfer(),
        notes=[],
        settings=[hub, Mem({"base": llama_pair[0]})],
    )
    local = open_local(llama_pair[0])
    try:
        assert src.fingerprint() == local.fingerprint()
    finally:
        src.close()
        local.close()
    assert [(r.spec, r.role) for r in asked] == [("mem://base", "base")]

    # Every other spec falls through to the built-in rules, as before.
    specs = ["mem://base", "mem:/base", str(llama_pair[0]), "org/name", "hf://org/name", "no/such/dir"]
    assert [sources.kind_for(s).name for s in specs] == ["mem", "local", "local", "hub", "hub", "local"]
    with pytest.raises(SourceError, match="no/such/dir: no such directory"):
        sources.open_source("no/such/dir", None, role="base", transfer=sources.QuietTransfer(), notes=[])
