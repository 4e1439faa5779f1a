"""Shared fixtures: one tiny sharded Llama pair and one real PEFT adapter, built once per session.

Importing transformers and peft costs seconds and building a model a fraction of one, so the models
are session-scoped and tests that change files get a fresh copy (``adapter_dir``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from support import builders
from typer.testing import CliRunner, Result

from safelora_cli.cli import app

# Hypothesis draws the same examples on every run, from a seed derived from each test, and keeps no
# example database between runs: a failure in CI reproduces on the next run and from a clean clone.
# `pytest --hypothesis-profile=explore` searches with fresh random seeds instead.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's safelora caches, backups or Hugging Face cache, or the CI
    job's step summary."""
    monkeypatch.setenv("SAFELORA_CACHE", str(tmp_path / "cache" / "safelora"))
    monkeypatch.setenv("SAFELORA_BACKUPS", str(tmp_path / "data" / "originals"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache" / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache" / "hf" / "hub"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


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
