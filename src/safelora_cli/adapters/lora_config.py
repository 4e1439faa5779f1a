"""``LoraConfig``: the LoRA settings every adapter format maps its own config onto, in PEFT's terms
(PEFT's ``adapter_config.json`` is the richest of the formats, and the one the others convert from)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .patterns import ConfigPatterns, saved

CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    """The parts of ``adapter_config.json`` that interpret the adapter's keys.

    Its patterns are matched as PEFT matches them, within one time budget for the config
    (``patterns``); building a ``LoraConfig`` compiles them all, and raises ``AdapterError`` for one
    that is invalid or cannot be bounded. ``source`` names the config file in messages.
    """

    r: int
    target_modules: list[str] | str | None
    rank_pattern: dict[str, int]
    fan_in_fan_out: bool
    use_dora: bool
    layers_to_transform: list[int] | None
    init_lora_weights: object
    base_model_name_or_path: str | None
    modules_to_save: list[str] = field(default_factory=list)
    alpha_pattern: dict[str, object] = field(default_factory=dict)
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    source: str = CONFIG_FILE
    patterns: ConfigPatterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A frozen dataclass sets derived fields through object.__setattr__.
        object.__setattr__(
            self,
            "patterns",
            ConfigPatterns(
                self.source,
                target_modules=self.target_modules,
                exclude_modules=self.exclude_modules,
                modules_to_save=self.modules_to_save,
                rank_pattern=self.rank_pattern,
                alpha_pattern=self.alpha_pattern,
                layers_pattern=self.layers_pattern,
                layers_to_transform=self.layers_to_transform,
            ),
        )

    def expected_rank(self, module: str) -> int:
        """r for ``module``: the first matching ``rank_pattern`` key (as PEFT matches it), else r."""
        # PEFT resolves both patterns for every module it adapts. Safe LoRA's similarity does not
        # depend on alpha, but a key PEFT could not match in bounded time is refused all the same.
        self.patterns.alpha_key(module)
        return int(self.rank_pattern.get(self.patterns.rank_key(module), self.r))

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` with this config (``layers_to_transform`` included)."""
        return self.patterns.targets(module)

    def layer(self, module: str) -> int | None:
        """``module``'s layer index as PEFT finds it for ``layers_to_transform`` (``layers_pattern`` honoured)."""
        return self.patterns.layer(module)

    def saves(self, key: str) -> bool:
        """Whether ``key`` is a full weight PEFT saved for a ``modules_to_save`` module."""
        return saved(self.modules_to_save, key.removeprefix(PEFT_PREFIX))
