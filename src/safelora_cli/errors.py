"""The tool's error types. A message states the problem; what to do about it in terms of command-line
flags is added by the command line, from the error's type and fields (``cli/_errors.py``), so the
Python API's messages never name flags.
"""

from __future__ import annotations

from pathlib import Path


class SafeLoraError(Exception):
    """An input or I/O problem the user can fix; the CLI prints it as one line and exits 1.

    In a batch, ``adapter`` names the adapter directory the error belongs to.
    """

    exit_code = 1
    adapter: Path | None = None
    # The option the message starts with, by its Python name ("preset", "plot"): the command line
    # writes it as its flag (--preset), so that the message itself names none.
    option: str | None = None
    # How the message ends, when it ends in a fix the command line words in flags instead.
    fix: str | None = None
    # The options whose values the error is about, the one to blame first: when one of them came
    # from a config file, the run names its file and line (``Options.locate``).
    concerns: tuple[str, ...] = ()

    def __init__(self, *args: object, option: str | None = None, concerns: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.option = option
        if concerns:
            self.concerns = concerns


class SourceError(SafeLoraError):
    """A base or aligned checkpoint cannot be found, read or matched to the adapter."""


class FormatError(SourceError):
    """A safetensors file (adapter, checkpoint or cache entry) is malformed."""


class HubError(SourceError):
    """The Hub cannot give what a run needs: repo, revision, file, access, network, or offline mode."""


class HubRepoNotFoundError(HubError):
    """No repository of that name on the Hub endpoint."""


class HubUnreachableError(HubError):
    """The Hub cannot be reached (network, proxy), or offline mode has no record of the repo."""


class HubAccessError(HubError):
    """The repo is gated or private: a token with access to it is needed."""


class HubOfflineError(HubError):
    """HF_HUB_OFFLINE=1, and files the run needs are not in the Hugging Face cache: they are in
    ``repo_id`` at commit ``revision``, to download once online."""

    def __init__(self, message: str, *, repo_id: str, revision: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision


class CacheError(SafeLoraError):
    """The projection cache cannot be used as asked (an unknown pair, a pair busy in another run)."""


class AdapterError(SafeLoraError):
    """The adapter directory, its config or its tensors cannot be used."""


class InPlaceError(AdapterError):
    """The adapter cannot be rewritten in place (read-only, no locks, a symlinked weights file), though
    a patched copy could be written elsewhere."""


class CheckpointError(AdapterError):
    """A Trainer checkpoint given to rewrite in place: resuming would continue from projected weights.
    Refused like a usage error (exit 2), before anything is read."""

    exit_code = 2


class OutputError(AdapterError):
    """The output directory cannot be used as it is."""

    concerns = ("output",)


class OutputNotEmptyError(OutputError):
    """The output directory holds files already; reusing it replaces them."""


class AlreadyProjectedError(AdapterError):
    """The adapter already carries safelora provenance, and its original is not kept to start from."""


class UnverifiedStampError(AlreadyProjectedError):
    """The adapter's stamp says this pair and these settings, but nothing verifies the stamp: the
    run does not skip the work on its word."""


class ChangedSinceError(AdapterError):
    """The adapter changed since safelora wrote it: starting from the kept original would lose that change."""


class DoraError(AdapterError):
    """A DoRA adapter: Safe LoRA does not define DoRA; projecting lora_B alone is an explicit choice."""


class ExtraFileError(SafeLoraError):
    """A file asked for besides the adapter (a summary, a plot) cannot be written as asked."""


class PlotFileError(ExtraFileError):
    """The plot's path names something other than a regular file."""

    fix = "choose another path"


class AdapterNotLocalError(AdapterError):
    """An adapter given as a Hub repo id: adapters are local directories."""

    fix = "download it first and pass that directory"

    def __init__(self, problem: str, repo: str) -> None:
        super().__init__(f"{problem}; {self.fix}")
        self.repo = repo


class NumericError(SafeLoraError):
    """A tensor holds NaN or Inf."""


class PrecisionError(NumericError):
    """A value overflows float32; float64 would hold it."""


class DeviceError(SafeLoraError):
    """The device asked for is not there."""


class BackupError(SafeLoraError):
    """A kept original cannot be written, found or trusted; the adapter is left as it was."""


class BackupNotKeptError(BackupError):
    """The original cannot be kept before an in-place rewrite, so the rewrite does not happen."""


class KeyFileError(SafeLoraError):
    """A signing or public key that cannot be used: unreadable, not PEM, or of a kind safelora does not sign with."""


class SignRefusedError(SafeLoraError):
    """``sign`` refused: nothing verifies the adapter, so signing it would vouch for an unverified stamp (exit 3,
    as ``check``'s verdict)."""

    exit_code = 3


class UsageError(SafeLoraError):
    """Options that contradict each other; exit 2 like any usage error."""

    exit_code = 2


class OutputCollisionError(UsageError):
    """Adapters of one batch whose outputs would be one directory: refused before anything is read or written."""

    concerns = ("output",)


class ConfigFileError(SafeLoraError):
    """A config file that cannot be read as one (missing, not a regular file, too large)."""

    fix = "give a YAML file of option names and values"


class ConfigError(UsageError):
    """A config that is not a mapping of known option names to values the options take."""

    fix = ConfigFileError.fix


class MissingBaseError(UsageError):
    """No base model was given, and none follows from the aligned model."""


class MissingAlignedError(UsageError):
    """No aligned model was given, and the adapter's config names none that can be used."""


class MissingExtraError(UsageError, ImportError):
    """An optional extra is not installed (``safelora[hf]`` for transformers and peft,
    ``safelora[plot]`` for matplotlib); the message says what to install.

    A ``UsageError`` (one line, exit 2) that is also an ``ImportError``, so that the usual
    ``except ImportError`` around an optional integration catches it too.
    """


class PolicyError(UsageError):
    """A policy file that is not a mapping of the keys a policy takes to values of their types."""


class EvalInputError(SafeLoraError):
    """``eval`` cannot use a prompt, marker or utility file (missing, empty, no usable column), or a
    judge's answer."""


class EvalModelError(SafeLoraError):
    """``eval``'s model (or judge) cannot be loaded as a causal language model, or an adapter does
    not fit it."""


class ModelFitError(EvalModelError):
    """The model, by the estimate made before loading it, does not fit the memory of the device."""
