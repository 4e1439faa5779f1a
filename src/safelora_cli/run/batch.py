"""The adapters of one batch: each one's run, and the modules they share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import Adapter, LoraModule, Named
from ..adapters.checkpoint import CHECKPOINT_OUTPUT
from ..adapters.specs import output_name
from ..errors import AdapterError, OutputCollisionError, OutputError, SafeLoraError
from ..outputs.report import Report
from ..projection import ModuleMath
from ..results import Backup, SourceInfo


def _check_weight_shape(adapter: Adapter, m: LoraModule, label: str, shape: tuple[int, ...]) -> None:
    """The checkpoint weight (as stored) must be the matrix the adapter's A and B act on."""
    out, inp = m.out_features, m.in_features
    expected = (inp, out) if adapter.config.fan_in_fan_out else (out, inp)
    if len(shape) != 2 or tuple(shape) != expected:
        layout = "in×out (fan_in_fan_out)" if adapter.config.fan_in_fan_out else "out×in"
        raise AdapterError(
            f"{m.module}: the adapter expects a {layout} weight of {list(expected)} but "
            f"{label} has {list(shape)}; the adapter was trained on another model, pass the "
            "base/aligned pair it was trained on"
        )


def outputs(adapters: Sequence[Named], output: Path | None, several: bool) -> list[Path | None]:
    """Each adapter's output: ``output`` itself for one adapter, ``output/<name>`` (``output_name``) for
    each of a batch (``several``). Refused before anything is read or written: two adapters whose
    outputs would be one directory (names compared case-folded, as a case-insensitive file system
    sees them), and an output that is, or lies inside, an adapter directory of the run (but for its
    ``safelora/`` subdirectory, the Trainer callback's layout in a checkpoint: a copy never takes the
    output into itself)."""
    if output is None:
        return [None] * len(adapters)
    if not several:
        targets = [output] * len(adapters)
    else:
        targets = [output / output_name(named.path) for named in adapters]
        by_name: dict[str, list[Named]] = {}
        for named, target in zip(adapters, targets, strict=True):
            by_name.setdefault(target.name.casefold(), []).append(named)
        clashes = [group for group in by_name.values() if len(group) > 1]
        if clashes:
            told = "; ".join(
                " and ".join(str(n.path) for n in group) + f" would all write {output / output_name(group[0].path)}"
                for group in clashes
            )
            raise OutputCollisionError(
                f"{told}: a batch writes each adapter to a directory of its name; give the adapters distinct "
                "directory names, or project them in separate runs"
            )
    dirs = {named.dir.identity: named for named in adapters if named.dir is not None}
    for target in dict.fromkeys(targets):
        if target is not None:
            _refuse_inside(target, dirs)
    return list(targets)


def _refuse_inside(output: Path, adapters: dict[tuple[int, int], Named]) -> None:
    """An output inside an adapter directory of the run (through any link on the way) would be
    copied into, or read as part of, that adapter."""
    here = Path(os.path.abspath(output))
    for place in (here, *here.parents):
        try:
            st = os.stat(place)
        except OSError:
            continue
        named = adapters.get((st.st_dev, st.st_ino))
        if named is not None and named.dir is not None:
            if place == here.parent and here.name == CHECKPOINT_OUTPUT:
                continue
            adapter = named.path
            where = "is the adapter directory" if place == here else "lies inside the adapter directory"
            raise OutputError(
                f"{output}: {where} {adapter}; an output must lie outside every adapter of the run (to patch an "
                "adapter in place, give no output)"
            )


@dataclass
class Run:
    """One adapter of a batch: where it is, what was found for it, and how it ended."""

    named: Named
    notes: list[str]
    adapter: Adapter | None = None
    original: Backup | None = None  # the kept original this run starts from, instead of the adapter's file
    kept: Backup | None = None  # the backup the written file's provenance names
    kept_now: bool = False
    found: dict[str, tuple[ModuleMath, bool]] = field(default_factory=dict)
    infos: tuple[SourceInfo, SourceInfo] | None = None  # the pair as this adapter used it (content identity)
    output: Path | None = None  # where its result goes (``outputs``), or None: in place or a dry run
    # What this adapter's run spent (``pipeline``'s meter); a module shared in a batch counts for the first user.
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_downloaded: int = 0
    outcome: Report | SafeLoraError | None = None  # set once the run is over (a no-op or an error)

    @property
    def path(self) -> Path:
        return self.named.path

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()

    @property
    def loaded(self) -> Adapter:
        """The adapter, once ``pipeline`` has read it (every later step runs after that)."""
        if self.adapter is None:
            raise RuntimeError(f"{self.path}: adapter used before it was loaded")
        return self.adapter


class Group:
    """The modules of a batch's adapters that share a layout: each operator is produced once for all."""

    def __init__(self, runs: list[Run], transpose: bool) -> None:
        self.transpose = transpose
        self.users: dict[str, list[tuple[Run, LoraModule]]] = {}
        for run in runs:
            for m in run.loaded.modules:
                self.users.setdefault(m.module, []).append((run, m))
        self.modules = [users[0][1] for users in self.users.values()]

    def live(self, module: str) -> list[tuple[Run, LoraModule]]:
        return [(run, m) for run, m in self.users[module] if run.outcome is None]

    def fail(self, module: LoraModule, error: SafeLoraError) -> None:
        """End the run of every adapter that needs ``module``."""
        for run, _ in self.live(module.module):
            run.outcome = error

    def check(self, module: LoraModule, label: str, shape: tuple[int, ...]) -> bool:
        """Check the weight's shape against every adapter using it; a mismatch ends that adapter's run.

        Returns whether any adapter still needs the module.
        """
        for run, m in self.live(module.module):
            try:
                _check_weight_shape(run.loaded, m, label, shape)
            except AdapterError as e:
                run.outcome = e
        return bool(self.live(module.module))
