"""Config patterns: matched exactly as PEFT matches them, and never for longer than the budget.

PEFT's own functions are the reference for ordinary patterns (module selection, rank and alpha
keys, layer indices, modules_to_save). Pathological patterns, in every field PEFT reads as a regular
expression, end a whole CLI run with exit 1 and one line, within the budget.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from safelora_cli.adapters import patterns
from safelora_cli.adapters.lora_config import CONFIG_FILE, PEFT_PREFIX, LoraConfig
from safelora_cli.adapters.patterns import BUDGET_S, MAX_UNITS, ConfigPatterns
from safelora_cli.errors import AdapterError

MODULES = [
    # Llama, Qwen, Mistral
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.12.mlp.gate_proj",
    "model.embed_tokens",
    "lm_head",
    # GPT-2, and a bare GPT2Model
    "transformer.h.0.attn.c_attn",
    "transformer.h.11.mlp.c_proj",
    "h.3.attn.c_attn",
    # multimodal, after and before transformers 4.52's rename
    "model.language_model.layers.0.self_attn.q_proj",
    "language_model.model.layers.2.self_attn.o_proj",
    "model.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj",
    "model.multi_modal_projector.linear_1",
    # nested: experts inside layers, T5 blocks, heads
    "model.layers.1.mlp.experts.7.gate_proj",
    "model.layers.3.block_sparse_moe.experts.0.w1",
    "encoder.block.0.layer.0.SelfAttention.q",
    "classifier",
    "score",
    "model.layers.0.self_attn.q_proj_extra",
    "model.layers.0.self_attn.xq_proj",
    "layers.0.q_proj",
]

TARGETS: list[list[str] | str] = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj", "mlp.down_proj"],
    ["c_attn", "c_proj"],
    ["q", "w1", "gate_proj"],
    ["lm_head", "classifier", "score"],
    ["model.layers.0.self_attn.q_proj", "h.3.attn.c_attn"],
    r".*\.(q_proj|v_proj)$",
    r".*language_model.*\.(q_proj|k_proj|o_proj)",
    r"model\.layers\.\d+\.mlp\..*",
    r"^transformer\.h\.[0-9]+\.attn\.c_attn$",
    "q_proj",
    "lm_head",
    # the form Unsloth writes for vision-language models
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp).*?(?:q_proj|k_proj|v_proj|o_proj|gate_proj)"
    r".*?)|(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp)\.(?:(?:q_proj|k_proj|v_proj|o_proj)))",
]

EXCLUSIONS: list[dict[str, Any]] = [
    {},
    {"exclude_modules": ["v_proj", "model.layers.1.mlp.down_proj"]},
    {"exclude_modules": r".*layers\.1\..*"},
    {"modules_to_save": ["lm_head", "score"]},
    {"modules_to_save": ["mlp"]},
    {"modules_to_save": ["self_attn.q_proj"], "exclude_modules": ["c_attn"]},
]

LAYERS: list[dict[str, Any]] = [
    {"layers_to_transform": [0]},
    {"layers_to_transform": [1, 3]},
    {"layers_to_transform": 12},
    {"layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"layers_to_transform": [0, 3], "layers_pattern": "h"},
    {"layers_to_transform": [0, 1], "layers_pattern": ["blocks", "layers"]},
    {"layers_to_transform": [0, 2], "layers_pattern": "language_model.model.layers"},
    {"layers_to_transform": [0, 7], "layers_pattern": "experts"},
    {"layers_to_transform": [1], "layers_pattern": "block"},
]

RANKS: list[dict[str, int]] = [
    {"q_proj": 4},
    {"layers.0.self_attn.q_proj": 4, "down_proj": 2},
    {"model.layers.1.mlp.down_proj": 16, "mlp.down_proj": 3},
    {r"layers\.\d+\.self_attn\.(q|k)_proj": 4},
    {r"^model.layers.0.*": 2},
    {"q": 3, "proj": 5},
    {r".*experts\.\d+\..*": 5},
    {"attn": 6, "c_attn": 7},
    {r"(lm_head|classifier)": 9},
]


def ours(**kw: Any) -> LoraConfig:
    """Our config as _load_config builds it (an int layers_to_transform becomes a list)."""
    layers = kw.pop("layers_to_transform", None)
    fields: dict[str, Any] = {
        "r": 8,
        "target_modules": None,
        "rank_pattern": {},
        "fan_in_fan_out": False,
        "use_dora": False,
        "layers_to_transform": [layers] if isinstance(layers, int) else layers,
        "init_lora_weights": True,
        "base_model_name_or_path": None,
    }
    return LoraConfig(**{**fields, **kw})


def peft(**kw: Any) -> PeftLoraConfig:
    return PeftLoraConfig(r=8, **kw)


# --- the same answers as PEFT ----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("exclusion", EXCLUSIONS, ids=str)
def test_module_selection_equals_peft(target: list[str] | str, exclusion: dict[str, Any]) -> None:
    config, reference = ours(target_modules=target, **exclusion), peft(target_modules=target, **exclusion)
    for module in MODULES:
        assert config.targets(module) == bool(check_target_module_exists(reference, module)), module


@pytest.mark.parametrize("layers", LAYERS, ids=str)
@pytest.mark.parametrize("target", [t for t in TARGETS if isinstance(t, list)], ids=str)
def test_module_selection_with_layers_to_transform_equals_peft(target: list[str], layers: dict[str, Any]) -> None:
    config, reference = ours(target_modules=target, **layers), peft(target_modules=target, **layers)
    for module in MODULES:
        assert config.targets(module) == bool(check_target_module_exists(reference, module)), module


@pytest.mark.parametrize(
    "layers_pattern", [None, "layers", "h", ["blocks", "layers"], "experts", "layer", "SelfAttention"]
)
def test_layer_index_equals_peft(layers_pattern: str | list[str] | None) -> None:
    """The index is the one layer k for which PEFT, given layers_to_transform=[k], keeps the module."""
    config = ours(layers_pattern=layers_pattern)
    for module in (m for m in MODULES if "." in m):
        suffix = module.rsplit(".", 1)[1]
        kept = [
            k
            for k in range(16)
            if check_target_module_exists(
                peft(target_modules=[suffix], layers_to_transform=[k], layers_pattern=layers_pattern), module
            )
        ]
        assert kept == ([] if config.layer(module) is None else [config.layer(module)]), module


@pytest.mark.parametrize("rank_pattern", RANKS, ids=str)
def test_rank_and_alpha_keys_equal_peft(rank_pattern: dict[str, int]) -> None:
    config = ours(target_modules=["q_proj"], rank_pattern=rank_pattern, alpha_pattern=rank_pattern)
    for module in MODULES:
        key = get_pattern_key(rank_pattern.keys(), module)
        assert config.expected_rank(module) == rank_pattern.get(key, 8), module
        assert config.patterns.alpha_key(module) == key, module


def test_a_module_named_like_a_key_that_does_not_match_it_gets_its_value_as_in_peft() -> None:
    # "a*" as a regular expression does not match the name "a*"; PEFT then looks the name up as it is.
    config = ours(rank_pattern={"a*": 2})
    assert get_pattern_key(["a*"], "a*") == "a*"
    assert config.expected_rank("a*") == 2
    assert config.expected_rank("b") == 8


def test_modules_to_save_weights_are_those_peft_saves() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4)})])
            self.lm_head = torch.nn.Linear(4, 4)
            self.my_head = torch.nn.Linear(4, 4, bias=False)
            self.score = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            self.scorer = torch.nn.Linear(4, 2)

    to_save = ["head", "score"]
    base_keys = [PEFT_PREFIX + name for name, _ in Net().named_parameters()]
    model = get_peft_model(Net(), peft(target_modules=["q_proj"], modules_to_save=to_save))
    saved = {k for k in get_peft_model_state_dict(model) if "lora_" not in k}
    assert saved >= {PEFT_PREFIX + "lm_head.weight", PEFT_PREFIX + "score.1.bias"}  # the case is the one meant
    config = ours(target_modules=["q_proj"], modules_to_save=to_save)
    assert {k for k in {*saved, *base_keys} if config.saves(k)} == saved


# The syntax the patterns above use, in pieces: any pattern built from them that Python's re
# compiles must mean the same to the regex package.
_PIECES = [
    "a",
    "b",
    ".",
    r"\.",
    r"\d",
    r"\w",
    "[a-b]",
    "[^.]",
    "(",
    ")",
    "(?:",
    "(?P<g>",
    "(?=",
    "(?!",
    "(?<=a)",
    "|",
    "*",
    "+",
    "?",
    "*?",
    "{2}",
    "{1,2}",
    "{,2}",
    "^",
    "$",
    r"\b",
    "(?i)",
    "(?#c)",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=8), st.lists(st.text("ab.1_", max_size=6), max_size=6))
def test_regex_reads_ordinary_syntax_as_re_does(pieces: list[str], names: list[str]) -> None:
    pattern = "".join(pieces)
    try:
        expected = re.compile(pattern)
    except re.error:
        return
    if patterns.units(pattern)[1] is not None:
        return
    ours_ = regex.compile(pattern, regex.VERSION0)
    for name in names:
        for a, b in ((expected.match(name), ours_.match(name)), (expected.fullmatch(name), ours_.fullmatch(name))):
            assert (a and (a.span(), a.groups())) == (b and (b.span(), b.groups())), (pattern, name)


# --- bounded ---------------------------------------------------------------------------------------


def test_the_budget_is_one_second_for_a_whole_config() -> None:
    assert BUDGET_S == 1.0
    assert ours().patterns.budget.seconds == BUDGET_S


@pytest.mark.parametrize(
    "pattern",
    [
        "(a{1000}){1000}",
        "a{4294967294}",
        "x{000000000000000000000000000001000000}",
        "((a{100}){100}){100}",
        "(?:ab){,5}c{100000,}",
    ],
)
def test_repetition_that_would_take_long_or_much_memory_to_compile_is_refused(pattern: str) -> None:
    start = time.monotonic()
    with pytest.raises(AdapterError, match=r"too large to compile safely"):
        ours(target_modules=pattern)
    assert time.monotonic() - start < 10


def test_sizes_add_up_over_a_config() -> None:
    key = "a{1000}" + "b" * 40  # ~47,000 units: each alone is fine
    assert patterns.units(key)[0] * 3 < MAX_UNITS
    ours(rank_pattern={key: 2})
    with pytest.raises(AdapterError, match=r"alpha_pattern key .* with the config's other patterns"):
        ours(rank_pattern={key + "c": 2, key + "d": 2}, alpha_pattern={key: 1, key + "e": 1, key + "f": 1})


def test_ordinary_repetition_and_long_lists_of_names_are_accepted() -> None:
    names = "|".join(rf"model\.layers\.{i}\.self_attn\.(q_proj|k_proj|v_proj|o_proj)" for i in range(80))
    config = ours(target_modules=rf"^({names})$", rank_pattern={r"layers\.\d{1,2}\.mlp\.[a-z]{2,4}_proj": 4})
    assert config.targets("model.layers.79.self_attn.o_proj")
    assert not config.targets("model.layers.80.self_attn.o_proj")
    assert config.expected_rank("model.layers.3.mlp.up_proj") == 4


@pytest.mark.parametrize(
    "pattern",
    [
        r"\p{L}+_proj",
        "q_proj{e<=1}",
        r"\x{71}_proj",
        "(?V1)q_proj",
        "(?r)q_proj",
        "(?f)q_proj",
        "(a(?R)?b)",
        "(a)(?1)",
        "(?P<a>x)(?&a)",
        "(?P<a>x)(?P>a)",
        "(?|(a)|(b))",
        "(?<name>q)_proj",
        "[[:alpha:]]+",
        r"\X",
        r"\mq_proj\M",
        r"\L<names>",
        r"\Gq",
        "(?(DEFINE)(?P<a>x))",
        "(?x)( ?R)",
        "(?x:q_proj)",
    ],
)
def test_syntax_only_the_regex_package_reads_is_refused(pattern: str) -> None:
    with pytest.raises(AdapterError, match=r"target_modules .* (uses|not a valid)"):
        ours(target_modules=pattern)


def test_invalid_and_deeply_nested_patterns_are_refused_in_one_line() -> None:
    with pytest.raises(AdapterError, match=r"is not a valid regular expression") as e:
        ours(rank_pattern={"q_proj[": 4})
    assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match=r"layers_pattern .* (nested too deeply|not a valid)"):
        ours(layers_to_transform=[0], layers_pattern="(" * 1000 + ")" * 1000)


def test_messages_escape_and_cut_what_they_quote() -> None:
    long = "a\n\u202e" + "b" * 500 + "c{1000000}"
    with pytest.raises(AdapterError) as e:
        ours(target_modules=long, source="cfg.json")
    message = str(e.value)
    assert message.startswith("cfg.json: target_modules 'a\\n\\u202ebbb")
    assert "\n" not in message and "\u202e" not in message
    assert "(513 characters)" in message and len(message) < 400


def test_a_layer_index_of_thousands_of_digits_is_no_index() -> None:
    assert ours().layer("model.layers." + "9" * 5000 + ".q_proj") is None
    assert ours().layer("model.layers.12.q_proj") == 12


SLOW = r"(?:[\w.]|[\w.]{2}|[\w.]{3})*\d"  # backtracks for seconds on a name without a trailing digit


def test_a_backtracking_pattern_stops_at_the_budget() -> None:
    config = ours(target_modules=SLOW)
    with pytest.raises(AdapterError, match=r"target_modules .* did not finish on module .* within the 1 s") as e:
        config.targets("model.layers.0.self_attn.q_proj")
    assert "simpler regular expression" in str(e.value)
    assert config.patterns.budget.left() <= 0


def test_many_slow_but_finishing_patterns_share_one_budget() -> None:
    name = "layers.0.self_attn.q_proj"
    finishing = r"(?:[\w.]|[\w.][\w.])*\d"  # a few hundredths of a second on this name
    single = ours(rank_pattern={finishing: 2})
    assert single.expected_rank(name) == 8
    one = single.patterns.budget.spent
    assert one < BUDGET_S / 3
    count = min(400, math.ceil(3 * BUDGET_S / max(one, 1e-3)))  # together three budgets' worth, at least
    keys = {"(?:)" * i + finishing: 2 for i in range(count)}
    config = ours(rank_pattern=keys)
    with pytest.raises(AdapterError, match=r"rank_pattern key .* within the 1 s"):
        config.expected_rank(name)
    assert BUDGET_S <= config.patterns.budget.spent < count * one


def test_each_config_has_its_own_budget() -> None:
    first, second = ConfigPatterns("a", **_NONE), ConfigPatterns("b", **_NONE)
    assert first.budget is not second.budget


_NONE: dict[str, Any] = {
    "target_modules": None,
    "exclude_modules": None,
    "modules_to_save": [],
    "rank_pattern": [],
    "alpha_pattern": [],
    "layers_pattern": None,
    "layers_to_transform": None,
}


# --- whole runs ------------------------------------------------------------------------------------

PATHOLOGICAL = {
    "target_modules backtracking": ({"target_modules": SLOW}, "target_modules"),
    "target_modules repetition": ({"target_modules": "(q{1000}){1000}"}, "target_modules"),
    "rank_pattern backtracking": ({"rank_pattern": {SLOW: 4}}, "rank_pattern key"),
    "rank_pattern repetition": ({"rank_pattern": {"q_proj{99999999}": 4}}, "rank_pattern key"),
    "alpha_pattern backtracking": ({"alpha_pattern": {SLOW: 4}}, "alpha_pattern key"),
    "alpha_pattern repetition": ({"alpha_pattern": {"((q{100}){100}){100}": 4}}, "alpha_pattern key"),
    "layers_pattern backtracking": ({"layers_pattern": SLOW + r"\d", "layers_to_transform": [0, 1]}, "layers_pattern"),
    "layers_pattern repetition": ({"layers_pattern": "layers{1000000}", "layers_to_transform": [0]}, "layers_pattern"),
    "exclude_modules backtracking": ({"exclude_modules": SLOW}, "exclude_modules"),
    "many finishing rank_pattern keys": (
        {"rank_pattern": {"(?:)" * i + r"(?:[\w.]|[\w.][\w.])*\d": 4 for i in range(40)}},
        "rank_pattern key",
    ),
}


@pytest.mark.parametrize("case", PATHOLOGICAL)
def test_a_pathological_pattern_ends_a_run_with_exit_1_and_one_line(
    case: str, adapter_dir: Path, llama_pair: tuple[Path, Path]
) -> None:
    fields, named = PATHOLOGICAL[case]
    config_file = adapter_dir / CONFIG_FILE
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **fields}))
    base, aligned = llama_pair
    command = ["project", "--base", base, "--aligned", aligned, "--adapter", adapter_dir, "--dry-run"]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "safelora_cli", *map(str, command)], capture_output=True, text=True, timeout=30
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{config_file}: {named} " in lines[0]
    assert "Traceback" not in result.stderr
    assert elapsed < 10
