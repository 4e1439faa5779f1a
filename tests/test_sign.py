"""Signed attestations (issue 19): `project --sign-key` writes a DSSE envelope over an in-toto
Statement that `check --public-key` verifies offline, on a machine with neither the original nor
safelora's local record; `--policy` says what else must hold; `sign` signs a verified adapter.

The honest path, the key handling, the PEFT re-save and a verification with `cryptography` alone
are here; the attacks on the envelope and the files are in test_sign_attacks.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from safetensors.torch import load_file, save_file
from support.keys import write_key
from typer.testing import Result

Cli = Callable[..., Result]
Pair = tuple[Path, Path]
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ENVELOPE = "safelora.intoto.json"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("keys")
    return {kind: write_key(root / kind, kind) for kind in ("ed25519", "p256")} | {
        "other": write_key(root / "other", "ed25519")
    }


def project(cli: Cli, pair: Pair, adapter: Path, *args: object, code: int = 0) -> dict[str, Any]:
    result = cli("project", "--base", pair[0], "--aligned", pair[1], "--adapter", adapter, "--json", *args)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if result.stdout.strip() else {}


def check(cli: Cli, adapter: Path, *args: object) -> tuple[int, dict[str, Any]]:
    result = cli("check", adapter, "--json", *args)
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The admitting machine: another backup store (no local record) and cache."""
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "admitter-backups"))
    monkeypatch.setenv("SAFELORA_CACHE", str(tmp_path / "admitter-cache"))


def envelope(adapter: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((adapter / ENVELOPE).read_text())
    return doc


def statement_of(adapter: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(envelope(adapter)["payload"]))
    return doc


@pytest.fixture
def signed(cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: dict[str, tuple[Path, Path, str]]) -> Path:
    (adapter_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (adapter_dir / "chat_template.jinja").write_text("{{ messages }}")
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["ed25519"][0])
    return adapter_dir


# --- 1, 2: sign, and verify on a machine that has nothing else -------------------------------------------


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_a_signed_adapter_verifies_where_nothing_else_does(
    cli: Cli,
    llama_pair: Pair,
    adapter_dir: Path,
    keys: dict[str, tuple[Path, Path, str]],
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    private, public, keyid = keys[kind]
    report = project(cli, llama_pair, adapter_dir, "--sign-key", private)
    assert report["attestation"] == {"path": str(adapter_dir / ENVELOPE), "keyid": keyid}
    elsewhere(monkeypatch, tmp_path)
    assert check(cli, adapter_dir)[1]["status"] == "unverified"
    code, doc = check(cli, adapter_dir, "--public-key", public)
    assert (code, doc["status"], doc["verified_by"], doc["signed_by"]) == (0, "sanitized", "signature", keyid)
    assert doc["provenance"]["safelora.digest"] == statement_of(adapter_dir)["predicate"]["result"]["stampDigest"]


def test_the_statement_names_every_file_that_changes_inference_and_how_it_was_sanitized(
    signed: Path, llama_pair: Pair
) -> None:
    doc = statement_of(signed)
    assert envelope(signed)["payloadType"] == "application/vnd.in-toto+json"
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://safelora.dev/attestation/v1"
    names = [s["name"] for s in doc["subject"]]
    assert names == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json"]
    )
    for s in doc["subject"]:
        assert s["digest"] == {"sha256": hashlib.sha256((signed / s["name"]).read_bytes()).hexdigest()}
    p = doc["predicate"]
    assert p["method"] == {
        "name": "safe-lora",
        "mode": "threshold",
        "threshold": 0.5,
        "numLayers": None,
        "precision": "float32",
    }
    assert p["base"]["identity"].startswith(llama_pair[0].name + "@blake3:")
    assert p["base"]["content"].startswith(p["base"]["identity"].split("blake3:")[1])
    assert p["aligned"]["tensors"] and all(len(d) == 64 for d in p["aligned"]["tensors"].values())
    assert len(p["original"]["sha256"]) == 64
    assert {m["module"] for m in p["modules"]} and all({"similarity", "projected"} <= set(m) for m in p["modules"])
    assert p["result"]["coveredConfig"]["r"] == 8
    assert p["signer"]["name"] == "safelora" and p["signedAt"].endswith("Z")


def test_an_envelope_verifies_with_cryptography_alone(signed: Path, keys: dict[str, tuple[Path, Path, str]]) -> None:
    """What anyone can do without safelora: PAE over the decoded payload, the key, the subjects' sha256."""
    env = envelope(signed)
    body = base64.b64decode(env["payload"])
    kind = env["payloadType"].encode()
    pae = b"DSSEv1 " + str(len(kind)).encode() + b" " + kind + b" " + str(len(body)).encode() + b" " + body
    public = serialization.load_pem_public_key(keys["ed25519"][1].read_bytes())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    [sig] = env["signatures"]
    public.verify(base64.b64decode(sig["sig"]), pae)
    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(sig["sig"]), pae + b" ")
    statement = json.loads(body)
    for subject in statement["subject"]:
        assert hashlib.sha256((signed / subject["name"]).read_bytes()).hexdigest() == subject["digest"]["sha256"]


