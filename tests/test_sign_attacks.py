"""Signed attestations, attacked (issue 19, point 8): whoever can write every byte of an adapter's
directory, its envelope included, and holds keys of their own, tries to make `check --public-key`
pass for an adapter the trusted key did not sign as it is.

Crafted statements are signed here with the trusted key itself where the point is that safelora's
parsing refuses them even then (a subject with `..`, duplicate keys): a signature is necessary, never
sufficient.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sign import CONFIG, ENVELOPE, WEIGHTS, check, elsewhere, envelope, project, write_key
from typer.testing import Result

Cli = Callable[..., Result]
Pair = tuple[Path, Path]
Keys = dict[str, tuple[Path, Path, str]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    return {name: write_key(root / name, "ed25519") for name in ("trusted", "attacker")}


@pytest.fixture
def signed(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    """A signed adapter, checked on the admitting machine (no local record)."""
    (adapter_dir / "tokenizer_config.json").write_text("{}")
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["trusted"][0])
    elsewhere(monkeypatch, tmp_path)
    return adapter_dir


def verdict(cli: Cli, adapter: Path, keys: Keys, *args: object) -> tuple[int, str]:
    code, doc = check(cli, adapter, "--public-key", keys["trusted"][1], *args)
    return code, doc.get("status", "")


def pae(kind: str, body: bytes) -> bytes:
    return b"DSSEv1 %d %s %d %s" % (len(kind.encode()), kind.encode(), len(body), body)


def sign_raw(private: Path, body: bytes, kind: str = "application/vnd.in-toto+json") -> bytes:
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.sign(pae(kind, body))


def put(adapter: Path, body: bytes, sigs: list[bytes], kind: str = "application/vnd.in-toto+json") -> None:
    doc = {
        "payloadType": kind,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": "", "sig": base64.b64encode(s).decode()} for s in sigs],
    }
    (adapter / ENVELOPE).write_text(json.dumps(doc))


def resigned(adapter: Path, private: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """The adapter's statement edited and signed again with ``private``."""
    doc = json.loads(base64.b64decode(envelope(adapter)["payload"]))
    edit(doc)
    body = json.dumps(doc).encode()
    put(adapter, body, [sign_raw(private, body)])


def metadata(adapter: Path) -> dict[str, str]:
    with safe_open(str(adapter / WEIGHTS), "pt") as f:
        return dict(f.metadata() or {})


# --- the files ------------------------------------------------------------------------------------------


def test_the_stamp_and_envelope_copied_onto_another_adapter(
    cli: Cli, signed: Path, llama_adapter: Path, keys: Keys, tmp_path: Path
) -> None:
    other = Path(shutil.copytree(llama_adapter, tmp_path / "other"))
    tensors = {k: v * 2 if "lora_B" in k else v for k, v in load_file(other / WEIGHTS).items()}
    save_file(tensors, other / WEIGHTS, metadata=metadata(signed))
    for name in (CONFIG, ENVELOPE, "tokenizer_config.json"):
        shutil.copy(signed / name, other / name)
    assert verdict(cli, other, keys) == (3, "modified")


@pytest.mark.parametrize(
    "edit",
    [
        {"r": 4},
        {"lora_alpha": 32},
        {"use_rslora": True},
        {"target_modules": ["q_proj"]},
        {"fan_in_fan_out": True},
        {"layers_to_transform": [0]},
        {"modules_to_save": ["lm_head"]},
        {"bias": "all"},
        {"use_dora": True},
        {"rank_pattern": {"q_proj": 4}},
        {"alpha_pattern": {"q_proj": 4}},
        {"an_unknown_key": 1},
    ],
)
def test_each_covered_config_field_edited_and_an_unknown_key_added(
    cli: Cli, signed: Path, keys: Keys, edit: dict[str, object]
) -> None:
    config = json.loads((signed / CONFIG).read_text())
    (signed / CONFIG).write_text(json.dumps(config | edit))
    # modified; or, where the edit no longer fits the weights (r=4), an adapter that cannot be read at all
    assert verdict(cli, signed, keys) in ((3, "modified"), (1, ""))


