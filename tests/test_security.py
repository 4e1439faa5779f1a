"""No code runs from model files, and the report holds no number a JSON parser would refuse."""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from support import builders

from safelora_cli.adapters.peft_config import ADAPTER_FILE

SRC = Path(__file__).resolve().parents[1] / "src" / "safelora_cli"

# Calls that run code from the bytes they read, or may: refused outright.
UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "yaml.load",
    "yaml.load_all",
    "yaml.full_load",
    "yaml.unsafe_load",
    "marshal.loads",
    "eval",
    "exec",
}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _calls(source: str) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            yield _dotted(node.func), node


def unsafe_calls(source: str) -> list[str]:
    """Each call in ``source`` that could run code from a file, as ``name:line``."""
    found = []
    for name, call in _calls(source):
        weights_only = any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
        if name in UNSAFE or (name == "torch.load" and not weights_only):
            found.append(f"{name}:{call.lineno}")
    return found


def test_the_scanner_flags_what_it_should() -> None:
    source = "torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)\npickle.loads(b)\n"
    assert unsafe_calls(source) == ["torch.load:1", "torch.load:2", "pickle.loads:4"]


def test_no_source_file_can_run_code_from_a_model_file() -> None:
    files = sorted(SRC.rglob("*.py"))
    sources = {f.name: f.read_text(encoding="utf-8") for f in files}
    assert {name: unsafe_calls(text) for name, text in sources.items() if unsafe_calls(text)} == {}
    # the one legitimate unpickling is there, and is the weights_only kind
    assert sum(name == "torch.load" for text in sources.values() for name, _ in _calls(text)) >= 1
    # transformers is asked to run no code from a model (eval loads models with it): only ever an explicit False,
    # which also keeps it from asking on a terminal, as it does when the argument is left out.
    remote = [v for text in sources.values() for v in re.findall(r"trust_remote_code\s*=\s*([^,)\s]+)", text)]
    assert remote and set(remote) == {"False"}


def finite_or_null(doc: Any, where: str = "$") -> Iterator[str]:
    """Paths of every number in ``doc`` that is not finite (there should be none)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from finite_or_null(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from finite_or_null(v, f"{where}[{i}]")
    elif isinstance(doc, float) and not math.isfinite(doc):
        yield where


def _reject(constant: str) -> None:
    raise AssertionError(f"{constant} in the JSON report")


def test_undefined_similarities_are_null_in_the_report(
    llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    # q_proj of layer 0: B = 0, an untrained module (B·A = 0). v_proj of layer 1: aligned = base (V = 0).
    tensors = load_file(adapter_dir / ADAPTER_FILE)
    zero_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[zero_b] = torch.zeros_like(tensors[zero_b])
    save_file(tensors, adapter_dir / ADAPTER_FILE, metadata={"format": "pt"})
    base_state = builders.load_state(llama_pair[0])
    aligned_state = builders.load_state(llama_pair[1])
    aligned_state["model.layers.1.self_attn.v_proj.weight"] = base_state["model.layers.1.self_attn.v_proj.weight"]
    aligned = builders.save_checkpoint(aligned_state, tmp_path / "aligned", "safetensors")

    result = cli("project", "--adapter", adapter_dir, "--base", llama_pair[0], "--aligned", aligned, "--json")

    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout, parse_constant=_reject)
    assert list(finite_or_null(report)) == []
    layers = {layer["module"]: layer for layer in report["layers"]}
    undefined = {m for m, layer in layers.items() if layer["similarity"] is None}
    assert undefined == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for module in undefined:
        assert layers[module]["projected"] is False
        assert layers[module]["norm_ratio"] is None
        assert layers[module]["reason"]
