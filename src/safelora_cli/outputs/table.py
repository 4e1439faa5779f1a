"""The order of the result table's rows."""

from __future__ import annotations

from typing import Literal

from ..results import LayerResult, Report, finite

Sort = Literal["layer", "similarity"]


def table_rows(report: Report, sort: Sort = "layer", projected_only: bool = False) -> list[LayerResult]:
    """The report's modules for the table: in layer order (the report's), or by ascending similarity
    (undefined last, ties in layer order); with ``projected_only``, the projected modules only."""
    rows = [layer for layer in report.layers if layer.projected or not projected_only]
    if sort == "similarity":
        rows.sort(key=lambda layer: (finite(layer.similarity) is None, finite(layer.similarity) or 0.0))
    return rows
