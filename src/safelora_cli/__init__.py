"""safelora: Safe LoRA projection for PEFT adapters, streamed from local or Hub checkpoints.

The Python API, for training scripts (plain ``transformers``, TRL, Unsloth, Axolotl)::

    import safelora_cli

    report = safelora_cli.project("./my-adapter", base="meta-llama/Llama-2-7b-hf",
                                  aligned="meta-llama/Llama-2-7b-chat-hf")
    print(report.projected_count, "of", len(report.layers), "modules projected")

Importing the package is cheap: each function loads what it needs (torch, the Hub client) when
it is first called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

__all__ = [
    "AdapterError",
    "BackupError",
    "CheckResult",
    "EvalResult",
    "FormatError",
    "HubError",
    "Inspection",
    "MissingExtraError",
    "ModelReport",
    "Report",
    "Restored",
    "SafeLoraError",
    "SignRefusedError",
    "Signed",
    "SourceError",
    "UsageError",
    "__version__",
    "check",
    "evaluate",
    "inspect",
    "project",
    "project_model",
    "restore",
    "sign",
]

if TYPE_CHECKING:
    from .api import (
        CheckResult,
        EvalResult,
        Inspection,
        Report,
        Restored,
        Signed,
        check,
        evaluate,
        inspect,
        project,
        restore,
        sign,
    )
    from .errors import (
        AdapterError,
        BackupError,
        FormatError,
        HubError,
        MissingExtraError,
        SafeLoraError,
        SignRefusedError,
        SourceError,
        UsageError,
    )
    from .integrations.peft_model import ModelReport, project_model

# Where each public name lives: imported on first use, so that ``import safelora_cli`` (and the
# command line's --help) does not pay for torch.
_HOMES = {
    "CheckResult": "api",
    "EvalResult": "api",
    "evaluate": "api",
    "Inspection": "api",
    "Report": "api",
    "Restored": "api",
    "check": "api",
    "inspect": "api",
    "project": "api",
    "restore": "api",
    "Signed": "api",
    "sign": "api",
    "SignRefusedError": "errors",
    "project_model": "integrations.peft_model",
    "ModelReport": "integrations.peft_model",
    "MissingExtraError": "errors",
    "BackupError": "errors",
    "AdapterError": "errors",
    "FormatError": "errors",
    "HubError": "errors",
    "SafeLoraError": "errors",
    "SourceError": "errors",
    "UsageError": "errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
