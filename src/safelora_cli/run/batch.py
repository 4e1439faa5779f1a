"""The adapters of one batch: each one's run, and the modules they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import Adapter, LoraModule, Named
from ..errors import AdapterError, SafeLoraError
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
