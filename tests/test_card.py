"""The model card: the Safe LoRA section and the safelora tag, edited as text and written like the
adapter's own files."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from support.run import project_adapter
from typer.testing import Result

from safelora_cli.api import Report
from safelora_cli.errors import AdapterError
from safelora_cli.io import safefs
from safelora_cli.outputs import card
from safelora_cli.outputs.card import (
    CARD_FILE,
    card_section,
    refresh_card,
    remove_card_section,
    with_section,
    without_section,
)
from safelora_cli.results import Settings
from safelora_cli.sources import open_local

DIGEST = "ab" * 32


def write_card(directory: safefs.Directory, report: Report) -> None:
    """What ``--model-card`` does once the adapter (here with a made-up stamp digest) is written."""
    refresh_card(directory, report, DIGEST, asked=True)


BEGIN = re.compile(r"<!-- safelora:begin(?: added=[a-z-]+)?(?: digest=[0-9a-f]+)? -->")


@pytest.fixture(scope="module")
def report(llama_pair: tuple[Path, Path], llama_adapter: Path) -> Report:
    base, aligned = llama_pair
    return project_adapter(
        llama_adapter, open_local(base), open_local(aligned), Settings(mode="number", num_layers=3, dry_run=True)
    )


def front_tags(text: str) -> object:
    m = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.S)
    assert m, text
    return (yaml.safe_load(m[1]) or {}).get("tags")


def sections(text: str) -> int:
    lines = [line.rstrip("\r") for line in text.split("\n")]
    begins = sum(1 for line in lines if BEGIN.fullmatch(line))
    ends = sum(1 for line in lines if line == card.END)
    assert begins == ends
    return begins


# (card, the tags the front matter has afterwards)
CARDS = [
    ("", ["safelora"]),
    ("# My adapter\n\nTrained on things.\n", ["safelora"]),
    ("# No final newline", ["safelora"]),
    ("---\nlicense: mit\n---\n# T\n", ["safelora"]),
    ("---\nlicense: mit\ntags:\n- a\n- b\nbase_model: x\n---\nbody\n", ["a", "b", "safelora"]),
    (
        "---\ntags:\n  - a\n  - name: >\n      folded\nlibrary_name: peft\n---\n",
        ["a", {"name": "folded\n"}, "safelora"],
    ),
    ("---\ntags:  # the Hub's tags\n- a\n\n# a comment\n- b\n---\n", ["a", "b", "safelora"]),
    ("---\ntags:\nlicense: mit\n---\n", ["safelora"]),
    ("---\ntags: [a, 'b']  # flow\n---\n", ["a", "b", "safelora"]),
    ("---\ntags: []\n---\n", ["safelora"]),
    ("---\ntags: [ ]\n---\n", ["safelora"]),
    ("---\r\nlicense: mit\r\ntags:\r\n- a\r\n---\r\n# CRLF card\r\n\r\ntext\r\n", ["a", "safelora"]),
    ("# CRLF without front matter\r\n", ["safelora"]),
    ("---\ntags: just-a-string\n---\n", "just-a-string"),  # a form safelora does not edit
    ("---\ntags: [a,\n  b]\n---\n", ["a", "b"]),  # a multi-line flow list: not edited either
]


@pytest.mark.parametrize(("text", "tags"), CARDS)
def test_section_and_tag_added_rest_kept_and_undone(report: Report, text: str, tags: object) -> None:
    section = card_section(report)
    new = with_section(text, section)
    assert front_tags(new) == tags
    assert sections(new) == 1
    crlf = "\r\n" in text
    assert ("\r\n" in new) == crlf and (not crlf or "\n" not in new.replace("\r\n", ""))
    # Byte for byte: every line of the original is still there, in order, and rerunning changes nothing.
    assert with_section(new, section) == new
    assert without_section(new) == text
    body = text.split("---", 2)[-1] if text.startswith("---") else text
    assert body in new


@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ("---\ntags:\n- safelora\n- a\n---\n", ["safelora", "a"]),
        ("---\ntags:\n  - 'safelora'  # ours\n---\n", ["safelora"]),
        ('---\ntags: [a, "safelora"]\n---\n', ["a", "safelora"]),
    ],
)
def test_an_authors_own_tag_is_never_duplicated_and_survives_removal(report: Report, text: str, tags: object) -> None:
    new = with_section(text, card_section(report))
    assert front_tags(new) == tags
    assert "<!-- safelora:begin -->" in new  # the marker records that safelora added no tag
    assert without_section(new) == text


def test_no_card_gets_minimal_front_matter_and_removal_deletes_it(report: Report) -> None:
    new = with_section(None, card_section(report))
    assert new.startswith("---\ntags:\n- safelora\n---\n\n<!-- safelora:begin added=file -->\n")
    assert without_section(new) is None


def test_rerun_replaces_the_section_in_place(report: Report) -> None:
    text = "# Title\n\nintro\n"
    first = with_section(text, card_section(report))
    moved = first.replace("# Title\n\nintro\n", "# Title\n\n", 1) + "\nmore text after\n"
    other = dataclasses.replace(report, mode="threshold", threshold=0.9, num_layers=None)
    second = with_section(moved, card_section(other))
    assert sections(second) == 1 and "τ = 0.9" in second and "τ_k" not in second
    assert second.endswith("<!-- safelora:end -->\n\nmore text after\n")
    assert front_tags(second) == ["safelora"]


def test_the_tag_is_added_again_if_the_author_removed_it(report: Report) -> None:
    new = with_section("---\ntags:\n- a\n---\n", card_section(report))
    edited = new.replace("- safelora\n", "", 1)
    again = with_section(edited, card_section(report))
    assert front_tags(again) == ["a", "safelora"] and "added=tag-item" in again


def test_markers_inside_code_blocks_are_not_sections(report: Report) -> None:
    text = (
        "# Docs\n\n```markdown\n<!-- safelora:begin -->\n<!-- safelora:begin -->\n```\n\n"
        "~~~~\n<!-- safelora:end -->\n~~~~\n"
    )
    new = with_section(text, card_section(report))
    assert new.count("<!-- safelora:begin") == 3 and new.startswith("---\ntags:\n- safelora\n---\n" + text)
    assert without_section(new) == text


def test_a_card_ending_in_an_open_code_block_is_refused(report: Report) -> None:
    text = "# Usage\n\n```python\nimport peft\n"
    with pytest.raises(AdapterError, match=r"^README\.md: ends inside an unclosed ``` code block; close it"):
        with_section(text, card_section(report))
    assert without_section(text) == text


@pytest.mark.parametrize(
    "body",
    [
        "<!-- safelora:begin -->\nA\n<!-- safelora:end -->\n<!-- safelora:begin -->\nB\n<!-- safelora:end -->\n",
        "<!-- safelora:begin -->\nno end\n",
        "<!-- safelora:end -->\n<!-- safelora:begin -->\n",
    ],
)
def test_two_sections_or_a_lone_marker_are_refused(report: Report, body: str) -> None:
    with pytest.raises(AdapterError, match=r"^README\.md: \d '<!-- safelora:begin -->' and \d '<!-- safelora:end -->'"):
        with_section(body, card_section(report))
    with pytest.raises(AdapterError):
        without_section(body)


def test_hostile_module_names_cannot_forge_markers(report: Report) -> None:
    names = ["<!-- safelora:end -->", "x\n<!-- safelora:end -->\n", "a|b`c`-->", "<script>x</script>"]
    layers = [
        dataclasses.replace(layer, module=names[i % len(names)], projected=True)
        for i, layer in enumerate(report.layers)
    ]
    bad = dataclasses.replace(
        report, layers=layers, base=dataclasses.replace(report.base, source="<!-- safelora:end -->")
    )
    section = card_section(bad)
    text = "# T\n"
    new = with_section(text, section)
    assert sections(new) == 1 and "<script>" not in new and "`" not in new
    table = [line for line in section.splitlines() if line.startswith("| <code>")]
    assert len(table) == len(layers) and all(line.count("|") == 5 for line in table)
    assert without_section(new) == text


# Pieces of cards: front matter fences, tags forms, code fences, line ends of both kinds.
card_text = st.lists(
    st.sampled_from(["a", " ", "-", "#", ":", "\n", "\r\n", "[", "]", "'", "`", "~", "---", "tags:", "- x", "```"]),
    max_size=40,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(card_text)
def test_any_card_is_restored_exactly(text: str) -> None:
    section = card.begin_marker() + "\n\n## Safe LoRA\n\n" + card.END + "\n"
    try:
        new = with_section(text, section)
    except AdapterError:
        return  # a lone marker cannot come from this alphabet, but a refusal is an answer too
    assert with_section(new, section) == new
    assert without_section(new) == text


# --- writing README.md through the directory ---------------------------------------------------


def test_write_card_creates_updates_and_removes(report: Report, tmp_path: Path) -> None:
    with safefs.Directory(tmp_path, AdapterError) as directory:
        write_card(directory, report)
        created = (tmp_path / CARD_FILE).read_text()
        assert created == with_section(None, card_section(report, DIGEST))
        remove_card_section(directory)
        assert not (tmp_path / CARD_FILE).exists()
        (tmp_path / CARD_FILE).write_text("# mine\n")
        os.chmod(tmp_path / CARD_FILE, 0o600)
        write_card(directory, report)
        assert (tmp_path / CARD_FILE).stat().st_mode & 0o777 == 0o600
        assert sections((tmp_path / CARD_FILE).read_text()) == 1
        remove_card_section(directory)
        assert (tmp_path / CARD_FILE).read_bytes() == b"# mine\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_no_op_run_leaves_the_card_alone(report: Report, tmp_path: Path) -> None:
    (tmp_path / CARD_FILE).write_text("# kept\n")
    with safefs.Directory(tmp_path, AdapterError) as directory:
        write_card(directory, dataclasses.replace(report, layers=[]))
    assert (tmp_path / CARD_FILE).read_text() == "# kept\n"


def test_a_linked_card_is_refused_and_never_written_through(report: Report, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.md"
    target.write_text("# not the adapter's\n")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CARD_FILE).symlink_to(target)
    with (
        safefs.Directory(adapter, AdapterError) as directory,
        pytest.raises(AdapterError, match=r"README\.md: is a symbolic link, and safelora never writes through one"),
    ):
        write_card(directory, report)
    assert target.read_text() == "# not the adapter's\n" and (adapter / CARD_FILE).is_symlink()


def test_a_large_or_binary_card_is_refused(report: Report, tmp_path: Path) -> None:
    readme = tmp_path / CARD_FILE
    with open(readme, "wb") as f:
        f.truncate(card.CARD_LIMIT + 1)
    with safefs.Directory(tmp_path, AdapterError) as directory:
        with pytest.raises(AdapterError, match=r"README\.md: 4194305 bytes, more than the 4194304"):
            write_card(directory, report)
        readme.write_bytes(b"# caf\xe9\n")
        with pytest.raises(AdapterError, match=r"README\.md: not UTF-8 text \(byte 5\)"):
            write_card(directory, report)
    assert readme.read_bytes() == b"# caf\xe9\n"


def test_a_card_changed_while_running_is_not_overwritten(
    report: Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / CARD_FILE
    readme.write_text("# v1\n")
    real = card.card_section

    def racing(r: Report, digest: str | None = None) -> str:
        readme.write_text("# v2, saved by the author meanwhile\n")
        return real(r, digest)

    monkeypatch.setattr(card, "card_section", racing)
    with safefs.Directory(tmp_path, AdapterError) as directory, pytest.raises(AdapterError, match="changed on disk"):
        write_card(directory, report)
    assert readme.read_text() == "# v2, saved by the author meanwhile\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# Reading the card is the same for writing and removing the section: removing needs no report.
_READ_CARD = """
import sys
from pathlib import Path
from safelora_cli.io import safefs
from safelora_cli.outputs.card import remove_card_section
from safelora_cli.errors import AdapterError
try:
    with safefs.Directory(Path(sys.argv[1]), AdapterError) as d:
        remove_card_section(d)
