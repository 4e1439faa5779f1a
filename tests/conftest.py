"""Shared fixtures: one tiny sharded Llama pair and one real PEFT adapter, built once per session.

Importing transformers and peft costs seconds and building a model a fraction of one, so the models
are session-scoped and tests that change files get a fresh copy (``adapter_dir``).

No test reads or writes the user's stores. Before anything else is imported, HOME, the XDG
directories, safelora's cache and backup store and the Hugging Face cache move into a temporary
directory for the session, and GITHUB_STEP_SUMMARY is unset: what reads them on import
(huggingface_hub's constants) and the session-scoped fixtures see that. Each test module's
module-scoped fixtures get stores of their own, and so does each test, in its tmp_path. Processes
the tests start inherit them, and so do the fork server's children. Where safelora's stores are with
the environment the session started with is listed at its start and compared at its end: a change
fails the session and is named.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- the session's stores, set before the imports below ----------------------------------------------------

REAL_ENVIRONMENT = dict(os.environ)
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="safelora-tests-")).resolve()
_CREATOR = os.getpid()


@atexit.register
def _remove_session_root() -> None:
    """At exit, whatever the exit (``pytest --help`` and usage errors end no session); never in a forked child."""
    if os.getpid() == _CREATOR:
        shutil.rmtree(SESSION_ROOT, ignore_errors=True)


# Variables that would move a store out of HOME or HF_HOME: unset, so that nothing follows them out.
UNSET = (
    "GITHUB_STEP_SUMMARY",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "TRANSFORMERS_CACHE",
)


def stores(root: Path) -> dict[str, str]:
    """HOME, the XDG directories, safelora's cache and backup store and the Hugging Face cache, under ``root``."""
    home = root / "home"
    return {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "SAFELORA_CACHE": str(root / "cache" / "safelora"),
        "SAFELORA_BACKUPS": str(root / "data" / "originals"),
        "HF_HOME": str(root / "cache" / "hf"),
        "HF_HUB_CACHE": str(root / "cache" / "hf" / "hub"),
    }


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


SESSION_ENVIRONMENT: dict[str, str | None] = {**stores(SESSION_ROOT / "session"), **dict.fromkeys(UNSET)}
_apply(SESSION_ENVIRONMENT)
Path(os.environ["HOME"]).mkdir(parents=True)
# One matplotlib font cache for all the session's processes, built once rather than in every HOME.
os.environ["MPLCONFIGDIR"] = str(SESSION_ROOT / "matplotlib")

# transformers and huggingface_hub (imported by these) read the environment on import.
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from support import builders  # noqa: E402
from typer.testing import CliRunner, Result  # noqa: E402

from safelora_cli.cli import app  # noqa: E402
from safelora_cli.sources import hf_cache_dir  # noqa: E402
from safelora_cli.stores.backups import store_root  # noqa: E402
from safelora_cli.stores.cache import cache_root  # noqa: E402

# Hypothesis draws the same examples on every run, from a seed derived from each test, and keeps no
# example database between runs: a failure in CI reproduces on the next run and from a clean clone.
# `pytest --hypothesis-profile=explore` searches with fresh random seeds instead.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")


# --- the user's stores, as they were when the session started ----------------------------------------------


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """``values`` set (None: unset) in os.environ for the block, and what was there put back after."""
    saved = {key: os.environ.get(key) for key in values}
    _apply(values)
    try:
        yield
    finally:
        _apply(saved)


def real_stores() -> list[Path]:
    """Where safelora's cache and backup store and the Hugging Face cache are with the environment the
    session started with, and with none of the variables that move them (a test may unset one); and
    the CI job's step summary."""
    moved = {key: None for key in SESSION_ENVIRONMENT if key != "HOME"}
    found: list[Path] = []
    for overrides in ({}, moved):
        with environment({**dict.fromkeys(os.environ), **REAL_ENVIRONMENT, **overrides}):
            found += [cache_root(), store_root(), hf_cache_dir()]
    if REAL_ENVIRONMENT.get("GITHUB_STEP_SUMMARY"):
        found.append(Path(REAL_ENVIRONMENT["GITHUB_STEP_SUMMARY"]))
    return list(dict.fromkeys(path.absolute() for path in found))


