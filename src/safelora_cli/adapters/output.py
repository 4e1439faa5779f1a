"""``--output``: a complete adapter directory written beside the source, which stays untouched.

The new weights, the config as read, and a copy of what else belongs to the adapter: regular files
and subdirectories, and a symlink only when it opens a file inside the adapter directory (or, for a
Hugging Face cache snapshot, that repo's ``blobs/``). The copy goes through directory descriptors
and never follows a link it did not check. From a Trainer checkpoint only the adapter's own files
are copied (``checkpoint.ADAPTER_FILES``): never the optimizer, scheduler, RNG or trainer state, the
training arguments, an earlier ``safelora/`` or DeepSpeed's ``global_step*/``. The output itself,
when it lies inside the adapter directory (``<checkpoint>/safelora``), is never copied into itself.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, OutputError, OutputNotEmptyError
from ..io import atomic, ranges, safefs
from ..io.atomic import TMP_MARK
from ..io.ranges import Data
from .base import Adapter
from .checkpoint import ADAPTER_FILES, training_state
from .location import ENVELOPE_SUFFIX
from .lora_config import CONFIG_FILE

if TYPE_CHECKING:
    pass

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def write_output(
    adapter: Adapter, output: Path, chunks: list[Data], mode: int, overwrite: bool, notes: list[str]
) -> Path:
    """A complete adapter directory at ``output``: the new weights, the config as read, and a copy of
    every other regular file of the adapter directory (``_copy_tree`` says which).

    A new or empty ``output`` appears whole or not at all: the directory is assembled beside it and
    renamed into place, so a failure or a crash leaves it as it was (a killed run's temp directory
    is removed by the next run that writes there). Reusing a non-empty one (--force) replaces its
    files one by one, each by a rename, so a symlink found there is replaced, never followed.
    """
    st = _usable(output, adapter.dir.identity)
    parent_path = output.absolute().parent
    try:
        parent_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(safefs.os_error(parent_path, e)) from None
    with safefs.Directory(parent_path, OutputError, fix="it cannot hold the output") as parent:
        if st is not None:
            with _open_subdir(parent.fd, output.name, output) as out:
                if os.listdir(out.fd):
                    if not overwrite:
                        raise OutputNotEmptyError(f"{output}: exists and is not empty")
                    try:
                        _fill(adapter, output, out, chunks, mode, notes)
                    except OSError as e:
                        raise OutputError(
                            f"{output}: write failed ({e.strerror}) while replacing its files; some may be new, "
                            "some old. Free some space, then run again"
                        ) from None
                    return output / adapter.file.name
        return _assemble(adapter, parent, output, chunks, mode, notes)


def check_output(output: Path, adapter: tuple[int, int], *, overwrite: bool) -> None:
    """What ``write_output`` refuses before writing a byte, for a run that checks first (a dry run
    checks exactly what the run would): a link, a file, the adapter directory (``adapter``, its
    identity) itself, and, unless ``overwrite``, a directory that holds files."""
    st = _usable(output, adapter)
    if st is None or overwrite:
        return
    try:
        held = os.listdir(output)
    except OSError as e:
        raise OutputError(safefs.os_error(output, e)) from None
    if held:
        raise OutputNotEmptyError(f"{output}: exists and is not empty")


def _usable(output: Path, adapter: tuple[int, int]) -> os.stat_result | None:
    """``output``'s lstat (None when missing), unless it is a link, not a directory, or the adapter's own."""
    st = _lstat(output)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{output}: is a symbolic link; give the directory it points to")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{output}: exists and is not a directory")
    if st is not None and (st.st_dev, st.st_ino) == adapter:
        raise OutputError(f"{output}: is the adapter directory itself; to patch it in place, give no output")
    return st


def _assemble(
    adapter: Adapter,
    parent: safefs.Directory,
    output: Path,
    chunks: list[Data],
    mode: int,
    notes: list[str],
) -> Path:
    """Build the output directory beside it, then rename it onto a missing or empty ``output``."""
    prefix = f".{output.name}{TMP_MARK}"
    staging = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        atomic.clean_stale(parent, prefix)
        # mkdir, not mkdtemp (0700), so it ends up with the mode any new directory would get.
        os.mkdir(staging, dir_fd=parent.fd)
    except OSError as e:
        raise OutputError(safefs.os_error(output, e)) from None
    try:
        with _open_subdir(parent.fd, staging, parent.path / staging) as out:
            _fill(adapter, output, out, chunks, mode, notes)
        os.rename(staging, output.name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)
    except OSError as e:
        atomic.remove_entry(parent.fd, staging)
        raise OutputError(
            f"{output}: write failed ({e.strerror}); nothing was written there. Free some space"
        ) from None
    except BaseException:
        atomic.remove_entry(parent.fd, staging)
        raise
    try:
        os.fsync(parent.fd)
    except OSError as e:
        raise AdapterError(
            f"{output}: written, but syncing {parent.path} failed ({e.strerror}); a crash may still undo the write"
        ) from None
    return output / adapter.file.name


def _fill(
    adapter: Adapter, output: Path, out: safefs.Directory, chunks: list[Data], mode: int, notes: list[str]
) -> None:
    """Write the adapter's files into ``out`` (the other files, the config as read, then the weights)
    and sync it; raises ``OSError``. ``output`` is where ``out`` ends up."""
    skip = {out.identity}
    with suppress(FileNotFoundError):
        st = os.stat(output)
        skip.add((st.st_dev, st.st_ino))
    only = None
    written = (adapter.file.name, CONFIG_FILE)
    if training_state(adapter.dir):
        only = ADAPTER_FILES
        left = sorted(set(adapter.dir.names()) - ADAPTER_FILES - set(written))
        if left:
            notes.append(f"output: a Trainer checkpoint: copied only the adapter's files, not {', '.join(left)}")
    _copy_tree(adapter.dir, out, _allowed_roots(adapter.dir), notes, depth=0, written=written, skip=skip, only=only)
    atomic.write_file(out, CONFIG_FILE, [adapter.config_bytes], adapter.config_mode)
    atomic.write_file(out, adapter.file.name, chunks, mode)
    ranges.fsync(out.fd)


_MAX_DEPTH = 16  # subdirectories copied into --output; deeper ones are skipped with a note


def _copy_tree(
    src: safefs.Directory,
    dst: safefs.Directory,
    roots: list[Path],
    notes: list[str],
    depth: int,
    *,
    written: tuple[str, ...],
    skip: set[tuple[int, int]],
    only: frozenset[str] | None = None,
) -> None:
    """Copy what belongs to the adapter from ``src`` into ``dst``: regular files, subdirectories (not
    links to them), and a symlink only when what it opens is a regular file inside one of ``roots``
    (the adapter directory; for a Hugging Face cache snapshot, that repo's ``blobs/`` too), but not the
    top-level files in ``written`` (the weights and config, written afresh). Anything
    else — a link to outside, to a directory, a loop, a FIFO or device — is skipped with a note.
    Directories in ``skip`` (by device and inode: the output itself) are left out; with ``only``,
    every name not in it. Raises ``OSError`` when writing fails.
    """
    for name in src.names():
        # An attestation travels only by being signed again (the run signs the copy, or leaves it unsigned).
        if (depth == 0 and (name in written or name.endswith(ENVELOPE_SUFFIX))) or TMP_MARK in name:
            continue
        if only is not None and name not in only:
            continue
        where = src.path / name
        st = src.lstat(name)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in skip:
            continue
        if stat.S_ISDIR(st.st_mode):
            if depth + 1 >= _MAX_DEPTH:
                notes.append(f"output: skipped {where}: directories nested deeper than {_MAX_DEPTH}")
                continue
            _make_subdir(dst, name)
            with _open_subdir(src.fd, name, where) as sub_src, _open_subdir(dst.fd, name, dst.path / name) as sub_dst:
                _copy_tree(sub_src, sub_dst, roots, notes, depth + 1, written=written, skip=skip)
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            notes.append(f"output: skipped {where}: {safefs.kind(st.st_mode)}, not a regular file")
            continue
        link = stat.S_ISLNK(st.st_mode)
        try:
            f = src.open(name, follow=link)
        except AdapterError as e:
            reason = str(e).removeprefix(f"{where}: ")
            notes.append(f"output: skipped {where}: {'a symbolic link: ' if link else ''}{reason}")
            continue
        with f:
            opened = os.fstat(f.fileno())
            why = _outside(where, opened, roots) if link else None
            if why is not None:
                notes.append(f"output: skipped {where}: {why}")
                continue
            atomic.write_file(dst, name, [ranges.FileRange(f.fileno(), 0, opened.st_size)], opened.st_mode & 0o777)
    ranges.fsync(dst.fd)


def _outside(link: Path, opened: os.stat_result, roots: list[Path]) -> str | None:
    """Why the file opened through the symlink ``link`` must not be copied (None when it lies in ``roots``).

    The link's resolved path must lie under a root, and the file at that path must be the very file
    that was opened (same device and inode): a link re-pointed after the open is refused.
    """
    try:
        target = Path(os.path.realpath(link, strict=True))
        at_target = os.stat(target)
    except OSError as e:
        return f"a symbolic link that does not resolve ({e.strerror})"
    same = (at_target.st_dev, at_target.st_ino) == (opened.st_dev, opened.st_ino)
    if not same or not any(target.is_relative_to(root) for root in roots):
        return "a symbolic link to a file outside the adapter directory"
    return None


def _allowed_roots(directory: safefs.Directory) -> list[Path]:
    """Where a symlink in the adapter directory may point: the directory itself and, for a Hugging
    Face cache snapshot (``models--org--name/snapshots/<sha>/…``), that repo's ``blobs/``."""
    real = Path(os.path.realpath(directory.path))
    try:
        if (os.stat(real).st_dev, os.stat(real).st_ino) != directory.identity:
            return []  # the path now names another directory: follow no link at all
    except OSError:
        return []
    roots = [real]
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and "--" in parts[i - 1]:
            roots.append(Path(*parts[:i]) / "blobs")
            break
    return roots


def _make_subdir(dst: safefs.Directory, name: str) -> None:
    st = dst.lstat(name)
    if st is None:
        os.mkdir(name, dir_fd=dst.fd)
    elif not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{dst.path / name}: exists and is not a directory")


@contextmanager
def _open_subdir(dir_fd: int, name: str, where: Path) -> Iterator[safefs.Directory]:
    """A subdirectory through its parent's descriptor, never through a symlink."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{where}: is a symbolic link") from None
        raise AdapterError(safefs.os_error(where, e)) from None
    with safefs.Directory(where, AdapterError, fd=fd) as directory:
        yield directory


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AdapterError(safefs.os_error(path, e)) from None
