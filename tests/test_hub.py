"""Hub sources against a local fake Hub (tests/support/fakehub.py) that counts every byte it serves.

The repos are the session's tiny Llama pair: ``org/base`` and ``org/aligned`` (branch ``main``; the
aligned repo has a second commit ``v2`` equal to the base, so V = 0 there), plus a gated, a private,
a .bin-only and a weightless repo. The CLI runs in-process with HF_ENDPOINT pointing at the server,
except where two processes must race.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import _detect_agent
from safetensors.torch import load_file
from support import builders
from support.fakehub import ENDLESS, FakeHub, Proxy, targeted
from typer.testing import Result

import safelora_cli
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import HubError
from safelora_cli.io.stfile import read_header
from safelora_cli.sources import Hub, HubRef, QuietTransfer, parse_ref
from safelora_cli.sources.hub import DEFAULT_CONNECTIONS, prefetch, resolve, transport
from safelora_cli.sources.hub.source import HubSource, open_hub
from safelora_cli.stores.cache import ProjectionCache

Cli = Callable[..., Result]
Serve = Callable[..., FakeHub]
TOKEN = "hf_SeCrEt0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_user_hub_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def hub_root(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, aligned = llama_pair
    root = tmp_path_factory.mktemp("hub")

    def commit(repo: str, name: str, files: Path) -> None:
        (root / "org" / repo).mkdir(parents=True, exist_ok=True)
        (root / "org" / repo / name).symlink_to(files)

    commit("base", "main", base)
    commit("aligned", "main", aligned)
    commit("aligned", "v2", base)
    commit("gated", "main", aligned)
    commit("private", "main", aligned)
    commit("base-bin", "main", builders.save_checkpoint(builders.load_state(base), root / "bin", "bin-sharded"))
    (root / "weightless").mkdir()
    (root / "weightless" / "config.json").write_text("{}")
    commit("weightless", "main", root / "weightless")
    return root


@pytest.fixture(scope="session")
def other_adapter(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second adapter on the same pair (other random weights)."""
    return builders.make_adapter(llama_pair[1], tmp_path_factory.mktemp("other") / "adapter", seed=1)


