"""What else a location may be when it is given as an adapter: a Trainer checkpoint, a training run's
directory, a full model.

A Trainer checkpoint (``checkpoint-<step>/``) holds the adapter beside the training state that
resuming reads: rewriting the adapter there would make a resumed run continue from projected
weights, and a copy of the directory would carry the optimizer's moments, the RNG state and the
training arguments into what gets uploaded. So a checkpoint is found by that state, and a copy of one
takes the adapter's own files only. An adapter saved under a name of its own lies one level down
(``checkpoint-6/<adapter_name>/``, PEFT's layout for named adapters): the state beside its parent
makes it a checkpoint's too.
"""

from __future__ import annotations

import os
import re
import stat

from ..io import safefs

# What the Trainer writes into a checkpoint beside the model: any of them makes it one.
# Where a checkpoint's sanitized copy goes (the Trainer callback's layout): the one output that may lie
# inside the adapter directory it is written from (the copy leaves it out).
CHECKPOINT_OUTPUT = "safelora"
TRAINING_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
_RNG_PER_PROCESS = re.compile(r"rng_state_\d{1,6}\.pth")
# What a copy of a checkpoint takes: the adapter's weights and config (written by the format), its
# card, and the tokenizer the Trainer saved with it.
ADAPTER_FILES = frozenset(
    {
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
_RUN_CHECKPOINT = re.compile(r"checkpoint-\d{1,12}")
_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def training_state(location: safefs.Directory) -> list[str]:
    """The Trainer's state files found at ``location`` (empty when it is no checkpoint)."""
    return sorted(name for name in location.names() if name in TRAINING_STATE or _RNG_PER_PROCESS.fullmatch(name))


def checkpoint_state(location: safefs.Directory) -> list[str]:
    """The Trainer's state that makes ``location`` part of a checkpoint: its own, else that of its
    immediate parent (as ``../name``), found through the directory already opened, so that the parent
    is the one the directory really has, whatever path or link named it. The parent's
    ``CHECKPOINT_OUTPUT`` (the sanitized copy, which resuming never reads) is no part of it, and a
    parent that cannot be opened or listed holds no state this run can see."""
    own = training_state(location)
    if own:
        return own
    try:
        fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=location.fd)
    except OSError:
        return []
    with safefs.Directory(location.path / "..", location.error, fd=fd) as parent:
        try:
            copy = parent.lstat(CHECKPOINT_OUTPUT)
            if parent.identity == location.identity or (copy is not None and _identity(copy) == location.identity):
                return []  # the root (its own parent), or the checkpoint's sanitized copy
            return [f"../{name}" for name in training_state(parent)]
        except location.error:
            return []


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def run_checkpoints(location: safefs.Directory) -> list[str]:
    """The ``checkpoint-<step>`` directories of a training run's output directory, by step."""
    found = []
    for name in location.names():
        st = location.lstat(name) if _RUN_CHECKPOINT.fullmatch(name) else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            found.append(name)
    return sorted(found, key=lambda name: int(name.split("-")[1]))


def is_model(location: safefs.Directory) -> bool:
    """Whether ``location`` holds a full model (its ``config.json`` and weights) rather than an adapter."""
    names = set(location.names())
    return "config.json" in names and any(
        name in _MODEL_WEIGHTS or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) for name in names
    )


def not_an_adapter(location: safefs.Directory) -> str | None:
    """What ``location`` is instead of an adapter, with what to pass instead; None when it is nothing
    this module knows."""
    where = location.path
    checkpoints = run_checkpoints(location)
    if checkpoints:
        shown = ", ".join(checkpoints[-5:]) + (f" (and {len(checkpoints) - 5} more)" if len(checkpoints) > 5 else "")
        return f"{where}: a training run's directory, not an adapter; its checkpoints: {shown}; pass one of them"
    if is_model(location):
        return f"{where}: a model, not an adapter (config.json and model weights); pass a LoRA adapter's directory"
    return None
