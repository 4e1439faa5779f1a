"""safelora: Safe LoRA projection for PEFT adapters, streamed from local or Hub checkpoints."""

__version__ = "0.1.0"