@pytest.fixture
def hub(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(hub_root) as server:
        server.gated["org/gated"] = {TOKEN}
        server.private.add("org/private")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def serve(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """``serve(cdn=…, rate=…, latency=…)``: a fake Hub started with those settings, at HF_ENDPOINT."""
    servers: list[FakeHub] = []

    def start(**settings: Any) -> FakeHub:
        server = FakeHub(hub_root, **settings).__enter__()
        servers.append(server)
        server.gated["org/gated"] = {TOKEN}
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def run(cli: Cli, adapter: Path, out: Path, *args: object) -> dict[str, Any]:
    """``safelora project --json --output out``; returns the report."""
    r = cli("project", "--adapter", adapter, "--output", out, "--json", *args)
    assert r.exit_code == 0, r.stderr
    report: dict[str, Any] = json.loads(r.stdout)
    return report


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / ADAPTER_FILE)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def modules(report: dict[str, Any]) -> list[str]:
    return [layer["module"] for layer in report["layers"]]


def without_cached(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's layers minus whether the cache served them."""
    return [{k: v for k, v in layer.items() if k != "cached"} for layer in report["layers"]]


def one_line_error(r: Result) -> str:
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_parse_ref() -> None:
    assert parse_ref("meta-llama/Llama-2-7b-hf") == HubRef("meta-llama/Llama-2-7b-hf", None)
    assert parse_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_ref("org/name@refs/pr/1") == HubRef("org/name", "refs/pr/1")
    for not_a_repo in ("name", "org/name/extra", "./org/name", "/abs/path", "org/name@", "org/../x", "org--x/y"):
        assert parse_ref(not_a_repo) is None, not_a_repo


def test_first_run_fetches_only_the_targeted_bytes_and_matches_the_local_run_bit_for_bit(
    cli: Cli,
    hub: FakeHub,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # huggingface_hub's user agent fetches a registry from the endpoint (once per process), unbounded.
    monkeypatch.setattr(_detect_agent, "_registry", None)
    base, aligned = llama_pair
    local = run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    remote = run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned")

    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    assert local["layers"] == remote["layers"]
    names = modules(remote)
    (b_data, b_head), (a_data, a_head) = targeted(base, names), targeted(aligned, names)
    sent = hub.sent_bytes(".safetensors")
    assert b_data + a_data <= sent <= (b_data + a_data + b_head + a_head) * 1.05
    sha = hub.sha("org/base", "main")
    assert remote["base"] | {"content": None} == {
        "source": "org/base",
        "revision": sha,
        "fingerprint": sha,
        "identity": f"org/base@{sha}",
        "content": None,
        "tensors": len(remote["layers"]),
    }
    assert remote["base"]["content"] == local["base"]["content"]  # the same weights: the same content identity
    assert (remote["cache"]["served"], remote["cache"]["computed"]) == (0, len(names))
    # After resolving the branch once, every file request names the commit.
    assert not [path for _, path in hub.requests if "/resolve/main/" in path]
    assert all(path.startswith("/api/models/org/") or "/resolve/" in path for _, path in hub.requests)
    assert hub.peak <= DEFAULT_CONNECTIONS


def test_a_second_adapter_on_the_same_pair_transfers_no_tensor_bytes(
    cli: Cli, hub: FakeHub, llama_adapter: Path, other_adapter: Path, tmp_path: Path
) -> None:
    pair = ("--base", "org/base", "--aligned", "org/aligned")
    first = run(cli, llama_adapter, tmp_path / "one", *pair)
    hub.reset()
    second = run(cli, other_adapter, tmp_path / "two", *pair)

    assert hub.sent_bytes(".safetensors") == 0
    assert [path for _, path in hub.requests] == [f"/api/models/org/{r}/revision/main" for r in ("base", "aligned")]
    assert second["bytes_read"] == 0
    assert second["cache"] == {"pair": first["cache"]["pair"], "served": len(modules(first)), "computed": 0}
    assert all(layer["cached"] for layer in second["layers"])


def test_tensors_read_back_to_back_come_in_one_request(
    cli: Cli, hub: FakeHub, llama_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    # k, o, q and v_proj lie back to back (safetensors sorts by name), in the order the adapter reads them.
    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    adapter = builders.make_adapter(llama_pair[1], tmp_path / "adapter", target_modules=attention)
    report = run(cli, adapter, tmp_path / "out", "--base", "org/base", "--aligned", "org/aligned", "--no-cache")

    runs = 0
    for model_dir in llama_pair:
        weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
        previous = None
        for m in modules(report):
            shard = weight_map[f"{m}.weight"]
            entry = read_header(model_dir / shard).tensors[f"{m}.weight"]
            runs += previous != (shard, entry.start)
            previous = (shard, entry.end)
    gets = [p for m, p in hub.requests if m == "GET" and p.endswith(".safetensors")]
    header_gets = 2 * len(set(gets))  # the 8-byte length, then the header
    assert runs < 2 * len(modules(report))
    assert len(gets) - header_gets == runs


def test_a_revision_pin_holds_when_the_branch_moves(
    cli: Cli, hub: FakeHub, llama_adapter: Path, tmp_path: Path
) -> None:
    first = run(cli, llama_adapter, tmp_path / "first", "--base", "org/base", "--aligned", "org/aligned")
    sha = first["aligned"]["revision"]
    assert sha == hub.sha("org/aligned", "main")

    hub.move("org/aligned", "main", "v2")
    pinned = run(cli, llama_adapter, tmp_path / "pinned", "--base", "org/base", "--aligned", f"org/aligned@{sha}")
    flag = run(
        cli,
        llama_adapter,
        tmp_path / "flag",
        "--base",
        "org/base",
        "--aligned",
        "org/aligned",
        "--aligned-revision",
        sha,
    )
    moved = cli(
        "project",
        "--adapter",
        llama_adapter,
        "--output",
        tmp_path / "moved",
        "--json",
        "--base",
        "org/base",
        "--aligned",
        "org/aligned",
    )

    for report, out in ((pinned, "pinned"), (flag, "flag")):
        assert report["aligned"]["revision"] == sha
        assert report["layers"] == [{**layer, "cached": True} for layer in first["layers"]]
        assert same_tensors(tmp_path / "first", tmp_path / out)
    # v2 holds the base's weights: by content it is the same checkpoint (V = 0 everywhere), refused
    # once the weights are hashed, before anything is written.
    assert moved.exit_code == 1 and "same checkpoint" in moved.stderr
    assert not (tmp_path / "moved").exists()


def test_the_revision_is_given_once(cli: Cli, hub: FakeHub, llama_adapter: Path, llama_pair: tuple[Path, Path]) -> None:
    twice = cli("project", "--adapter", llama_adapter, "--base", "org/base@main", "--base-revision", "v2")
    assert twice.exit_code == 2 and "revision given twice" in twice.stderr
    local = cli("project", "--adapter", llama_adapter, "--base", llama_pair[0], "--base-revision", "main")
    assert local.exit_code == 2 and "revisions apply to Hub repos" in local.stderr


def test_an_existing_local_directory_wins_and_hf_prefix_means_the_hub(
    cli: Cli,
    hub: FakeHub,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base").symlink_to(llama_pair[0])
    monkeypatch.chdir(tmp_path)
    local = run(cli, llama_adapter, tmp_path / "a", "--base", "org/base", "--aligned", "org/aligned")
    remote = run(cli, llama_adapter, tmp_path / "b", "--base", "hf://org/base", "--aligned", "org/aligned")

    assert local["base"]["revision"] is None
    assert remote["base"]["revision"] == hub.sha("org/base", "main")
    assert same_tensors(tmp_path / "a", tmp_path / "b")


def test_a_repo_id_in_adapter_config_is_the_aligned_default_and_check_accepts_hub_repos(
    cli: Cli, hub: FakeHub, adapter_dir: Path, tmp_path: Path
) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/aligned"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    report = run(cli, adapter_dir, tmp_path / "out", "--base", "org/base")
    assert report["aligned"]["source"] == "org/aligned"
    assert report["aligned"]["revision"] == hub.sha("org/aligned", "main")

    gate = ("check", "--adapter", tmp_path / "out", "--base", "org/base")
    assert cli(*gate, "--aligned", "org/aligned").exit_code == 0
    assert cli(*gate, "--aligned", "org/aligned@v2").exit_code == 3  # another commit: another pair


def test_offline_without_caches_fails_naming_what_is_missing(
    cli: Cli, hub: FakeHub, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert "HF_HUB_OFFLINE=1" in line and "org/base@main" in line
    assert hub.requests == []


def test_offline_with_the_commit_known_but_no_files_names_the_download_on_the_command_line(
    cli: Cli,
    hub: FakeHub,
    llama_adapter: Path,
    llama_pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The error carries the repo and commit; the command line words them as the download to run."""
    sha = hub.sha("org/base", "main")
    refs = tmp_path / "hf" / "models--org--base" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(cli("project", llama_adapter, "--base", "org/base", "--aligned", llama_pair[1], "--dry-run"))
    assert line == (
        f"error: HF_HUB_OFFLINE=1: org/base@{sha[:12]} needs model.safetensors or model.safetensors.index.json "
        f"and its shards, not in the Hugging Face cache ({tmp_path / 'hf'}); download once online "
        f"(hf download org/base --revision {sha}) or unset HF_HUB_OFFLINE"
    )
    assert hub.requests == []


def test_offline_runs_from_the_projection_cache(
    cli: Cli, hub: FakeHub, llama_adapter: Path, other_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = ("--base", "org/base", "--aligned", "org/aligned")
    first = run(cli, llama_adapter, tmp_path / "online", *pair)
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = run(cli, other_adapter, tmp_path / "offline", *pair)

    assert hub.requests == []
    assert offline["aligned"] == first["aligned"]
    assert offline["cache"]["served"] == len(modules(first))
    # Without the projection cache the shards themselves are needed, and they are not cached.
    line = one_line_error(cli("project", "--adapter", other_adapter, *pair, "--no-cache", "--dry-run"))
    assert "HF_HUB_OFFLINE=1" in line


def test_files_in_the_hugging_face_cache_are_read_without_network(
    cli: Cli,
    hub: FakeHub,
    llama_adapter: Path,
    llama_pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hf_cache = Path(os.environ["HF_HUB_CACHE"])
    for repo in ("org/base", "org/aligned"):
        snapshot_download(repo, cache_dir=hf_cache, endpoint=hub.url, token=False)
    base_sha, aligned_sha = hub.sha("org/base", "main"), hub.sha("org/aligned", "main")
    run(cli, llama_adapter, tmp_path / "local", "--base", llama_pair[0], "--aligned", llama_pair[1])
    hub.reset()

    pinned = ("--base", f"org/base@{base_sha}", "--aligned", f"org/aligned@{aligned_sha}", "--no-cache")
    run(cli, llama_adapter, tmp_path / "pinned", *pinned)
    assert hub.requests == []  # a cached commit needs no network at all
    run(cli, llama_adapter, tmp_path / "branch", "--base", "org/base", "--aligned", "org/aligned", "--no-cache")
    assert all(path.startswith("/api/models/") for _, path in hub.requests)  # a branch: one lookup each
    assert hub.sent_bytes(".safetensors") == 0
    assert same_tensors(tmp_path / "local", tmp_path / "pinned")
    assert same_tensors(tmp_path / "local", tmp_path / "branch")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    run(cli, llama_adapter, tmp_path / "offline", "--base", "org/base", "--aligned", "org/aligned", "--no-cache")
    assert hub.requests == []
    shard = sorted((hf_cache / "models--org--base" / "snapshots" / base_sha).glob("model-*.safetensors"))[0]
    shard.unlink()
    line = one_line_error(
        cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned", "--no-cache")
    )
    assert shard.name in line and "HF_HUB_OFFLINE=1" in line


@pytest.mark.parametrize(
    ("aligned", "token", "expected"),
    [
        ("org/missing", None, "org/missing: no such repository on {url}, nor a local directory of that name"),
        ("hf://org/missing", None, "error: org/missing: no such repository on "),
        ("org/aligned@nope", None, "org/aligned@nope: no such revision on "),
        ("org/weightless", None, "no model.safetensors, model.safetensors.index.json, pytorch_model.bin"),
        ("org/private", None, "org/private: access denied (HTTP 401)"),
        ("org/gated", None, "org/gated is gated: request access at {url}/org/gated"),
        ("org/gated", "hf_not_the_right_one", "org/gated is gated and the token's account has no access yet"),
    ],
)
def test_hub_errors_are_one_line_and_exit_1(
    cli: Cli, hub: FakeHub, llama_adapter: Path, aligned: str, token: str | None, expected: str
) -> None:
    args = ["project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", aligned, "--dry-run"]
    line = one_line_error(cli(*args, *(["--token", token] if token else [])))
    assert expected.format(url=hub.url) in line
    if token:
        assert token not in line


def test_a_path_with_a_typo_says_there_is_no_such_directory_and_what_the_hub_said(
    cli: Cli, hub: FakeHub, llama_adapter: Path, llama_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ex2/bse`` (meant: a local directory) parses as a Hub id: the error says both what is not on
    disk and what the Hub answered (not found, or unreachable), exit 1."""
    args = ["project", llama_adapter, "--base", "ex2/bse", "--aligned", llama_pair[1], "--dry-run"]
    line = one_line_error(cli(*args))
    assert line == f"error: ex2/bse: no such repository on {hub.url}, nor a local directory of that name"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = one_line_error(cli(*args))
    assert line.startswith(
        f"error: ex2/bse: no such local directory, and on the Hub: cannot reach http://127.0.0.1:{port}"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(cli(*args))
    assert line.startswith("error: ex2/bse: no such local directory, and on the Hub: HF_HUB_OFFLINE=1: no commit")


def test_base_and_aligned_at_one_commit_are_refused(cli: Cli, hub: FakeHub, llama_adapter: Path) -> None:
    r = cli("project", llama_adapter, "--base", "org/base", "--aligned", "hf://org/base@main", "--dry-run")
    line = one_line_error(r)
    assert "are the same checkpoint: every V = W_aligned − W_base would be 0" in line


def test_an_unreachable_hub_is_one_line_and_exit_1(
    cli: Cli, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert f"cannot reach http://127.0.0.1:{port}" in line and "HF_HUB_OFFLINE=1" in line


def test_the_token_opens_a_gated_repo_and_is_never_written_or_printed(
    cli: Cli, hub: FakeHub, llama_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = cli(
        "project", "--adapter", llama_adapter, "--output", tmp_path / "out", "--json",
        "--base", "org/base", "--aligned", "org/gated", "--token", TOKEN,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment works as well as --token
    r2 = cli("project", "--adapter", llama_adapter, "--output", tmp_path / "out2", "--json", "--base", "org/base",
             "--aligned", "org/gated", "--no-cache")  # fmt: skip
    assert r2.exit_code == 0, r2.stderr

    assert TOKEN not in r.stdout + r.stderr + r2.stdout + r2.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == ADAPTER_FILE for p in written) and any(p.suffix == ".safetensors" for p in written)
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


def test_a_bin_only_repo_is_downloaded_whole_with_a_warning(
    cli: Cli, hub: FakeHub, hub_root: Path, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    local = run(cli, llama_adapter, tmp_path / "local", "--base", llama_pair[0], "--aligned", llama_pair[1])
    r = cli("project", "--adapter", llama_adapter, "--output", tmp_path / "bin", "--json", "--base", "org/base-bin",
            "--aligned", "org/aligned", "--no-cache")  # fmt: skip
    assert r.exit_code == 0, r.stderr

    assert "has only PyTorch .bin weights" in r.stderr and " GB, into the Hugging Face cache" in r.stderr
    weight_map = json.loads((hub_root / "bin" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    needed = {weight_map[f"{m}.weight"] for m in modules(local)}
    assert hub.sent_bytes(".bin") == sum((hub_root / "bin" / f).stat().st_size for f in needed)
    assert same_tensors(tmp_path / "local", tmp_path / "bin")


@pytest.mark.parametrize("cdn", [False, True])
def test_a_dropped_connection_is_resumed_where_it_stopped(
    cli: Cli,
    serve: Serve,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cdn: bool,
) -> None:
    monkeypatch.setattr(transport, "_BACKOFF", 0.0)
    hub = serve(cdn=cdn)
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    hub.fault("drop", after=3000)
    remote = run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned")

    assert not hub.faults  # the drop happened
    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    names = modules(remote)
    (b_data, b_head), (a_data, a_head) = targeted(base, names), targeted(aligned, names)
    assert hub.sent_bytes(".safetensors") <= (b_data + a_data + b_head + a_head) * 1.05  # resumed, not restarted


def _trickled_run(cli: Cli, hub: FakeHub, adapter: Path, out: Path, interval: float) -> tuple[Result, float]:
    """A run over one connection whose tensor ranges trickle on every try."""
    for _ in range(transport.TRICKLE_RETRIES + 3):
        hub.fault("trickle", after=100, interval=interval)
    started = time.monotonic()
    r = cli("project", "--adapter", adapter, "--output", out, "--base", "org/base", "--aligned", "org/aligned",
            "--connections", 1, "--no-cache", "--quiet")  # fmt: skip
    return r, time.monotonic() - started


def test_a_trickle_is_cut_and_tried_twice_then_the_run_fails(
    cli: Cli, hub: FakeHub, llama_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes keep coming, a few at a time: they are no progress. The window shrunk to 1 s, and a
    byte every 0.8 s (the read timeout never fires): three tries, then one line, nothing written."""
    monkeypatch.setattr(transport, "STALL_WINDOW", 1.0)
    monkeypatch.setattr(transport, "_BACKOFF", 0.0)
    r, seconds = _trickled_run(cli, hub, llama_adapter, tmp_path / "out", 0.8)
    assert r.exit_code == 1
    assert "trickled" in one_line_error(r) and "2 retries" in r.stderr
    assert seconds < 15 and not (tmp_path / "out").exists()


def test_a_trickle_fails_the_run_within_75_seconds_at_the_real_figures(
    cli: Cli, hub: FakeHub, llama_adapter: Path, tmp_path: Path
) -> None:
    """20 s windows, 2 retries, a byte every 9 s (just inside the 10 s read timeout): the watchdog
    cuts each try at its window's end, not at the next byte."""
    r, seconds = _trickled_run(cli, hub, llama_adapter, tmp_path / "out", 9.0)
    assert r.exit_code == 1
    assert "trickled" in one_line_error(r)
    assert seconds < 75 and not (tmp_path / "out").exists()


def test_two_cold_runs_started_together_both_succeed_and_compute_each_entry_once(
    hub: FakeHub, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    src = str(Path(safelora_cli.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "safelora_cli", "project", "--adapter", str(llama_adapter), "--json",
           "--base", "org/base", "--aligned", "org/aligned", "--output"]  # fmt: skip
    sha = {repo: hub.sha(f"org/{repo}", "main") for repo in ("base", "aligned")}
    pair = ProjectionCache().pair(f"hub:org/base@{sha['base']}", f"hub:org/aligned@{sha['aligned']}")
    # Hold the pair's lock until both runs have missed the cold cache and wait for it: then they race.
    with pair.locked(lambda: None):
        procs = [
            subprocess.Popen([*cmd, str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in (1, 2)
        ]
        waiting = [_wait_for(p, "waiting for it") for p in procs]
    outs = [p.communicate(timeout=120) for p in procs]
    errs = [w + e.decode() for w, (_, e) in zip(waiting, outs, strict=True)]
    assert [p.returncode for p in procs] == [0, 0], errs

    reports = [json.loads(out) for out, _ in outs]
    names = modules(reports[0])
    assert sorted(r["cache"]["computed"] for r in reports) == [0, len(names)]
    assert without_cached(reports[0]) == without_cached(reports[1])
    assert same_tensors(tmp_path / "out1", tmp_path / "out2")
    (b_data, b_head), (a_data, a_head) = targeted(llama_pair[0], names), targeted(llama_pair[1], names)
    assert hub.sent_bytes(".safetensors") <= (b_data + a_data + b_head + a_head) * 1.05  # fetched once


def _wait_for(proc: subprocess.Popen[bytes], text: str) -> str:
    """Read ``proc``'s stderr until ``text`` appears (or it exits); returns what was read."""
    assert proc.stderr is not None
    seen = ""
    while text not in seen:
        line = proc.stderr.readline().decode()
        if not line:
            break
        seen += line
    return seen


# -- parallel ranged reads ---------------------------------------------------------------------------


def open_repo(hub: FakeHub, tmp_path: Path, connections: int, repo: str = "org/base") -> HubSource:
    settings = Hub(
        endpoint=hub.url, token=None, hf_cache=tmp_path / "hf-cache", offline=False, refs=None, connections=connections
    )
    return open_hub(HubRef(repo, None), settings, QuietTransfer())


def local_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(shard).items()}


def header_bytes(model_dir: Path) -> int:
    return sum(read_header(shard).data_start for shard in model_dir.glob("*.safetensors"))


@pytest.mark.parametrize("connections", [1, 8])
def test_every_tensor_arrives_intact_over_1_or_8_connections_in_small_pieces(
    serve: Serve, llama_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connections: int
) -> None:
    monkeypatch.setattr(prefetch, "_RANGE_BYTES", 4096)  # tensors span pieces, pieces span tensors
    hub = serve(cdn=True)
    expected = local_tensors(llama_pair[0])
    source = open_repo(hub, tmp_path, connections)
    try:
        names = sorted(source.names())
        # In file order first (back to back: coalesced), then backwards (one range each), one name twice.
        order = names + names[::-1][:6]
        source.plan(order)
        read = [n for i, n in enumerate(order) if i % 3 != 1]  # the pipeline may skip planned reads
        buf = bytearray(max(source.nbytes(n) for n in names))
        for name in read:
            assert torch.equal(source.read(name, buf), expected[name]), name
        assert torch.equal(source.read(names[0]), expected[names[0]])  # not planned (any more): fetched alone
    finally:
        source.close()
    assert 0 < hub.peak <= connections


@pytest.mark.parametrize("connections", [3, 8])
def test_base_and_aligned_share_the_connections_and_keep_all_of_them_busy(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connections: int
) -> None:
    monkeypatch.setattr(prefetch, "_RANGE_BYTES", 4096)
    hub = serve(cdn=True, latency=0.1)  # every answer late: requests overlap
    base = open_repo(hub, tmp_path, connections, "org/base")
    aligned = open_repo(hub, tmp_path, connections, "org/aligned")
    try:
        planned, size = [], 0
        for name in sorted(base.names()):
            planned.append(name)
            size += base.nbytes(name)
            if size >= 2 * connections * 4096:
                break
        base.plan(planned)
        aligned.plan(planned)
        for name in planned:  # as the pipeline reads: a module's base weight, then its aligned one
            base.read(name)
            aligned.read(name)
    finally:
        base.close()
        aligned.close()
    assert hub.peak == connections  # not twice as many: the two checkpoints share them


def test_what_is_fetched_ahead_stays_within_the_byte_budget(
    serve: Serve, llama_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piece, connections = 4096, 4
    monkeypatch.setattr(prefetch, "_RANGE_BYTES", piece)
    hub = serve()
    source = open_repo(hub, tmp_path, connections)
    ahead = []
    try:
        names = sorted(source.names())
        source.plan(names)
        consumed, headers = 0, header_bytes(llama_pair[0])
        for name in names:
            time.sleep(0.02)  # a slow reader: the workers fetch what the budget allows
            ahead.append(hub.sent_bytes(".safetensors") - headers - consumed)
            consumed += source.read(name).nbytes
    finally:
        source.close()
    assert consumed > 10 * (connections + 4) * piece
    # Every connection busy and two pieces ready; a piece a reader waits for, one it has half read.
    assert max(ahead) <= (connections + 4) * piece
    assert max(ahead) >= connections * piece  # fetched ahead, several pieces at once


@pytest.mark.parametrize("target", ["header", "data"])
def test_a_range_answered_with_the_whole_file_is_refused_unread(
    cli: Cli, hub: FakeHub, llama_adapter: Path, tmp_path: Path, target: str
) -> None:
    hub.fault("full", target=target)  # 200 and an endless body
    out = tmp_path / "out"
    args = ("--output", out, "--base", "org/base", "--aligned", "org/aligned")
    line = one_line_error(cli("project", "--adapter", llama_adapter, *args))
    assert "did not honour the byte range (HTTP 200)" in line and "org/base@" in line
    assert hub.bogus_sent < ENDLESS // 1000  # hung up after the status line, not after the body
    assert not out.exists()


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "content-range", "content_range": "bytes 0-{end}/{size}"},  # another start
        {"kind": "content-range", "content_range": "bytes {start}-{start}/{size}"},  # another end
        {"kind": "content-range", "content_range": "bytes {start}-{end}/999999999"},  # another file
        {"kind": "content-range", "content_range": "bytes {start}-{end}/999999999", "target": "header"},
        {"kind": "content-range", "content_range": "bytes {start}-{end}/*"},
        {"kind": "content-range", "content_range": ""},
        {"kind": "content-length"},  # one byte more than asked
    ],
)
def test_an_answer_that_is_not_exactly_the_range_asked_is_refused(
    cli: Cli, hub: FakeHub, llama_adapter: Path, fault: dict[str, str]
) -> None:
    hub.fault(**fault)
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert "asked for" in line and "ranged reads need a Hub endpoint or mirror that honours byte ranges" in line


def test_a_body_longer_than_the_range_is_not_read_past_it(
    cli: Cli, hub: FakeHub, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    hub.fault("longer")  # the range, unframed, then zeros without end
    run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned")
    assert not hub.faults
    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    assert hub.bogus_sent < ENDLESS // 1000


@pytest.mark.parametrize(("target", "status"), [("data", 429), ("data", 503), ("info", 429)])
def test_retry_after_is_honoured(
    cli: Cli,
    hub: FakeHub,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    target: str,
    status: int,
) -> None:
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    hub.fault("status", target=target, status=status, headers={"Retry-After": "1"})
    run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned")

    refused = next(a for a in hub.log if a.status == status)
    retried = next(a for a in hub.log if (a.path, a.range) == (refused.path, refused.range) and a != refused)
    assert retried.status in (200, 206)
    assert retried.time - refused.time >= 1.0
    assert same_tensors(tmp_path / "local", tmp_path / "hub")


def test_a_server_asking_to_wait_for_hours_is_not_waited_for(cli: Cli, hub: FakeHub, llama_adapter: Path) -> None:
    hub.fault("status", status=429, headers={"Retry-After": "86400"})
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert "asks to wait 86400 s" in line and "run again later" in line


def test_the_token_stays_with_the_hub_and_each_file_is_resolved_once(
    cli: Cli, serve: Serve, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    hub = serve(cdn=True)  # resolve URLs redirect to a storage server on another port: another origin
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/gated", "--token", TOKEN)

    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    assert f"Bearer {TOKEN}" in hub.authorizations["hub"]
    assert hub.authorizations["storage"] and not any(hub.authorizations["storage"])
    resolved = Counter(path for method, path in hub.requests if "/resolve/" in path)
    assert resolved and set(resolved.values()) == {1}  # the signed URL serves every later range
    assert {a.status for a in hub.log if a.server == "hub" and a.path.endswith(".safetensors")} == {302}


def test_an_expired_signed_url_is_resolved_again(
    cli: Cli, serve: Serve, llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path
) -> None:
    hub = serve(cdn=True)
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    hub.expire_after = 6  # then every signed URL given so far is refused: 403 "Request has expired"
    run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned")

    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    assert 403 in {a.status for a in hub.log if a.server == "storage"}
    resolved = Counter(path for method, path in hub.requests if "/resolve/" in path)
    assert max(resolved.values()) >= 2


@pytest.mark.parametrize(
    ("status", "body", "resolved_again"),
    [
        (400, b"<Error><Code>ExpiredToken</Code>The token has expired</Error>", True),
        (410, b"", True),
        (404, b"", False),
    ],
)
def test_a_storage_refusal_that_says_expired_resolves_again_and_any_other_is_an_error(
    cli: Cli,
    serve: Serve,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    status: int,
    body: bytes,
    resolved_again: bool,
) -> None:
    hub = serve(cdn=True)
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    hub.fault("status", status=status, body=body)
    args = ("project", "--adapter", llama_adapter, "--output", tmp_path / "hub", "--base", "org/base")
    r = cli(*args, "--aligned", "org/aligned")
    if resolved_again:
        assert r.exit_code == 0, r.stderr
        assert same_tensors(tmp_path / "local", tmp_path / "hub")
    else:
        assert f"HTTP {status}" in one_line_error(r)


def test_a_proxy_from_the_environment_carries_every_request(
    cli: Cli,
    serve: Serve,
    llama_pair: tuple[Path, Path],
    llama_adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = serve(cdn=True)
    base, aligned = llama_pair
    run(cli, llama_adapter, tmp_path / "local", "--base", base, "--aligned", aligned, "--no-cache")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with Proxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        run(cli, llama_adapter, tmp_path / "hub", "--base", "org/base", "--aligned", "org/aligned", "--no-cache")

    assert same_tensors(tmp_path / "local", tmp_path / "hub")
    assert len(proxy.urls) == len(hub.requests) + len(hub.storage_requests)
    assert any(u.startswith(hub.storage_url) for u in proxy.urls)


def test_ctrl_c_stops_the_transfers_and_exits_130(serve: Serve, llama_adapter: Path, tmp_path: Path) -> None:
    hub = serve()
    hub.fault("stall", after=100)  # one range hangs (for a minute); the run reads everything else, then waits
    src = str(Path(safelora_cli.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_DOWNLOAD_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "safelora_cli", "project", "--adapter", str(llama_adapter), "--dry-run",
           "--base", "org/base", "--aligned", "org/aligned"]  # fmt: skip
    # Ctrl-C as a terminal sends it, whatever this test runner inherited: a runner started in the
    # background by a non-interactive shell ignores SIGINT, and its children would inherit that.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline, quiet = time.monotonic() + 30, 0
        while quiet < 10 and proc.poll() is None and time.monotonic() < deadline:
            quiet = quiet + 1 if hub.faults == [] and hub.active == 1 else 0  # only the stalled range left
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # without cancelling, the reader would wait out the stall
    finally:
        proc.kill()
    assert quiet == 10
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err


@pytest.mark.parametrize("target", ["info", "index"])
def test_a_document_without_end_is_refused_at_its_size_cap(
    cli: Cli, hub: FakeHub, llama_adapter: Path, target: str
) -> None:
    hub.fault("endless", target=target)
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert "more than such a file may have" in line
    assert hub.bogus_sent < ENDLESS // 1000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"sha": "%s", "sha": "%s", "siblings": []}', "not valid JSON (duplicate key 'sha')"),
        (b'{"sha": "%s", "siblings": [{"rfilename": 7}]}', "list of the repo's files is malformed"),
        (b'{"sha": "%s-not-a-sha"}', "did not say which commit this is"),
    ],
)
def test_the_model_info_is_parsed_strictly(
    cli: Cli, hub: FakeHub, llama_adapter: Path, body: bytes, expected: str
) -> None:
    sha = hub.sha("org/base", "main").encode()
    hub.fault("status", target="info", status=200, body=body.replace(b"%s", sha))
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert expected in line


def test_server_error_text_is_one_short_line(cli: Cli, hub: FakeHub, llama_adapter: Path) -> None:
    body = json.dumps({"error": "first line\nsecond line\r\n" + "x" * 5000}).encode()
    hub.fault("status", target="info", status=400, body=body, headers={"Content-Type": "application/json"})
    line = one_line_error(cli("project", "--adapter", llama_adapter, "--base", "org/base", "--aligned", "org/aligned"))
    assert "HTTP 400 (first line second line xxx" in line and len(line) < 400


def test_redirects_are_http_and_never_downgrade() -> None:
    settings = Hub(endpoint="https://huggingface.co", token=None, hf_cache=Path("hf-cache"), offline=False, refs=None)
    server = resolve.server(settings, "org/name")
    here = transport.httpx2.URL("https://huggingface.co/org/name/resolve/abc/model.safetensors")
    assert str(transport._redirect(here, "https://cdn.example/x?sig=1", server, "f")) == "https://cdn.example/x?sig=1"
    assert (
        str(transport._redirect(here, "/api/resolve-cache/x", server, "f"))
        == "https://huggingface.co/api/resolve-cache/x"
    )
    for location in ("http://cdn.example/x", "file:///etc/passwd", "", None):
        with pytest.raises(HubError, match="redirect"):
            transport._redirect(here, location, server, "f")


@pytest.mark.parametrize("fifo", ["shard", "index", "ref"])
def test_a_fifo_in_the_hugging_face_cache_is_refused_without_blocking(
    llama_pair: tuple[Path, Path], llama_adapter: Path, tmp_path: Path, fifo: str
) -> None:
    base, aligned = llama_pair
    sha = FakeHub.sha("org/base", "main")
    repo = tmp_path / "hf" / "models--org--base"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in base.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    target = {
        "shard": snapshot / sorted(base.glob("model-*.safetensors"))[0].name,
        "index": snapshot / "model.safetensors.index.json",
        "ref": repo / "refs" / "main",
    }[fifo]
    target.unlink()
    os.mkfifo(target)
    src = str(Path(safelora_cli.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "safelora_cli", "project", "--adapter", str(llama_adapter), "--dry-run",
           "--no-cache", "--base", "org/base", "--aligned", str(aligned)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and f"{target.name}: is a FIFO, not a regular file" in err
