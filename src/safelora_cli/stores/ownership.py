"""The ownership rule for safelora's own stores (the projection cache, the backups of originals).

ssh's rule for its keys: a store is used only when its root and everything in it that a run uses
belong to the effective user and no one else may write them, and when no one else may replace a
directory on the way to the root. A checksum stops corruption; this rule stops other users. Root,
and any process running as you, can still write there.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io import safefs

DIR_MODE, FILE_MODE = 0o700, 0o600
_MAX_LINKS = 40  # as the kernel's limit on symbolic links followed in one path
_NOT_HERE = (errno.ENOENT, errno.ENOTDIR)  # the path, or a directory on it, does not exist


def lstat(path: Path) -> os.stat_result | None:
    """``path`` itself (a link is not followed); None when it, or a directory on its way, is missing."""
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in _NOT_HERE:
            return None
        raise


def _writers(mode: int) -> str:
    return {0o020: "its group", 0o002: "other users", 0o022: "its group and other users"}[mode & 0o022]


@dataclass(frozen=True)
class Rule:
    """The rule for one store; its messages are whole notes: the path, what is wrong, what to do.

    ``refused`` starts every message (``"projection cache not used: "``), ``variable`` is the
    environment variable that moves the store, ``noun`` names it (``"the cache"``) and ``holds``
    says what another user could change.
    """

    refused: str
    variable: str
    noun: str
    holds: str

    @property
    def _elsewhere(self) -> str:
        return f"or point {self.variable} elsewhere"

    def owned(self, path: Path, st: os.stat_result, *, directory: bool) -> str | None:
        """Why ``path`` (inside the store, or its root) breaks the rule, or None: it must be a directory
        or a regular file as asked, belong to the effective user, and be writable by no one else."""
        euid = os.geteuid()
        want = "a directory" if directory else "a regular file"
        if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
            return f"{self.refused}{path} is {safefs.kind(st.st_mode)}, not {want}; remove it, {self._elsewhere}"
        if st.st_uid != euid:
            return (
                f"{self.refused}{path} belongs to uid {st.st_uid}, not to you (uid {euid}), so that user could "
                f"change {self.holds}; point {self.variable} at a directory of your own"
            )
        if st.st_mode & 0o022:
            return (
                f"{self.refused}{path} is writable by {_writers(st.st_mode)}, who could change {self.holds}; "
                f"run `chmod go-w {shlex.quote(str(path))}`, {self._elsewhere}"
            )
        return None

    def on_the_way(self, path: Path, st: os.stat_result) -> str | None:
        """Why a directory or link on the way to the root lets another user replace the store, or None.

        It must belong to the effective user or to root, and a directory must be writable by no one
        else unless it has the sticky bit (as /tmp has: there no one can rename or delete what is not
        theirs). A link's own mode means nothing; who owns it decides where it points.
        """
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            what = "a link" if stat.S_ISLNK(st.st_mode) else "a directory"
            return (
                f"{self.refused}{path} ({what} on the way to {self.noun}) belongs to uid {st.st_uid}, who could "
                f"replace {self.noun}; point {self.variable} elsewhere"
            )
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (
                f"{self.refused}{path} (a directory on the way to {self.noun}) is writable by "
                f"{_writers(st.st_mode)}, who could replace {self.noun}; run `chmod go-w {shlex.quote(str(path))}`, "
                f"{self._elsewhere}"
            )
        return None

    def root(self, root: Path) -> str | None:
        """The rule for the root: walk its path as the kernel resolves it, link by link.

        Every directory passed through and every link on the way is checked with ``on_the_way``, the
        directory reached with ``owned``. A missing part ends the walk (safelora creates it, mode
        0700); a part that is not a directory, or a loop of links, too (writing then fails, and the
        run says so).
        """
        parts = (Path.cwd() / root).parts
        current, todo, links = Path(parts[0]), list(reversed(parts[1:])), 0
        st = os.lstat(current)
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                current = current.parent  # passed through on the way here
                st = os.lstat(current)
                continue
            if problem := self.on_the_way(current, st):
                return problem
            path = current / name
            found = lstat(path)
            if found is None or (not stat.S_ISDIR(found.st_mode) and not stat.S_ISLNK(found.st_mode)):
                return None
            if stat.S_ISLNK(found.st_mode):
                if problem := self.on_the_way(path, found):
                    return problem
                links += 1
                if links > _MAX_LINKS:
                    return None
                target = Path(os.readlink(path))
                if target.is_absolute():
                    current, st = Path(target.parts[0]), os.lstat(target.parts[0])
                    todo.extend(reversed(target.parts[1:]))
                else:
                    todo.extend(reversed(target.parts))
                continue
            current, st = path, found
        return self.owned(current, st, directory=True)

    def contents(self, directory: Path, used: Callable[[str], bool | None] | None = None) -> str | None:
        """The rule for a directory inside the store and the files in it that a run uses.

        ``used(name)`` is True for a file that must be a regular one, False for an entry (checked when
        it is a regular file: anything else is never opened), None otherwise.
        """
        st = lstat(directory)
        if st is None:
            return None
        if (problem := self.owned(directory, st, directory=True)) or used is None:
            return problem
        for name in sorted(os.listdir(directory)):
            must = used(name)
            found = lstat(directory / name) if must is not None else None
            if found is None or (not must and not stat.S_ISREG(found.st_mode)):
                continue
            if problem := self.owned(directory / name, found, directory=False):
                return problem
        return None

    def checked(self, check: Callable[[], str | None], where: Path) -> str | None:
        """``check()``, with an OS error turned into the rule's message."""
        try:
            return check()
        except OSError as e:
            return f"{self.refused}{safefs.os_error(where, e)}; fix its permissions, {self._elsewhere}"


def mkdirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each mode 0700 whatever the umask."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue  # a concurrent run made it
        os.chmod(p, DIR_MODE)  # the umask may have taken bits the owner needs