def test_an_inference_file_edited_added_or_removed(cli: Cli, signed: Path, keys: Keys) -> None:
    (signed / "tokenizer_config.json").write_text('{"chat_template": "evil"}')
    assert verdict(cli, signed, keys) == (3, "modified")
    (signed / "tokenizer_config.json").write_text("{}")
    assert verdict(cli, signed, keys) == (0, "sanitized")
    (signed / "chat_template.jinja").write_text("evil")
    assert verdict(cli, signed, keys) == (3, "modified")
    (signed / "chat_template.jinja").unlink()
    (signed / "tokenizer_config.json").unlink()
    assert verdict(cli, signed, keys) == (3, "modified")


def test_another_weights_file_a_loader_could_take_instead(cli: Cli, signed: Path, keys: Keys) -> None:
    shutil.copy(signed / WEIGHTS, signed / "adapter_model.bin")
    assert verdict(cli, signed, keys) == (3, "modified")


def test_a_linked_inference_file_is_signed_and_checked_by_what_it_opens(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-tokenizer.json"
    shared.write_text('{"version": "1.0"}')
    (adapter_dir / "tokenizer.json").symlink_to(shared)
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["trusted"][0])
    assert verdict(cli, adapter_dir, keys) == (0, "sanitized")
    shared.write_text('{"version": "2.0"}')
    assert verdict(cli, adapter_dir, keys) == (3, "modified")


def test_an_old_envelope_replayed_after_reprojection(cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys) -> None:
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["trusted"][0], "--num-layers", "4")
    old = (adapter_dir / ENVELOPE).read_bytes()
    project(cli, llama_pair, adapter_dir, "--num-layers", "1")
    assert not (adapter_dir / ENVELOPE).exists()
    (adapter_dir / ENVELOPE).write_bytes(old)
    assert verdict(cli, adapter_dir, keys) == (3, "modified")


def test_an_unsigned_rewrite_after_a_signed_one(cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys) -> None:
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["trusted"][0])
    project(cli, llama_pair, adapter_dir, "--threshold", "0.9")
    assert verdict(cli, adapter_dir, keys) == (3, "unverified")


# --- the keys and signatures ----------------------------------------------------------------------------


def test_another_key_does_not_verify(cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys) -> None:
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["attacker"][0])
    assert verdict(cli, adapter_dir, keys) == (3, "unverified")


def test_several_keys_of_which_one_signed(cli: Cli, signed: Path, keys: Keys) -> None:
    code, doc = check(cli, signed, "--public-key", keys["attacker"][1], "--public-key", keys["trusted"][1])
    assert (code, doc["signed_by"]) == (0, keys["trusted"][2])
    assert str(keys["trusted"][1]) in doc["notes"][0]


def test_two_signatures_of_which_one_is_valid(cli: Cli, signed: Path, keys: Keys) -> None:
    body = base64.b64decode(envelope(signed)["payload"])
    good = sign_raw(keys["trusted"][0], body)
    bad = bytearray(good)
    bad[0] ^= 1
    put(signed, body, [bytes(bad), sign_raw(keys["attacker"][0], body), good])
    assert verdict(cli, signed, keys) == (0, "sanitized")
    put(signed, body, [bytes(bad), sign_raw(keys["attacker"][0], body)])
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_a_keyid_is_only_a_hint(cli: Cli, signed: Path, keys: Keys) -> None:
    doc = envelope(signed)
    doc["signatures"][0]["keyid"] = keys["attacker"][2]
    (signed / ENVELOPE).write_text(json.dumps(doc))
    assert verdict(cli, signed, keys) == (0, "sanitized")