def test_an_ecdsa_signature_is_der_and_verifies_with_cryptography_alone(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: dict[str, tuple[Path, Path, str]]
) -> None:
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["p256"][0])
    env = envelope(adapter_dir)
    body = base64.b64decode(env["payload"])
    pae = b"DSSEv1 %d %s %d %s" % (len(env["payloadType"]), env["payloadType"].encode(), len(body), body)
    public = serialization.load_pem_public_key(keys["p256"][1].read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(base64.b64decode(env["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256()))
    assert env["signatures"][0]["keyid"] == keys["p256"][2]


def test_the_pair_given_must_be_the_attested_one(
    cli: Cli,
    signed: Path,
    llama_pair: Pair,
    keys: dict[str, tuple[Path, Path, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    elsewhere(monkeypatch, tmp_path)
    copy = (
        Path(shutil.copytree(llama_pair[0], tmp_path / "base-copy")),
        Path(shutil.copytree(llama_pair[1], tmp_path / "aligned-copy")),
    )
    code, doc = check(cli, signed, "--public-key", keys["ed25519"][1], "--base", copy[0], "--aligned", copy[1])
    assert (code, doc["status"]) == (0, "sanitized")
    code, doc = check(cli, signed, "--public-key", keys["ed25519"][1], "--base", copy[1], "--aligned", copy[0])
    assert (code, doc["status"]) == (3, "other_pair")


def test_what_check_reports_comes_from_the_predicate_not_the_files_metadata(
    cli: Cli, signed: Path, keys: dict[str, tuple[Path, Path, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safetensors import safe_open

    with safe_open(str(signed / WEIGHTS), "pt") as f:
        meta = dict(f.metadata() or {})
    attested = statement_of(signed)["predicate"]["stamp"]
    meta["safelora.base"] = "meta-llama/Llama-2-7b-hf@" + "0" * 40
    meta["safelora.projected"] = "[]"
    save_file(load_file(signed / WEIGHTS), signed / WEIGHTS, metadata=meta)
    elsewhere(monkeypatch, tmp_path)
    code, doc = check(cli, signed, "--public-key", keys["ed25519"][1])
    assert (code, doc["status"]) == (0, "sanitized")
    assert doc["provenance"]["safelora.base"] == attested["safelora.base"]
    assert attested["safelora.base"] in doc["message"] and "meta-llama" not in doc["message"]


# --- 4: a PEFT re-save still verifies --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_peft_resave_into_the_same_directory_still_verifies(
    cli: Cli,
    llama_pair: Pair,
    adapter_dir: Path,
    keys: dict[str, tuple[Path, Path, str]],
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    tensors = {k: v.to(dtype) for k, v in load_file(adapter_dir / WEIGHTS).items()}
    save_file(tensors, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    config = json.loads((adapter_dir / CONFIG).read_text())  # formatted as another tool writes it
    (adapter_dir / CONFIG).write_text(json.dumps(dict(reversed(config.items())), indent=4))
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["ed25519"][0])
    before = (adapter_dir / WEIGHTS).read_bytes(), (adapter_dir / CONFIG).read_bytes()
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_pair[1]), adapter_dir)
    model.save_pretrained(adapter_dir)
    after = (adapter_dir / WEIGHTS).read_bytes(), (adapter_dir / CONFIG).read_bytes()
    assert after[0] != before[0] and after[1] != before[1]  # PEFT's metadata, its config formatting
    if dtype == torch.float16:
        assert {v.dtype for v in load_file(adapter_dir / WEIGHTS).values()} == {torch.float32}
    elsewhere(monkeypatch, tmp_path)
    code, doc = check(cli, adapter_dir, "--public-key", keys["ed25519"][1])
    assert (code, doc["status"], doc["verified_by"]) == (0, "sanitized", "signature"), doc["message"]
    # the same re-save with one value changed is another adapter
    changed = load_file(adapter_dir / WEIGHTS)
    key = next(k for k in changed if "lora_B" in k)
    changed[key][0, 0] += 1e-3
    save_file(changed, adapter_dir / WEIGHTS, metadata={"format": "pt"})
    code, doc = check(cli, adapter_dir, "--public-key", keys["ed25519"][1])
    assert (code, doc["status"]) == (3, "modified")


# --- keys: files, the environment, passphrases, kinds ----------------------------------------------------


def test_a_key_from_the_environment_with_a_passphrase(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public, keyid = write_key(tmp_path / "enc", "ed25519", passphrase=b"s3cret")
    before = (adapter_dir / WEIGHTS).read_bytes()
    monkeypatch.setenv("SAFELORA_SIGN_KEY", str(private))
    result = cli("project", "--base", llama_pair[0], "--aligned", llama_pair[1], adapter_dir)
    assert result.exit_code == 1 and "SAFELORA_SIGN_KEY_PASSPHRASE" in result.stderr
    monkeypatch.setenv("SAFELORA_SIGN_KEY_PASSPHRASE", "wrong")
    result = cli("project", "--base", llama_pair[0], "--aligned", llama_pair[1], adapter_dir)
    assert result.exit_code == 1 and "passphrase" in result.stderr
    assert (adapter_dir / WEIGHTS).read_bytes() == before and not (adapter_dir / ENVELOPE).exists()
    monkeypatch.setenv("SAFELORA_SIGN_KEY_PASSPHRASE", "s3cret")
    assert project(cli, llama_pair, adapter_dir)["attestation"]["keyid"] == keyid
    monkeypatch.setenv("SAFELORA_PUBLIC_KEYS", os.pathsep.join([str(tmp_path / "missing.pub"), str(public)][1:]))
    code, doc = check(cli, adapter_dir)
    assert (code, doc["verified_by"], doc["signed_by"]) == (0, "signature", keyid)


def test_the_pem_itself_in_the_environment(
    cli: Cli,
    llama_pair: Pair,
    adapter_dir: Path,
    keys: dict[str, tuple[Path, Path, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAFELORA_SIGN_KEY", keys["p256"][0].read_text())
    assert project(cli, llama_pair, adapter_dir)["attestation"]["keyid"] == keys["p256"][2]


@pytest.mark.parametrize("kind", ["p384", "rsa"])
def test_keys_of_other_kinds_are_refused_before_anything_is_written(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, tmp_path: Path, kind: str
) -> None:
    private, public, _ = write_key(tmp_path / kind, kind)
    before = (adapter_dir / WEIGHTS).read_bytes()
    result = cli("project", "--base", llama_pair[0], "--aligned", llama_pair[1], adapter_dir, "--sign-key", private)
    assert result.exit_code == 1 and str(private) in result.stderr and "Ed25519" in result.stderr
    assert (adapter_dir / WEIGHTS).read_bytes() == before
    result = cli("check", adapter_dir, "--public-key", public)
    assert result.exit_code == 1 and str(public) in result.stderr
    result = cli("project", "--base", llama_pair[0], "--aligned", llama_pair[1], adapter_dir, "--sign-key", public)
    assert result.exit_code == 1 and "PKCS#8" in result.stderr


def test_without_cryptography_the_flags_are_usage_errors_naming_the_install_line(
    cli: Cli,
    llama_pair: Pair,
    signed: Path,
    keys: dict[str, tuple[Path, Path, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: threshold\n")
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    before = (signed / WEIGHTS).read_bytes()
    for args in (
        [
            "project",
            "--base",
            llama_pair[0],
            "--aligned",
            llama_pair[1],
            signed,
            "--sign-key",
            keys["ed25519"][0],
            "--force",
        ],
        ["check", signed, "--public-key", keys["ed25519"][1]],
        ["check", signed, "--policy", policy],
        ["sign", signed, "--sign-key", keys["ed25519"][0]],
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "pip install 'safelora[sign]'" in result.stderr
    assert (signed / WEIGHTS).read_bytes() == before


def test_import_and_help_do_not_import_cryptography() -> None:
    code = (
        "import sys, safelora_cli\n"
        "from safelora_cli.cli import app\n"
        "from typer.testing import CliRunner\n"
        "for args in (['--help'], ['check', '--help'], ['sign', '--help'], ['project', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "assert 'cryptography' not in sys.modules, 'cryptography imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- 5: no stale envelope, sign, rotation ----------------------------------------------------------------


def test_an_unsigned_rewrite_removes_the_envelope_and_restore_too(
    cli: Cli, signed: Path, llama_pair: Pair, keys: dict[str, tuple[Path, Path, str]]
) -> None:
    project(cli, llama_pair, signed, "--num-layers", "1")
    assert not (signed / ENVELOPE).exists()
    project(cli, llama_pair, signed, "--num-layers", "2", "--sign-key", keys["ed25519"][0])
    assert (signed / ENVELOPE).exists()
    assert cli("restore", signed).exit_code == 0
    assert not (signed / ENVELOPE).exists()


def test_output_carries_an_envelope_only_by_signing_it(
    cli: Cli, signed: Path, llama_pair: Pair, keys: dict[str, tuple[Path, Path, str]], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    project(cli, llama_pair, signed, "--output", out, "--force", "--num-layers", "1")
    assert (out / "tokenizer.json").exists() and not (out / ENVELOPE).exists()
    assert (signed / ENVELOPE).exists()  # the source is untouched
    project(cli, llama_pair, signed, "--output", out, "--force", "--num-layers", "2", "--sign-key", keys["p256"][0])
    assert check(cli, out, "--public-key", keys["p256"][1])[0] == 0
    project(cli, llama_pair, signed, "--output", out, "--force", "--num-layers", "1")
    assert not (out / ENVELOPE).exists()


def test_a_no_op_in_place_is_signed_when_asked(
    cli: Cli, llama_pair: Pair, adapter_dir: Path, keys: dict[str, tuple[Path, Path, str]]
) -> None:
    project(cli, llama_pair, adapter_dir)
    report = project(cli, llama_pair, adapter_dir, "--sign-key", keys["ed25519"][0])
    assert report["written"] is False and report["attestation"]["keyid"] == keys["ed25519"][2]
    assert check(cli, adapter_dir, "--public-key", keys["ed25519"][1])[0] == 0


def test_sign_signs_only_what_it_verifies_and_rotates_keys(
    cli: Cli,
    llama_pair: Pair,
    adapter_dir: Path,
    llama_adapter: Path,
    keys: dict[str, tuple[Path, Path, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    project(cli, llama_pair, adapter_dir, "--sign-key", keys["ed25519"][0])
    result = cli("sign", adapter_dir, "--sign-key", keys["p256"][0], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified_by"] == "local-record"
    assert check(cli, adapter_dir, "--public-key", keys["ed25519"][1])[0] == 3  # the old key no longer verifies it
    assert check(cli, adapter_dir, "--public-key", keys["ed25519"][1], "--public-key", keys["p256"][1])[0] == 0
    elsewhere(monkeypatch, tmp_path)
    before = envelope(adapter_dir)
    result = cli("sign", adapter_dir, "--sign-key", keys["other"][0])
    assert result.exit_code == 3 and "not signed" in result.stderr
    assert envelope(adapter_dir) == before
    pair = ["--base", llama_pair[0], "--aligned", llama_pair[1]]
    result = cli("sign", adapter_dir, "--sign-key", keys["other"][0], "--original", llama_adapter, *pair, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified_by"] == "recomputation"
    assert check(cli, adapter_dir, "--public-key", keys["other"][1])[0] == 0


def test_sign_refuses_a_never_sanitized_adapter(
    cli: Cli, adapter_dir: Path, keys: dict[str, tuple[Path, Path, str]]
) -> None:
    result = cli("sign", adapter_dir, "--sign-key", keys["ed25519"][0])
    assert result.exit_code == 3 and not (adapter_dir / ENVELOPE).exists()


def test_sign_without_a_key_is_a_usage_error(cli: Cli, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFELORA_SIGN_KEY", raising=False)
    result = cli("sign", adapter_dir)
    assert result.exit_code == 2 and "--sign-key" in result.stderr
    assert cli("sign", adapter_dir, "--sign-key", "k.pem", "--original", adapter_dir).exit_code == 2
