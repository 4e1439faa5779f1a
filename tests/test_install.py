"""A fresh machine: what ``make install`` checks, where it gets torch from and what it reports, and a
test suite that draws the same examples on every run.

``.ci/install --dry-run`` runs the interpreter checks and the index probe for real and prints the
commands that would install (``+ cmd``, shell-quoted) instead of running them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / ".ci" / "install"
TORCH_BUILD = ROOT / ".ci" / "torch-build"
PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install(
    tmp_path: Path, index: str, python: str = sys.executable, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """``.ci/install --dry-run`` into ``tmp_path/venv``; proxies bypassed, every index here is local."""
    env = {
        **os.environ,
        "PYTHON": python,
        "VENV": str(tmp_path / "venv"),
        "MLX_VENV": str(tmp_path / "venv-mlx"),
        "TORCH": PIN,
        "TORCH_INDEX": index,
        "no_proxy": "*",
        "NO_PROXY": "*",
        **extra_env,
    }
    return subprocess.run([INSTALL, "--dry-run"], env=env, capture_output=True, text=True, timeout=30)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def planned(tmp_path: Path, *torch_options: str) -> list[list[str]]:
    """The commands of an install into ``tmp_path/venv`` whose torch step has ``torch_options``."""
    venv, mlx = tmp_path / "venv", tmp_path / "venv-mlx"
    pip = str(venv / "bin" / "pip")
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [pip, "install", "--quiet", "--upgrade", "pip"],
        [pip, "install", "--quiet", *torch_options, PIN],
        [pip, "install", "--quiet", "-e", ".[test]"],
        [sys.executable, "-m", "venv", str(mlx)],
        [str(mlx / "bin" / "pip"), "install", "--quiet", "mlx[cpu]==0.32.4", "mlx-lm==0.32.2"],
        *_llama_cpp_reference(venv, pip),
        [str(venv / "bin" / "python"), ".ci/torch-build"],
    ]


def _llama_cpp_reference(venv: Path, pip: str) -> list[list[str]]:
    """The GGUF tests' reference: llama.cpp's converter from the pinned llama-cpp-python sdist, under the venv."""
    sdist_dir = venv / ".sdist"
    top = "llama_cpp_python-0.3.36/vendor/llama.cpp"
    return [
        [
            pip,
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(sdist_dir),
            "llama-cpp-python==0.3.36",
        ],
        [
            "tar",
            "-xzf",
            str(sdist_dir / "llama_cpp_python-0.3.36.tar.gz"),
            "-C",
            str(venv),
            "--wildcards",
            f"{top}/convert_lora_to_gguf.py",
            f"{top}/convert_hf_to_gguf.py",
            f"{top}/conversion/*",
            f"{top}/gguf-py/*",
        ],
        ["rm", "-f", str(sdist_dir / "llama_cpp_python-0.3.36.tar.gz")],
    ]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _Index(BaseHTTPRequestHandler):
    """A package index that lists torch under /whl/cpu/ and nothing else."""

    def do_GET(self) -> None:
        found = self.path == "/whl/cpu/torch/"
        body = b'<a href="torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl">torch</a>' if found else b"not here"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def index() -> Iterator[str]:
    """http://127.0.0.1:PORT, serving ``_Index``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def trickle() -> Iterator[str]:
    """A server that answers every request one byte every 0.2 s and never finishes its headers: no
    socket timeout ever fires, and only a deadline on the whole request ends the wait."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:  # closed before anything connected: the test failed earlier
            return
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.2):
                try:
                    conn.sendall(b"a")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/whl/cpu"
    stop.set()
    listener.close()
    thread.join(timeout=5)


def test_torch_comes_from_the_index_when_it_answers(tmp_path: Path, index: str) -> None:
    """--index-url for torch alone: pip sees no other index for it, and the rest come from pip's own."""
    result = install(tmp_path, f"{index}/whl/cpu")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"installing {PIN} from {index}/whl/cpu\n" in result.stdout
    assert commands(result.stdout) == planned(tmp_path, "--index-url", f"{index}/whl/cpu")


def assert_installs_as_before_with_a_warning(
    result: subprocess.CompletedProcess[str], tmp_path: Path, url: str
) -> None:
    """torch from pip's configured indexes, and one line on stderr that says so and how to get the other."""
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == planned(tmp_path)
    [warning] = result.stderr.splitlines()
    assert warning.startswith(f"warning: {url} did not answer within 5 s, so {PIN} comes from pip's configured")
    assert "without a local CPU wheel, that is the CUDA build" in warning
    fix = shlex.split(warning.partition(" instead: ")[2])
    pip = str(tmp_path / "venv" / "bin" / "pip")
    assert fix == [pip, "install", "--force-reinstall", "--no-deps", "--index-url", url, PIN]