def test_a_payload_changed_under_its_signature(cli: Cli, signed: Path, keys: Keys) -> None:
    doc = envelope(signed)
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["predicate"]["stamp"]["safelora.base"] = "meta-llama/Llama-2-7b-hf@" + "0" * 40
    doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed / ENVELOPE).write_text(json.dumps(doc))
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_the_signature_covers_the_payload_type(cli: Cli, signed: Path, keys: Keys) -> None:
    body = base64.b64decode(envelope(signed)["payload"])
    put(signed, body, [sign_raw(keys["trusted"][0], body, "text/plain")], "text/plain")
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_a_url_safe_unpadded_payload_reads_the_same(cli: Cli, signed: Path, keys: Keys) -> None:
    doc = envelope(signed)
    body = base64.b64decode(doc["payload"])
    doc["payload"] = base64.urlsafe_b64encode(body).decode().rstrip("=")
    (signed / ENVELOPE).write_text(json.dumps(doc))
    assert verdict(cli, signed, keys) == (0, "sanitized")


# --- the envelope's bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw.replace(b'"payload"', b'"pay load"'),
        lambda raw: b"\x00\xff" + raw,
        lambda raw: b"[]",
        lambda raw: raw.replace(b'"sig": "', b'"sig": "!!'),
        lambda raw: raw.replace(b'"payload": "', b'"payload": " '),
        lambda raw: b'{"payloadType": "application/vnd.in-toto+json", "payload": "", "signatures": []}',
    ],
    ids=["truncated", "no-payload", "garbled", "not-an-object", "sig-not-base64", "payload-not-base64", "no-sigs"],
)
def test_a_truncated_or_garbled_envelope(cli: Cli, signed: Path, keys: Keys, mangle: Callable[[bytes], bytes]) -> None:
    (signed / ENVELOPE).write_bytes(mangle((signed / ENVELOPE).read_bytes()))
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_an_oversized_envelope_or_a_link_is_refused_unread(cli: Cli, signed: Path, keys: Keys, tmp_path: Path) -> None:
    raw = (signed / ENVELOPE).read_bytes()
    (signed / ENVELOPE).write_bytes(raw[:-2] + b" " * (16 << 20) + raw[-2:])
    code, doc = check(cli, signed, "--public-key", keys["trusted"][1])
    assert (code, doc["status"]) == (3, "unverified") and "16777216" in doc["message"]
    (tmp_path / "elsewhere.json").write_bytes(raw)
    (signed / ENVELOPE).unlink()
    (signed / ENVELOPE).symlink_to(tmp_path / "elsewhere.json")
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_duplicate_keys_in_the_envelope_or_the_signed_payload(cli: Cli, signed: Path, keys: Keys) -> None:
    raw = (signed / ENVELOPE).read_text()
    (signed / ENVELOPE).write_text(raw.replace('"payloadType"', '"payloadType": "x", "payloadType"', 1))
    assert verdict(cli, signed, keys) == (3, "unverified")
    body = base64.b64decode(json.loads(raw)["payload"])
    forged = body.replace(b'"predicateType"', b'"predicateType":"https://example.com/other","predicateType"', 1)
    put(signed, forged, [sign_raw(keys["trusted"][0], forged)])
    assert verdict(cli, signed, keys) == (3, "unverified")


@pytest.mark.parametrize(
    "name", ["../adapter_model.safetensors", "/etc/passwd", "sub/../tokenizer_config.json", "./adapter_config.json"]
)
def test_a_subject_outside_the_directory_even_when_signed(cli: Cli, signed: Path, keys: Keys, name: str) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["subject"].append({"name": name, "digest": {"sha256": "0" * 64}})

    resigned(signed, keys["trusted"][0], edit)
    assert verdict(cli, signed, keys) == (3, "unverified")


def test_a_repeated_subject_or_a_missing_required_one_even_when_signed(
    cli: Cli, signed: Path, keys: Keys, tmp_path: Path
) -> None:
    original = (signed / ENVELOPE).read_bytes()
    resigned(signed, keys["trusted"][0], lambda doc: doc["subject"].append(doc["subject"][0]))
    assert verdict(cli, signed, keys) == (3, "unverified")
    for name in (CONFIG, WEIGHTS, "tokenizer_config.json"):
        (signed / ENVELOPE).write_bytes(original)

        def drop(doc: dict[str, Any], name: str = name) -> None:
            doc["subject"] = [s for s in doc["subject"] if s["name"] != name]

        resigned(signed, keys["trusted"][0], drop)
        assert verdict(cli, signed, keys) == (3, "modified"), name


