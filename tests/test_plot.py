"""``--plot``: a PNG or SVG of per-module similarity from a real report, reproducible and written safely."""

from __future__ import annotations

import dataclasses
import struct
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from support.run import project_adapter

from safelora_cli.api import Report
from safelora_cli.cli._errors import describe
from safelora_cli.errors import ExtraFileError, UsageError
from safelora_cli.outputs import plot
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def report(llama_pair: tuple[Path, Path], llama_adapter: Path) -> Report:
    """A real dry run with τ_k between the similarities: some modules projected, some kept."""
    base, aligned = llama_pair
    return project_adapter(
        llama_adapter, open_local(base), open_local(aligned), Settings(mode="number", num_layers=3, dry_run=True)
    )


def png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The chunks of a PNG, each CRC checked: a valid file, not just a signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    assert kind == b"IEND"
    return chunks


def test_png_is_valid_sized_and_reproducible(report: Report, tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    plot.plot(report, target)
    data = target.read_bytes()
    chunks = png_chunks(data)
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert (width, height) == (1000, 450)
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(set(pixels)) > 10  # something was drawn
    assert b"Software" not in data and b"matplotlib" not in data.lower()  # no version in the metadata
    plot.plot(report, target)
    assert target.read_bytes() == data


def markers(root: ET.Element, prefix: str) -> int:
    """Marker instances (``<use>``) inside the groups whose id starts with ``prefix``."""
    return sum(1 for g in root.iter(f"{SVG}g") if g.get("id", "").startswith(prefix) for _ in g.iter(f"{SVG}use"))


def test_svg_has_one_marker_per_module_and_the_tau_line(report: Report, tmp_path: Path) -> None:
    target = tmp_path / "chart.SVG"
    plot.plot(report, target)
    data = target.read_bytes()
    root = ET.fromstring(data)
    assert root.tag == f"{SVG}svg"
    projected = report.projected_count
    assert 0 < projected < len(report.layers)
    assert markers(root, plot.GID_PROJECTED) == projected
    assert markers(root, plot.GID_KEPT) == len(report.layers) - projected
    assert markers(root, plot.GID_UNDEFINED) == 0
    tau = [g for g in root.iter(f"{SVG}g") if g.get("id") == plot.GID_TAU]
    assert len(tau) == 1 and tau[0].find(f"{SVG}path") is not None
    assert b"<dc:date>" not in data and b"Matplotlib v" not in data
    plot.plot(report, target)
    assert target.read_bytes() == data  # salted ids, no date: the same bytes


def test_undefined_similarities_and_hostile_names_are_drawn(report: Report, tmp_path: Path) -> None:
    layers = [
        dataclasses.replace(layer, similarity=None, projected=False, reason="B·A = 0") if i < 2 else layer
        for i, layer in enumerate(report.layers)
    ]
    layers[2] = dataclasses.replace(layers[2], module="$\\frac{a}{$ <x> \n", layer=None)
    odd = dataclasses.replace(report, layers=layers, adapter=Path("/tmp/$\\frac{$ \u202e <b>"))
    target = tmp_path / "chart.svg"
    plot.plot(odd, target)
    root = ET.fromstring(target.read_bytes())
    assert markers(root, plot.GID_UNDEFINED) == 2
    drawn = markers(root, plot.GID_PROJECTED) + markers(root, plot.GID_KEPT)
    assert drawn == len(layers) - 2


def test_an_empty_report_still_draws(report: Report, tmp_path: Path) -> None:
    plot.plot(dataclasses.replace(report, layers=[], threshold=None), tmp_path / "empty.png")
    png_chunks((tmp_path / "empty.png").read_bytes())


@pytest.mark.parametrize("name", ["chart.jpg", "chart", ".png", "chart.png.txt"])
def test_other_suffixes_are_a_usage_error(report: Report, tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError, match=r"the chart is written as FILE\.png or FILE\.svg") as e:
        plot.plot(report, tmp_path / name)
    assert e.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_the_error_says_how_to_install(
    report: Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra looks like
    with pytest.raises(UsageError) as e:
        plot.require_matplotlib()
    assert str(e.value) == "plot needs matplotlib, which is not installed: pip install 'safelora[plot]'"
    assert describe(e.value) == "--plot needs matplotlib, which is not installed: pip install 'safelora[plot]'"
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match=r"pip install 'safelora\[plot\]'"):
        plot.plot(report, tmp_path / "chart.png")
    assert list(tmp_path.iterdir()) == []


def test_a_link_or_directory_at_the_target_is_refused(report: Report, tmp_path: Path) -> None:
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    link = tmp_path / "chart.png"
    link.symlink_to(victim)
    with pytest.raises(ExtraFileError, match=r"chart\.png: is a symbolic link, not a regular file"):
        plot.plot(report, link)
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    (tmp_path / "dir.svg").mkdir()
    with pytest.raises(ExtraFileError, match=r"dir\.svg: is a directory"):
        plot.plot(report, tmp_path / "dir.svg")
    with pytest.raises(ExtraFileError, match=r"missing: does not exist; create the directory first"):
        plot.plot(report, tmp_path / "missing" / "chart.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "dir.svg", "victim.png"]


def test_an_existing_chart_is_replaced_atomically(report: Report, tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    plot.plot(report, target)
    assert target.read_bytes()[:4] == b"\x89PNG" and target.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]
