"""The tool's error types: every message a user sees for bad input is shaped here."""

from __future__ import annotations

from pathlib import Path


class SafeLoraError(Exception):
    """An input or I/O problem the user can fix; the CLI prints it as one line and exits 1.

    In a batch, ``adapter`` names the adapter directory the error belongs to.
    """

    exit_code = 1
    adapter: Path | None = None


class SourceError(SafeLoraError):
    """A base or aligned checkpoint cannot be found, read or matched to the adapter."""


class FormatError(SourceError):
    """A safetensors file (adapter, checkpoint or cache entry) is malformed."""


class HubError(SourceError):
    """The Hub cannot give what a run needs: repo, revision, file, access, network, or offline mode."""


class CacheError(SafeLoraError):
    """The projection cache cannot be used as asked (an unknown pair, a pair busy in another run)."""


class AdapterError(SafeLoraError):
    """The adapter directory, its config or its tensors cannot be used."""


class AlreadyProjectedError(AdapterError):
    """The adapter already carries safelora provenance from another pair or other settings."""


class NumericError(SafeLoraError):
    """A tensor holds NaN or Inf."""


class UsageError(SafeLoraError):
    """Options that contradict each other; exit 2 like any usage error."""

    exit_code = 2
