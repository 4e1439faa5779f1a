"""safelora in a ``transformers`` training run: a sanitized copy of the adapter at every checkpoint.

    from safelora_cli.integrations.transformers import SafeLoraCallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                      callbacks=[SafeLoraCallback(base="meta-llama/Llama-2-7b-hf",
                                                  aligned="meta-llama/Llama-2-7b-chat-hf")])

Importing this module imports transformers; without the ``hf`` extra it raises one line
(``MissingExtraError``, both a ``SafeLoraError`` and an ``ImportError``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

from .. import api
from ..api import Report
from ..errors import AdapterError, SafeLoraError, UsageError
from ..io import atomic, safefs
from .peft_model import missing_extra

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:
    raise missing_extra("safelora_cli.integrations.transformers", e) from None

SANITIZED = "safelora"  # <checkpoint>/safelora/: the sanitized copy of the checkpoint's adapter

logger = logging.getLogger(__name__)


class SafeLoraCallback(TrainerCallback):
    """Write a sanitized copy of each checkpoint's LoRA adapter to ``<checkpoint>/safelora/``.

    On every ``on_save`` the main process (``state.is_world_process_zero``) projects the adapter the
    Trainer just saved in ``<output_dir>/checkpoint-<step>`` (or its ``adapter_name`` subdirectory)
    against ``base`` and ``aligned``, as ``safelora project --output`` does: ``safelora/`` is a
    complete adapter directory (config, weights with provenance, README) that ``safelora check``
    passes. The checkpoint's own files are never changed (only a ``safelora/`` an earlier run left
    for the same step is replaced), so ``resume_from_checkpoint`` resumes the real training state;
    the adapter the Trainer loads from ``safelora/`` when resuming is dropped (``on_train_begin``).
    The options are ``project``'s (``Options``), checked here rather than at the first save (``model_card``
    writes the Safe LoRA section into ``safelora/README.md``).

    ``Trainer.save_model()`` fires no callback: run ``safelora_cli.project(out_dir, base=…,
    aligned=…)`` after it.

    A failure to sanitize one checkpoint (the network, a full disk, a bad file) is logged as a
    warning and training goes on (``failures`` keeps the errors, ``reports`` the runs that
    succeeded), unless ``on_error="raise"``; a ``UsageError`` (settings that can never work) always
    stops the run at the first save.
    """

    def __init__(
        self,
        *,
        base: api.StrPath,
        aligned: api.StrPath,
        adapter_name: str = "default",
        on_error: Literal["warn", "raise"] = "warn",
        **options: Any,
    ) -> None:
        api.Options.check_names("SafeLoraCallback", options)
        self.options = api.Options(base=base, aligned=aligned, **options).checked()
        if adapter_name == SANITIZED:
            raise UsageError(
                f"adapter_name {SANITIZED!r}: PEFT saves that adapter where the sanitized copy goes "
                f"(<checkpoint>/{SANITIZED}/); give the adapter another name"
            )
        if on_error not in ("warn", "raise"):
            raise UsageError(f"on_error {on_error!r}: choose warn or raise")
        self.adapter_name = adapter_name
        self.on_error = on_error
        self.reports: list[Report] = []
        self.failures: list[SafeLoraError] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Drop the adapter ``resume_from_checkpoint`` loaded from ``<checkpoint>/safelora/``.

        The Trainer loads every subdirectory of a checkpoint that holds adapter weights as an extra
        adapter named after it, and would then save it into every later checkpoint (and into
        ``save_model``'s output) as ``safelora/``: a stale copy without provenance. Every process
        loaded it, so every process drops it.
        """
        model: Any = kwargs.get("model")
        configs = getattr(model, "peft_config", None)
        if not isinstance(configs, dict) or SANITIZED not in configs or SANITIZED in model.active_adapters:
            return
        model.delete_adapter(SANITIZED)
        logger.info(
            "safelora: dropped the adapter %r that resuming loaded from a checkpoint's %s/", SANITIZED, SANITIZED
        )

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Sanitize the checkpoint just saved (main process only)."""
        if not state.is_world_process_zero:
            return
        # TrainingArguments fills output_dir in ("trainer_output") when it is left None.
        checkpoint = Path(cast(str, args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        try:
            report = self._sanitize(checkpoint)
        except UsageError:
            raise
        except SafeLoraError as e:
            if self.on_error == "raise":
                raise
            self.failures.append(e)
            logger.warning("safelora: %s/%s/ not written, training goes on: %s", checkpoint, SANITIZED, e)
            return
        self.reports.append(report)
        logger.info(
            "safelora: %s/%s/: %d of %d modules projected",
            checkpoint,
            SANITIZED,
            report.projected_count,
            len(report.layers),
        )

    def _sanitize(self, checkpoint: Path) -> Report:
        """Project the checkpoint's adapter into ``<checkpoint>/safelora/``, as ``project --output``
        does: from a checkpoint it copies only the adapter's files, never the training state."""
        source = checkpoint if self.adapter_name == "default" else checkpoint / self.adapter_name
        fix = "the callback reads checkpoints from TrainingArguments.output_dir"
        with safefs.Directory(checkpoint, AdapterError, fix=fix) as ckpt:
            if ckpt.lstat(SANITIZED) is not None:
                # Left by an earlier run that saved this step too: it belongs to other weights.
                atomic.remove_entry(ckpt.fd, SANITIZED)
        return api.run(source, replace(self.options, output=checkpoint / SANITIZED))
