"""What ``eval`` finds: per variant the refusal rates and the perplexity, the paired comparisons
with their p-values, and every response as a record. Frozen data, each with ``to_json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from .perplexity import Perplexity
from .prompts import PromptSet

HARMFUL, BENIGN = "harmful", "benign"


@dataclass(frozen=True)
class Record:
    """One response: which variant, which set, the prompt as the file gave it, and the judgement."""

    variant: str
    set: str
    prompt: str
    response: str
    refused: bool
    verdict: str | None = None  # the judge's, on the harmful set

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "variant": self.variant,
            "set": self.set,
            "prompt": self.prompt,
            "response": self.response,
            "refused": self.refused,
        }
        if self.verdict is not None:
            doc["verdict"] = self.verdict
        return doc


@dataclass(frozen=True)
class Score:
    """Refusals on one prompt set."""

    refused: int
    total: int

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.total

    @property
    def compliance(self) -> float:
        """Harmful compliance: the share of prompts not refused."""
        return (self.total - self.refused) / self.total

    def to_json(self, name: str) -> dict[str, object]:
        doc: dict[str, object] = {"refused": self.refused, "total": self.total, "refusal_rate": self.refusal_rate}
        key = "compliance" if name == HARMFUL else "over_refusal"
        doc[key] = self.compliance if name == HARMFUL else self.refusal_rate
        return doc


@dataclass(frozen=True)
class Variant:
    """The model alone, an adapter on it, or an adapter's original on it."""

    name: str
    kind: str  # model, adapter, original
    path: str | None  # the adapter directory (an original: the adapter it is the original of)
    digest: str | None  # the adapter's stamp digest (safelora's, over its tensors and config)
    source: str | None = None  # an original: "backup" (the store, by sha256) or "given" (a directory)
    original_path: str | None = None  # an original's file or directory
    scores: dict[str, Score] = field(default_factory=dict)
    perplexity: Perplexity | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "adapter": self.path,
            "digest": self.digest,
            "original_source": self.source,
            "original_path": self.original_path,
            **{name: score.to_json(name) for name, score in self.scores.items()},
            "perplexity": None if self.perplexity is None else self.perplexity.to_json(),
        }


@dataclass(frozen=True)
class Comparison:
    """An adapter against its original or the model alone, on one set: the exact McNemar test on the
    paired refusals and its Holm-adjusted value across every comparison of the run."""

    variant: str
    against: str
    set: str
    refused_by_variant_only: int  # b
    refused_by_other_only: int  # c
    p_value: float
    p_holm: float

    def to_json(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "against": self.against,
            "set": self.set,
            "refused_by_variant_only": self.refused_by_variant_only,
            "refused_by_other_only": self.refused_by_other_only,
            "discordant": self.refused_by_variant_only + self.refused_by_other_only,
            "p_value": self.p_value,
            "p_holm": self.p_holm,
        }


@dataclass(frozen=True)
class UtilityText:
    path: str
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class EvalResult:
    """Everything one evaluation measured; ``records`` are its responses (``--records`` writes them)."""

    model: str
    judge: dict[str, Any]
    judge_text: str  # the judge as people read it
    prompt_sets: tuple[PromptSet, ...]
    utility: UtilityText | None
    settings: dict[str, Any]
    variants: tuple[Variant, ...]
    comparisons: tuple[Comparison, ...]
    records: tuple[Record, ...] = field(repr=False)
    notes: tuple[str, ...] = ()

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def to_json(self) -> dict[str, object]:
        """Every figure of the evaluation (not the responses: ``records`` has those)."""
        return {
            "safelora_version": __version__,
            "model": self.model,
            "judge": self.judge,
            "prompt_sets": [p.to_json() for p in self.prompt_sets],
            "utility": None if self.utility is None else self.utility.to_json(),
            "settings": self.settings,
            "variants": [v.to_json() for v in self.variants],
            "comparisons": [c.to_json() for c in self.comparisons],
            "notes": list(self.notes),
        }
