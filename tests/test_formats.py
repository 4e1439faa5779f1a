"""Adapter formats are found by what a location holds, through the one registry every format uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from safelora_cli import adapters
from safelora_cli.adapters.lora_config import CONFIG_FILE
from safelora_cli.adapters.peft import PEFT
from safelora_cli.adapters.peft_config import ADAPTER_FILE
from safelora_cli.errors import AdapterError


def test_peft_is_registered_and_found_by_detection(adapter_dir: Path) -> None:
    assert PEFT in adapters.formats()
    with adapters.open_adapter(adapter_dir) as location:
        assert adapters.format_of(location) is PEFT
    with adapters.opened(adapter_dir) as adapter:
        assert adapter.format is PEFT
        assert adapter.modules
        assert adapter.format.kept_files(adapter) == (ADAPTER_FILE,)
        assert set(adapter.format.attested_files(adapter)) == {CONFIG_FILE, ADAPTER_FILE}


def test_detection_reads_content_not_the_directory_name(adapter_dir: Path, tmp_path: Path) -> None:
    renamed = adapter_dir.rename(tmp_path / "not-named-like-an-adapter.gguf")
    with adapters.opened(renamed) as adapter:
        assert adapter.format is PEFT


def test_an_unknown_directory_gets_one_line_listing_what_is_supported(tmp_path: Path) -> None:
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(AdapterError) as info, adapters.opened(stray):
        pass
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{stray / CONFIG_FILE}: missing; {stray}: a directory, not a GGUF file; pass ")
    assert all(f"{fmt.expects} ({fmt.holds})" in message for fmt in adapters.formats())


def test_an_unknown_file_is_refused_in_one_line_naming_what_to_pass(tmp_path: Path) -> None:
    """Named like a GGUF file, it is one only by its content: a file of another kind lists what is supported."""
    stray = tmp_path / "adapter.gguf"
    stray.write_bytes(b"GGML" + b"\0" * 16)
    with pytest.raises(AdapterError) as info, adapters.opened(stray):
        pass
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"{stray}: a file, not an MLX-LM adapter directory; {stray}: a file, not a PEFT adapter directory; "
        f"{stray}: no GGUF magic; pass "
    )
    assert all(f"{fmt.expects} ({fmt.holds})" in message for fmt in adapters.formats())
