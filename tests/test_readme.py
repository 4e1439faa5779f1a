"""Every `safelora` command in the README's code blocks runs, against the tiny fixtures, so the README cannot rot.

The commands run in a scratch directory laid out as the README assumes (./llama-base, ./llama-chat,
./my-adapter, ./adapters/*, sanitize.yaml, a1, a2), with the Hub repos they name served by the local
fake Hub. `...` stands for whichever of --base/--aligned/--adapter the line leaves out, as the README
says. A commit sha in a command is illustrative: it is replaced by the fake Hub's sha of that repo.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from support.fakehub import FakeHub
from typer.testing import Result

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULTS = {"--base": "./llama-base", "--aligned": "./llama-chat", "--adapter": "./my-adapter"}
HUB_REPOS = {
    "meta-llama/Llama-2-7b-hf": "base",
    "meta-llama/Llama-2-7b-chat-hf": "aligned",
    "org/base": "base",
    "org/chat": "aligned",
}
SHA = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)@[0-9a-f]{40}\b")


def readme_commands() -> list[str]:
    """Lines of the README's fenced blocks that run safelora (a leading `$ ` and env assignments allowed)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = [line.removeprefix("$ ") for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.match(r"^(\w+=\S+ )*safelora ", line)]


def test_the_readme_has_commands_to_check() -> None:
    commands = readme_commands()
    assert len(commands) >= 15
    assert {re.search(r"safelora (\w+)", c)[1] for c in commands} >= {"project", "check", "inspect", "cache"}  # type: ignore[index]


@pytest.fixture
def workdir(
    tmp_path: Path, llama_pair: tuple[Path, Path], llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, FakeHub]]:
    base, aligned = llama_pair
    hub_root = tmp_path / "hub"
    for repo, which in HUB_REPOS.items():
        src = base if which == "base" else aligned
        for commit in ("main", "v1.0"):
            (hub_root / repo).mkdir(parents=True, exist_ok=True)
            (hub_root / repo / commit).symlink_to(src)
    work = tmp_path / "work"
    work.mkdir()
    (work / "llama-base").symlink_to(base)
    (work / "llama-chat").symlink_to(aligned)
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (work / "sanitize.yaml").write_text(next(b for b in yaml_blocks if b.startswith("base: ./llama-base")))
    (work / "policy.yaml").write_text(next(b for b in yaml_blocks if b.startswith("# policy.yaml")))
    key = ed25519.Ed25519PrivateKey.generate()  # the Signing section's release.pem and release.pub
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (work / "release.pem").write_bytes(private)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (work / "release.pub").write_bytes(public)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(work)
    with FakeHub(hub_root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield work, hub


def fresh_adapters(work: Path, pristine: Path) -> None:
    """Each command starts from unprojected adapters and no earlier output."""
    for name in ("my-adapter", "a1", "a2", "adapters/x", "adapters/y", "sanitized", "out"):
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("my-adapter", "a1", "a2", "adapters/x", "adapters/y"):
        shutil.copytree(pristine, work / name)


def expand(command: str, hub: FakeHub) -> tuple[dict[str, str], list[str], str | None]:
    """(environment, argv after `safelora`, the jq filter a pipe applies) for one README line."""
    command, _, pipe = command.partition(" | ")
    command = command.split("  #", 1)[0]
    command = SHA.sub(lambda m: f"{m['repo']}@{hub.sha(m['repo'], 'main')}", command)
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[: words.index("safelora")])
    argv = words[words.index("safelora") + 1 :]
    if "..." in argv:
        i = argv.index("...")
        argv[i : i + 1] = [x for flag, value in DEFAULTS.items() if flag not in argv for x in (flag, value)]
    jq = re.fullmatch(r"jq '\.(\w+)'", pipe.strip()).group(1) if pipe else None  # type: ignore[union-attr]
    return env, argv, jq


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(
    command: str,
    workdir: tuple[Path, FakeHub],
    llama_adapter: Path,
    cli: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work, hub = workdir
    fresh_adapters(work, llama_adapter)
    env, argv, jq = expand(command, hub)
    if env.get("HF_HUB_OFFLINE"):
        # The README's offline run follows an online one that warmed the caches: do that first.
        warm = cli("project", "--base", "org/base", "--aligned", "org/chat", "--adapter", "a1", "--dry-run")
        assert warm.exit_code == 0, warm.stderr
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if argv[:2] == ["cache", "rm"]:
        cli("project", *[x for kv in DEFAULTS.items() for x in kv], "--dry-run")
        argv[2] = json.loads(cli("cache", "ls", "--json").stdout)["pairs"][0]["pair"][:6]
    if argv[0] in ("restore", "sign"):  # what it restores or signs: the README's in-place run before it
        assert cli("project", *[x for kv in DEFAULTS.items() for x in kv]).exit_code == 0
    result = cli(*argv)
    allowed = {0, 3} if argv[0] == "check" else {0}
    assert result.exit_code in allowed, f"{command}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    if jq is not None:
        assert jq in json.loads(result.stdout)


def test_a_preset_fills_in_the_base_of_its_aligned_model(
    workdir: tuple[Path, FakeHub], llama_adapter: Path, cli: Callable[..., Result]
) -> None:
    work, hub = workdir
    fresh_adapters(work, llama_adapter)
    result = cli(
        "project", "--aligned", "meta-llama/Llama-2-7b-chat-hf", "--adapter", "./my-adapter", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["base"]["source"] == "meta-llama/Llama-2-7b-hf"
    assert report["base"]["revision"] == hub.sha("meta-llama/Llama-2-7b-hf", "main")
    assert any("preset llama-2-7b" in note for note in report["notes"])