def listing(paths: list[Path]) -> dict[str, object]:
    """Each path and everything under it: kind, size and modification time, or "absent"."""
    out: dict[str, object] = {}

    def entry(path: Path) -> object:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return "absent"
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(path))
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else stat.S_IFMT(st.st_mode)
        return (kind, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))

    for path in paths:
        out[str(path)] = entry(path)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != SESSION_ROOT]
            for name in dirnames + filenames:
                out[os.path.join(dirpath, name)] = entry(Path(dirpath, name))
    return out


REAL_STORES = real_stores()
REAL_STORES_BEFORE = listing(REAL_STORES)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    after = listing(REAL_STORES)
    changed = sorted(k for k in REAL_STORES_BEFORE.keys() | after.keys() if REAL_STORES_BEFORE.get(k) != after.get(k))
    if changed:
        lines = [
            f"the user's stores changed during the tests ({', '.join(map(str, REAL_STORES))}; a process"
            " outside the tests writing there at the same time shows here too):",
            *(f"  {k}: {REAL_STORES_BEFORE.get(k, 'absent')} -> {after.get(k, 'absent')}" for k in changed[:40]),
            *([f"  and {len(changed) - 40} more"] if len(changed) > 40 else []),
        ]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in lines:
            if reporter is not None:
                reporter.write_line(line, red=True)
            else:
                print(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- each module's stores and each test's ------------------------------------------------------------------


def isolate(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Move every store under ``root`` (HOME is created by whatever writes there) and unset GITHUB_STEP_SUMMARY."""
    for key, value in stores(root).items():
        monkeypatch.setenv(key, value)
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)


class SessionFixtures:
    """A session-scoped fixture is set up with the session's stores, in whichever test first asks for it.

    A plugin rather than a conftest hook: session-scoped fixtures are set up through the session's
    hooks, which a conftest.py below the rootdir is not part of.
    """

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[Any]) -> Generator[None, object, object]:
        if fixturedef.scope != "session":
            return (yield)
        with environment(SESSION_ENVIRONMENT):
            return (yield)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SessionFixtures(), "safelora-session-fixtures")


@pytest.fixture(scope="module", autouse=True)
def _module_stores(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This module's module-scoped fixtures get stores of their own (under the session's root)."""
    modules = SESSION_ROOT / "modules"
    modules.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{request.module.__name__}-", dir=modules))
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, root)
        Path(os.environ["HOME"]).mkdir()
        yield root


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's stores or those of another test, or the CI job's step summary."""
    isolate(monkeypatch, tmp_path)


@dataclass(frozen=True)
class Isolation:
    root: Path  # the session's: every module's stores are under it, and the session fixtures'
    session: Mapping[str, str | None]  # the environment of session-scoped fixtures
    real: Mapping[str, str]  # the environment the session started with
    real_stores: list[Path]  # safelora's stores with that environment, compared at the end


@pytest.fixture(scope="session")
def isolation() -> Isolation:
    return Isolation(SESSION_ROOT, SESSION_ENVIRONMENT, REAL_ENVIRONMENT, REAL_STORES)


# --- models and the CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base_dir, aligned_dir): tiny float32 Llama checkpoints, sharded with an index, GQA k/v_proj."""
    return builders.llama_pair(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_adapter(llama_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine PEFT adapter on the aligned model: q_proj/v_proj, r=8, alpha=16, random A and B.

    Session-scoped and shared: never write to it; use ``adapter_dir`` for a copy you may change.
    """
    _, aligned_dir = llama_pair
    return builders.make_adapter(aligned_dir, tmp_path_factory.mktemp("llama-adapter") / "adapter")


@pytest.fixture
def adapter_dir(llama_adapter: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``llama_adapter`` in this test's tmp_path."""
    return Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run ``safelora`` in-process: ``cli("project", "--base", base, ...)``.

    Result.stdout and Result.stderr are kept apart. Exceptions other than the exit propagate, so a
    crash fails the test with its traceback instead of posing as exit code 1.
    """
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
