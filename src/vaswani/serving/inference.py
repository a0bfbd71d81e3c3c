"""What one batch of requests runs: the tasks' own inference functions (`TranslationTask.translate`,
`ClassificationTask.predict`, `LanguageModelTask.generate_batch`) and `vaswani.interpret.attention_maps`.
Nothing here decodes or tokenizes by itself.

A batch key is (model name, operation, options): items share a batch only when every option is equal, so a
request gets the output it would get alone (batched greedy and beam search equal unbatched ones; the tests
check it). A seeded sampling request is given a key of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Any

import torch

from vaswani.interpret import attention_maps
from vaswani.interpret.html import attention_page_data
from vaswani.serving.registry import ServedModel

_unique = itertools.count()  # makes keys that no other request shares


def batch_key(model: str, operation: str, options: dict[str, Any]) -> tuple:
    """The key of an item: a seeded request is never batched with another (its draws would depend on them)."""
    if options.get("seed") is not None:
        return (model, operation, ("alone", next(_unique)), tuple(sorted(options.items())))
    return (model, operation, tuple(sorted(options.items())))


def make_runner(models: dict[str, ServedModel]):
    """The `run_batch(key, items)` of a `DynamicBatcher` serving `models`."""

    def run_batch(key: Hashable, items: list[str]) -> list[Any]:
        name, operation, *_, options = key
        served = models[name]
        run, options = served.run, dict(options)
        with torch.inference_mode():
            if operation == "translate":
                return run.task.translate(run.model, items, run.device, **options)
            if operation == "classify":
                probs = run.task.predict(run.model, run.task.encode(items), run.device)
                names = run.task.label_names
                return [dict(zip(names, row, strict=True)) for row in probs.tolist()]
            if operation == "generate":
                seed = options.pop("seed", None)
                if seed is not None:
                    options["generator"] = torch.Generator(device=run.device).manual_seed(seed)
                return run.task.generate_batch(run.model, items, run.device, **options)
        raise ValueError(f"unknown operation {operation!r}")

    return run_batch


def attention(served: ServedModel, text: str, target: str | None) -> dict[str, Any]:
    """The attention page's data for one input (the model's own output decoded first, where there is one)."""
    with torch.inference_mode():
        maps = attention_maps(served.run, text, target)
    title = f"{served.name}: {maps.kind} attention"
    return attention_page_data(maps, title)
