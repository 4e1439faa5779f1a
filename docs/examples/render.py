"""Regenerate docs/examples/: the step-summary section and the plot of the built-in demo example.

    make docs    # or: .venv/bin/python docs/examples/render.py

The demo's checkpoints are built in a temporary directory and projected with ``--output``, as
``safelora demo`` does. The report then names them as ``make demo`` lays them out (``demo/base``,
``demo/aligned``, ``demo/adapter`` → ``demo/sanitized``), and the checkpoints' fingerprints, which
hash file inodes and times and so differ on every machine, read ``<fingerprint>``. Everything
else is the run's own output. tests/test_docs.py regenerates the summary and compares.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

from safelora_cli import api, demo
from safelora_cli.api import Report, SourceInfo

HERE = Path(__file__).resolve().parent
SUMMARY = HERE / "summary.md"
PLOT = HERE / "similarity.png"


def demo_report() -> Report:
    """The demo example's report, with machine-specific paths, fingerprints and digests made stable."""
    with tempfile.TemporaryDirectory(prefix="safelora-docs-") as tmp:
        base, aligned, adapter = demo.build(Path(tmp))
        report = api.project(
            adapter, base=base, aligned=aligned, output=Path(tmp) / "sanitized", cache=False, device="cpu"
        )
    return dataclasses.replace(
        report,
        adapter=Path("demo/adapter"),
        output=Path("demo/sanitized"),
        base=SourceInfo("demo/base", None, "<fingerprint>", name="base", content="<content>"),
        aligned=SourceInfo("demo/aligned", None, "<fingerprint>", name="aligned", content="<content>"),
    )


def main() -> None:
    report = demo_report()
    SUMMARY.write_text(report.summary_markdown(), encoding="utf-8")
    report.plot(PLOT)
    print(f"wrote {SUMMARY.relative_to(Path.cwd())} and {PLOT.relative_to(Path.cwd())}", file=sys.stderr)


if __name__ == "__main__":
    main()
