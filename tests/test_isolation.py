"""The tests themselves: none of them, nor any fixture or process they start, sees the user's stores.

conftest.py moves HOME, the XDG directories, safelora's cache and backup store and the Hugging Face
cache into the session's temporary directory before anything is imported, into one per test module
for module-scoped fixtures, and into tmp_path for each test; and fails the session when the stores
safelora would use with the environment it started with have changed by its end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.forkserver import ForkServer, Run

from safelora_cli.sources import hf_cache_dir
from safelora_cli.stores.backups import store_root
from safelora_cli.stores.cache import cache_root

STORES = (
    "HOME",
    "XDG_CACHE_HOME",
    "XDG_DATA_HOME",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
    "SAFELORA_CACHE",
    "SAFELORA_BACKUPS",
    "HF_HOME",
    "HF_HUB_CACHE",
)
TESTS = Path(__file__).parent
UNSET = ("GITHUB_STEP_SUMMARY", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE")  # among what conftest unsets

if TYPE_CHECKING:
    from conftest import Isolation


def environment() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in (*STORES, *UNSET)}


def assert_isolated(env: Mapping[str, str | None], under: Path, isolation: Isolation) -> None:
    for key in STORES:
        value = env[key]
        assert value is not None, f"{key} is not set"
        assert Path(value).is_relative_to(under), f"{key}={value} is not under {under}"
        if isolation.real.get(key):
            assert value != isolation.real[key]
    for key in UNSET:
        assert env[key] is None, f"{key} is set"


@pytest.fixture(scope="session")
def session_environment() -> dict[str, str | None]:
    return environment()


@pytest.fixture(scope="module")
def module_environment() -> dict[str, str | None]:
    return environment()


@pytest.fixture(scope="module")
def module_stores() -> dict[str, Path]:
    """What a module-scoped fixture that writes would write to."""
    return {"cache": cache_root(), "backups": store_root(), "hf": hf_cache_dir(), "home": Path.home()}


def test_module_fixtures_see_this_modules_stores(
    module_environment: dict[str, str | None],
    module_stores: dict[str, Path],
    isolation: Isolation,
) -> None:
    assert_isolated(module_environment, isolation.root / "modules", isolation)
    for key in STORES:
        assert module_environment[key] != isolation.session[key], key
    assert Path(module_environment["HOME"] or "").is_dir()
    for name, path in module_stores.items():
        assert path.is_relative_to(isolation.root / "modules"), (name, path)
        for real in isolation.real_stores:
            assert not path.is_relative_to(real) and not real.is_relative_to(path), (name, path, real)


def test_session_fixtures_see_the_sessions_stores(
    session_environment: dict[str, str | None], isolation: Isolation
) -> None:
    # Not this module's first test: the fixture is first asked for while this module's stores are
    # set (a module's first test sets up session fixtures before module ones), and still gets the session's.
    assert os.environ["HOME"] != isolation.session["HOME"]
    assert_isolated(session_environment, isolation.root / "session", isolation)
    assert session_environment == {key: isolation.session.get(key) for key in session_environment}


def test_each_test_has_stores_of_its_own(
    tmp_path: Path, module_environment: dict[str, str | None], isolation: Isolation
) -> None:
    assert_isolated(environment(), tmp_path, isolation)
    for key in STORES:
        assert os.environ[key] != module_environment[key], key
    assert cache_root().is_relative_to(tmp_path) and store_root().is_relative_to(tmp_path)
    assert hf_cache_dir().is_relative_to(tmp_path) and Path.home().is_relative_to(tmp_path)


def test_the_real_stores_are_the_users(isolation: Isolation) -> None:
    # what the session compares at its end: found with the environment the session started with
    home = Path(isolation.real.get("HOME") or Path("~").expanduser())
    if not any(isolation.real.get(k) for k in ("SAFELORA_CACHE", "XDG_CACHE_HOME")):
        assert home / ".cache" / "safelora" in isolation.real_stores
    if not any(isolation.real.get(k) for k in ("SAFELORA_BACKUPS", "XDG_DATA_HOME")):
        assert home / ".local" / "share" / "safelora" / "originals" in isolation.real_stores
    assert not any(path.is_relative_to(isolation.root) for path in isolation.real_stores)


def test_a_process_a_test_starts_inherits_its_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFELORA_BACKUPS")
    monkeypatch.delenv("XDG_DATA_HOME")  # so the store is found from HOME
    done = subprocess.run(
        [sys.executable, "-m", "safelora_cli", "cache", "ls"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"no original is kept in {tmp_path / 'home' / '.local' / 'share' / 'safelora' / 'originals'}" in done.stdout


@pytest.fixture(scope="module")
def forkserver() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def test_the_fork_servers_children_get_the_tests_stores(
    forkserver: ForkServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server started with this module's stores; its children must use this test's.
    monkeypatch.delenv("SAFELORA_BACKUPS")
    monkeypatch.delenv("XDG_DATA_HOME")
    runs = [Run(["cache", "ls"], tmp_path / "out", tmp_path / "err")]
    assert forkserver.run(runs).status == [0], (tmp_path / "err").read_text()
    expected = tmp_path / "home" / ".local" / "share" / "safelora" / "originals"
    assert f"no original is kept in {expected}" in (tmp_path / "out").read_text()
    assert forkserver.run(runs, {"SAFELORA_BACKUPS": str(tmp_path / "given")}).status == [0]
    assert f"no original is kept in {tmp_path / 'given'}" in (tmp_path / "out").read_text()


_PLANTS = textwrap.dedent(
    """
    import os
    from pathlib import Path


    def test_plants_a_file_in_the_real_cache_and_touches_a_kept_original():
        Path(os.environ["PLANT_IN"]).mkdir(parents=True)
        (Path(os.environ["PLANT_IN"]) / "planted").write_text("x")
        with open(os.environ["TOUCH"], "a") as f:
            f.write("more")
    """
)


def test_a_session_that_changes_the_users_stores_fails_and_names_the_paths(tmp_path: Path) -> None:
    # A session of its own, with this conftest, whose "user" has this test's stores: one test, that
    # passes, writes into them; the session must fail and say where.
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(TESTS / "conftest.py", inner / "conftest.py")
    (inner / "support").mkdir()
    (inner / "support" / "__init__.py").write_text("")
    (inner / "support" / "builders.py").write_text("")  # no models are needed: no transformers or peft to import
    (inner / "test_plants.py").write_text(_PLANTS)
    store = Path(os.environ["SAFELORA_BACKUPS"])
    store.mkdir(parents=True)
    (store / "kept.json").write_text("{}")
    env = {
        **os.environ,
        "PLANT_IN": str(Path(os.environ["SAFELORA_CACHE"]) / "pairs"),
        "TOUCH": str(store / "kept.json"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=", str(inner)],
        cwd=inner,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "the user's stores changed during the tests" in done.stdout
    assert f"{Path(os.environ['SAFELORA_CACHE']) / 'pairs' / 'planted'}: absent -> ('file'" in done.stdout
    assert f"{store / 'kept.json'}: ('file', 2," in done.stdout
