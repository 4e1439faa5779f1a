"""What ``eval`` writes when asked: the records (JSON Lines) and the Evaluation section of the evaluated
adapter's model card, its only write into an adapter directory."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..adapters import file_digest, opened
from ..errors import AdapterError, ExtraFileError, UsageError
from ..io import atomic, safefs
from ..outputs import evaluation
from ..outputs.card import CARD_FILE
from .result import EvalResult


def write_card(result: EvalResult) -> Path:
    """Write the section into the README.md of the one adapter evaluated; returns the card's path.

    Refused when the result holds other than one adapter, and when the adapter is no longer what was
    evaluated (its stamp digest changed since): the section would describe another adapter."""
    adapters = [v for v in result.variants if v.kind == "adapter"]
    if len(adapters) != 1:
        raise UsageError(f"the model card section describes one adapter; {len(adapters)} were evaluated")
    [variant] = adapters
    assert variant.path is not None and variant.digest is not None  # an adapter variant has both
    with opened(Path(variant.path)) as adapter:
        if file_digest(adapter) != variant.digest:
            raise AdapterError(
                f"{variant.path}: changed since it was evaluated; its model card was not written. Evaluate it again"
            )
        evaluation.write_section(adapter.dir, evaluation.card_section(result, variant.digest))
        return adapter.dir.path / CARD_FILE


def write_records(result: EvalResult, path: Path) -> None:
    """One JSON line per variant × prompt (``variant``, ``set``, ``prompt``, ``response``, ``refused``,
    and ``verdict`` with a judge) to ``path``, replaced whole and atomically. ``path`` must be a regular
    file or not exist yet; a link there is refused, never followed."""
    st = None
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ExtraFileError(safefs.os_error(path, e)) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ExtraFileError(
            f"{path}: is {safefs.kind(st.st_mode)}, not a regular file; name a regular file (or a new one)"
        )
    lines = [json.dumps(r.to_json(), ensure_ascii=False, allow_nan=False) + "\n" for r in result.records]
    try:
        with safefs.Directory(path.parent if str(path.parent) else Path("."), ExtraFileError) as directory:
            atomic.write_file(directory, path.name, ["".join(lines).encode()], 0o644)
    except OSError as e:
        raise ExtraFileError(safefs.os_error(path, e)) from None
