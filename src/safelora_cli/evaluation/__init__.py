"""``safelora eval``: refusal, over-refusal and utility of a chat model alone, with each adapter and
with each adapter's original, measured the same way for all.

``run`` runs one evaluation (``api.evaluate``): ``prompts`` reads the files, ``generate`` loads the
model once and answers greedily, ``variants`` puts the adapters on it as PEFT adapters, ``judges``
judges the answers, ``stats`` and ``perplexity`` compute the figures, ``result`` holds them, and
``written`` writes what the caller asks for (records, the model card's section).
"""
