"""One adapter through the pipeline, as the tests drive it: ``project_adapters`` on a batch of one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safelora_cli.adapters import open_all
from safelora_cli.api import Report
from safelora_cli.errors import SafeLoraError
from safelora_cli.results import Settings
from safelora_cli.run.pipeline import project_adapters
from safelora_cli.sources import Source


def project_adapter(adapter_path: Path, base: Source, aligned: Source, settings: Settings, **hooks: Any) -> Report:
    """Run Safe LoRA on one adapter against one (base, aligned) pair, with ``project_adapters``'
    keyword arguments (``cache``, ``backups``, ``notes``…); raises its error."""
    with open_all([adapter_path]) as named:
        [outcome] = project_adapters(named, base, aligned, settings, **hooks)
    if isinstance(outcome, SafeLoraError):
        raise outcome
    return outcome
