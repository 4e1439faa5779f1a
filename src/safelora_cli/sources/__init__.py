"""Where base and aligned weights come from: one tensor at a time, never a whole model.

``base`` holds what every source shares, ``registry`` the kinds of source and ``open_source``, which
turns what the user typed into one of them. The built-in kinds register here, as any other would:
``local`` reads checkpoints on disk, and ``hub`` reads Hub repos (its HTTP stack is imported only by
runs that use the Hub: huggingface_hub costs ~0.25 s to import).
"""

from __future__ import annotations

from . import hub, local
from .base import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    QuietTransfer,
    Source,
    Transfer,
    parse_index,
)
from .hub import HF_PREFIX, Hub, HubRef, RefMemo, hf_cache_dir, parse_ref
from .local import SafetensorsSource, TorchBinSource, open_local, open_shard
from .registry import Register, Request, SourceKind, kind_for, kinds, open_source, register

__all__ = [
    "BIN_INDEX",
    "BIN_SINGLE",
    "HF_PREFIX",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "Hub",
    "HubRef",
    "QuietTransfer",
    "RefMemo",
    "Register",
    "Request",
    "SafetensorsSource",
    "Source",
    "SourceKind",
    "TorchBinSource",
    "Transfer",
    "hf_cache_dir",
    "kind_for",
    "kinds",
    "open_local",
    "open_shard",
    "open_source",
    "parse_index",
    "parse_ref",
    "register",
]

# In this order: an existing local path is asked before a repo id (``hf://`` wins by its prefix).
local.register_sources(register)
hub.register_sources(register)