except AdapterError as e:
    print(e)
    sys.exit(1)
"""


def test_a_fifo_card_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / CARD_FILE)
    done = subprocess.run([sys.executable, "-c", _READ_CARD, str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == (
        f"{tmp_path / CARD_FILE}: is a FIFO, not a regular file; "
        "replace it with a regular file, or write the adapter to another output directory"
    )


# ---- a card that never goes stale ----

HUB_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")  # huggingface_hub's own


@pytest.mark.parametrize("lead", ["\n", "\n\n", "   \n\t\n", "\r\n", "  "])
def test_front_matter_after_blank_lines_is_the_one_edited(report: Report, lead: str) -> None:
    """The Hub finds front matter after blank or whitespace-only lines: it gets the tag, and no
    second front matter is put in front of it (which would hide the author's license and tags)."""
    text = f"{lead}---\nlicense: mit\ntags:\n- a\n---\n# body\n"
    new = with_section(text, card_section(report))
    found = HUB_FRONT_MATTER.search(new)
    assert found is not None
    assert yaml.safe_load(found[2]) == {"license": "mit", "tags": ["a", "safelora"]}
    assert new.startswith(lead) and new.count("---\n") == 2
    assert without_section(new) == text


def stamp_digest_of(adapter: Path) -> str:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        return str(f.metadata()["safelora.digest"])


def section_of(adapter: Path) -> str:
    text = (adapter / CARD_FILE).read_text()
    return text[text.index("<!-- safelora:begin") : text.index(card.END)]


def test_any_rewrite_refreshes_the_card_and_an_unprojected_result_removes_it(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], adapter_dir: Path
) -> None:
    base, aligned = llama_pair
    original = (adapter_dir / CARD_FILE).read_bytes()
    run = ("project", adapter_dir, "--base", base, "--aligned", aligned, "--quiet")
    assert cli(*run, "--num-layers", 3, "--model-card").exit_code == 0
    assert f"digest={stamp_digest_of(adapter_dir)}" in section_of(adapter_dir)
    assert re.search(r"\*\*3 of \d+\*\*", section_of(adapter_dir))

    r = cli(*run, "--num-layers", 1)  # no --model-card: the section there is refreshed all the same
    assert r.exit_code == 0, r.stderr
    assert f"digest={stamp_digest_of(adapter_dir)}" in section_of(adapter_dir)
    assert re.search(r"\*\*1 of \d+\*\*", section_of(adapter_dir))

    r = cli(*run, "--threshold", -1)  # nothing projected: the section and the tag go
    assert r.exit_code == 0, r.stderr
    assert (adapter_dir / CARD_FILE).read_bytes() == original