def test_a_signed_predicate_that_contradicts_its_stamp(cli: Cli, signed: Path, keys: Keys) -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["predicate"]["method"]["threshold"] = 0.99

    resigned(signed, keys["trusted"][0], edit)
    assert verdict(cli, signed, keys) == (3, "unverified")


# --- 3: a policy ----------------------------------------------------------------------------------------


def test_a_policy_met_and_each_requirement_not_met(
    cli: Cli, signed: Path, keys: Keys, llama_pair: Pair, tmp_path: Path
) -> None:
    stamp = json.loads(base64.b64decode(envelope(signed)["payload"]))["predicate"]
    content = stamp["base"]["content"]
    policy = tmp_path / "policy.yaml"
    met = (
        f"base: blake3:{content}\naligned: [somewhere/else, {stamp['aligned']['identity']}]\nmode: threshold\n"
        f"threshold_min: 0.4\nthreshold_max: 0.5\nprojected_min: 0\nkeys: [{keys['trusted'][2]}]\n"
    )
    policy.write_text(met)
    assert verdict(cli, signed, keys, "--policy", policy) == (0, "sanitized")
    for unmet in (
        "base: meta-llama/Llama-2-7b-hf\n",
        f"base: blake3:{'0' * 64}\n",
        "mode: number\n",
        "threshold_max: 0.3\n",
        "threshold_min: 0.6\n",
        "num_layers_min: 1\n",
        "projected_min: 1000\n",
        f"keys: [{keys['attacker'][2]}]\n",
    ):
        policy.write_text(unmet)
        code, doc = check(cli, signed, "--public-key", keys["trusted"][1], "--policy", policy)
        assert (code, doc["status"]) == (3, "outside_policy"), unmet
        assert str(policy) in doc["message"]


def test_a_policy_names_checkpoints_by_directory_compared_by_content(
    cli: Cli, signed: Path, keys: Keys, llama_pair: Pair, tmp_path: Path
) -> None:
    copies = [Path(shutil.copytree(p, tmp_path / f"copy-{p.name}")) for p in llama_pair]
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"base: {copies[0]}\naligned: [{tmp_path / 'nowhere'}, {copies[1]}]\nkeys: [sha256:{keys['trusted'][2]}]\n"
    )
    assert verdict(cli, signed, keys, "--policy", policy) == (0, "sanitized")
    policy.write_text(f"base: {copies[1]}\naligned: {copies[0]}\n")
    assert verdict(cli, signed, keys, "--policy", policy) == (3, "outside_policy")
    policy.write_text(f"base: {llama_pair[0].name}\naligned: {llama_pair[1].name}\n")  # the names it was signed with
    assert verdict(cli, signed, keys, "--policy", policy) == (0, "sanitized")


def test_a_policy_holds_for_a_locally_verified_adapter_but_keys_need_a_signature(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: Keys, tmp_path: Path
) -> None:
    project(cli, llama_pair, adapter_dir)
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: threshold\nthreshold_max: 0.5\n")
    assert check(cli, adapter_dir, "--policy", policy)[1]["status"] == "sanitized"
    policy.write_text(f"keys: [{keys['trusted'][2]}]\n")
    assert check(cli, adapter_dir, "--policy", policy)[1]["status"] == "outside_policy"


@pytest.mark.parametrize(
    "text", ["mode: fast\n", "threshold_min: high\n", "projected_min: -1\n", "keys: [abc]\n", "tau: 1\n", "- a\n"]
)
def test_a_policy_that_says_what_no_policy_does_is_a_usage_error(
    cli: Cli, signed: Path, keys: Keys, tmp_path: Path, text: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    result = cli("check", signed, "--public-key", keys["trusted"][1], "--policy", policy)
    assert result.exit_code == 2, result.output
    assert str(policy) in result.stderr
