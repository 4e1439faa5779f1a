"""The ``Report`` a run returns: ``results.Report``'s data, and the three renderings of it.

The renderings live beside the outputs that draw them, so ``results`` stays data that every part
may import, and no output needs the flow: the flow builds this class, ``api`` re-exports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import results
from . import card, summary
from . import plot as plotting


@dataclass(frozen=True)
class Report(results.Report):
    """Everything a run did, for the table, the JSON document and the tests; and what ``--summary``,
    ``--model-card`` and ``--plot`` make of it."""

    def summary_markdown(self) -> str:
        """This run's section for a GitHub step summary (Markdown, with a Mermaid chart)."""
        return summary.summary_markdown(self)

    def card_section(self) -> str:
        """This run's Safe LoRA section for a model card (between safelora's markers)."""
        return card.card_section(self)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw per-module similarity to ``path`` (.png or .svg; needs the ``safelora[plot]`` extra)."""
        plotting.plot(self, Path(path))