def test_a_section_naming_another_digest_is_refreshed_by_the_next_run(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], adapter_dir: Path
) -> None:
    """A no-op rerun (the stamp verified) still brings a stale section (another adapter's, pasted)
    in step with the adapter."""
    base, aligned = llama_pair
    run = ("project", adapter_dir, "--base", base, "--aligned", aligned, "--num-layers", 2, "--quiet")
    assert cli(*run, "--model-card").exit_code == 0
    digest = stamp_digest_of(adapter_dir)
    card_path = adapter_dir / CARD_FILE
    card_path.write_text(card_path.read_text().replace(digest, "0" * 64).replace("**2 of", "**5 of"))
    r = cli(*run)
    assert r.exit_code == 0, r.stderr
    assert f"digest={digest}" in section_of(adapter_dir) and "**2 of" in section_of(adapter_dir)
    assert stamp_digest_of(adapter_dir) == digest  # the adapter itself was not rewritten


def test_a_card_that_cannot_be_refreshed_after_the_write_fails_the_run(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    base, aligned = llama_pair
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("# not the adapter's\n")
    (adapter_dir / CARD_FILE).unlink()
    (adapter_dir / CARD_FILE).symlink_to(elsewhere)
    r = cli("project", adapter_dir, "--base", base, "--aligned", aligned, "--num-layers", 2, "-q", "--model-card")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(adapter_dir / CARD_FILE) in lines[0], r.stderr
    assert stamp_digest_of(adapter_dir)  # the weights stay written
    assert elsewhere.read_text() == "# not the adapter's\n"


def test_a_card_safelora_could_not_have_written_is_left_alone_when_not_asked(
    cli: Callable[..., Result], llama_pair: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
) -> None:
    """A README.md that is a link (as in a Hugging Face cache snapshot) holds no section of safelora's:
    a rewrite without --model-card leaves it, and succeeds."""
    base, aligned = llama_pair
    elsewhere = tmp_path / "elsewhere.md"
    elsewhere.write_text("# shared card\n")
    (adapter_dir / CARD_FILE).unlink()
    (adapter_dir / CARD_FILE).symlink_to(elsewhere)
    r = cli("project", adapter_dir, "--base", base, "--aligned", aligned, "--num-layers", 2, "-q")
    assert r.exit_code == 0, r.stderr
    assert (adapter_dir / CARD_FILE).is_symlink() and elsewhere.read_text() == "# shared card\n"