def test_a_dead_index_installs_as_before_with_a_warning(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    assert_installs_as_before_with_a_warning(install(tmp_path, dead), tmp_path, dead)


def test_an_index_without_torch_counts_as_dead(tmp_path: Path, index: str) -> None:
    assert_installs_as_before_with_a_warning(install(tmp_path, f"{index}/whl/cu999"), tmp_path, f"{index}/whl/cu999")


def test_an_index_that_never_finishes_answering_is_given_up_on(tmp_path: Path, trickle: str) -> None:
    assert_installs_as_before_with_a_warning(install(tmp_path, trickle), tmp_path, trickle)


def test_an_empty_index_means_pips_configured_ones_without_a_warning(tmp_path: Path) -> None:
    """TORCH_INDEX= is how to ask for PyPI's build (CUDA on Linux) on purpose."""
    result = install(tmp_path, "")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"installing {PIN} from pip's configured indexes\n" in result.stdout
    assert commands(result.stdout) == planned(tmp_path)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_asks_for_the_pinned_torch_from_the_cpu_index(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", ROOT, "install", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.endswith(".ci/install")]
    assert f"TORCH='{PIN}'" in line and f"TORCH_INDEX='{CPU_INDEX}'" in line


def fake_python(tmp_path: Path, version: str, stream: str) -> str:
    """An executable that answers --version with ``version``, as Python 2.7 does on stderr or later
    ones on stdout, and nothing else."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\necho '{version}' {'>&2' if stream == 'stderr' else ''}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(("version", "stream"), [("Python 3.9.18", "stdout"), ("Python 2.7.18", "stderr")])
def test_a_python_older_than_3_10_is_named_with_the_fix(tmp_path: Path, version: str, stream: str) -> None:
    python = fake_python(tmp_path, version, stream)
    result = install(tmp_path, CPU_INDEX, python)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {python} is {version} and safelora needs Python 3.10 or newer: "
        "install one and run make with PYTHON=python3.12, for example\n"
    )


def test_a_program_that_is_not_python_is_named_with_the_fix(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "PyPy-like 7.3", "stdout")
    result = install(tmp_path, CPU_INDEX, python)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {python} does not say which Python it is (--version: 'PyPy-like 7.3'): "
        "name a Python 3.10 or newer with make PYTHON=python3.12, for example\n"
    )


def test_a_missing_python_is_named_with_the_fix(tmp_path: Path) -> None:
    result = install(tmp_path, CPU_INDEX, str(tmp_path / "python3"))
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {tmp_path / 'python3'} not found: install Python 3.10 or newer, "
        "or name one with make PYTHON=/path/to/python3\n"
    )


def test_a_python_without_ensurepip_names_the_debian_package(tmp_path: Path) -> None:
    """Debian's and Ubuntu's python3 lack ensurepip until pythonX.Y-venv is installed; the real
    interpreter stands in for theirs, with an ensurepip that is not there."""
    (tmp_path / "stdlib-gaps").mkdir()
    (tmp_path / "stdlib-gaps" / "ensurepip.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n"
    )
    result = install(tmp_path, CPU_INDEX, PYTHONPATH=str(tmp_path / "stdlib-gaps"))
    assert result.returncode == 1
    assert result.stdout == ""
    major, minor, micro = sys.version_info[:3]
    assert result.stderr == (
        f"error: {sys.executable} (Python {major}.{minor}.{micro}) cannot create a venv, its ensurepip module is "
        f"missing: on Debian or Ubuntu, sudo apt install python{major}.{minor}-venv\n"
    )


def test_torch_build_names_the_build_this_python_has() -> None:
    result = subprocess.run([sys.executable, TORCH_BUILD], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"torch {torch.__version__}: the ")
    assert result.stdout.endswith(" build\n")


@pytest.mark.parametrize(
    ("cuda", "hip", "build"), [(None, None, "CPU"), ("12.8", None, "CUDA 12.8"), (None, "6.4.4", "ROCm 6.4.4")]
)
def test_torch_build_tells_cpu_cuda_and_rocm_apart(
    tmp_path: Path, cuda: str | None, hip: str | None, build: str
) -> None:
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "2.13.0+x"\nfrom . import version\n')
    (fake / "version.py").write_text(f"cuda = {cuda!r}\nhip = {hip!r}\n")
    result = subprocess.run(
        [sys.executable, TORCH_BUILD],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"torch 2.13.0+x: the {build} build\n"


def test_hypothesis_draws_the_same_examples_on_every_run(request: pytest.FixtureRequest) -> None:
    """The suite's tests set their own limits (max_examples, deadline) and take the seed and the
    example database from the profile conftest loads: a fixed seed per test, no database."""
    if request.config.getoption("--hypothesis-profile") not in (None, "ci"):
        pytest.skip("another Hypothesis profile was asked for")
    assert settings().database is None
    runs: list[list[bytes]] = []

    @settings(max_examples=20, deadline=None)
    @given(st.binary(min_size=8))
    def draw(data: bytes) -> None:
        runs[-1].append(data)

    for _ in range(2):
        runs.append([])
        draw()
    assert runs[0] == runs[1]
