"""Attention maps: one input run through a trained model, its attention probabilities kept per kind,
layer and head, and the token strings that label them.

`attention_maps` runs one input through a run's model with `return_attention=True` and keeps the attention
probabilities exactly as the model computed them: per kind ("encoder", "decoder", "cross"), one
(heads, query, key) array per layer. Rows are queries (the token that looks), columns keys (the tokens
looked at); every row sums to 1. What the maps show is where each head takes its values from, not why the
model decided anything: attention weights are one ingredient among the residual stream, the feed-forward
layers and the other heads (Jain and Wallace, 2019, "Attention is not Explanation").

Numbering: layers and heads count from 1 wherever a person reads or types them (titles, file names, the
HTML page, the `layer` and `head` arguments and the command line), as the paper's figures do ("layer 5 of
6"); `maps.maps[kind][layer - 1][head - 1]` is the array.

Token strings are the tokenizer's, made readable: SentencePiece's word-start mark "▁" and a space are
drawn as "_" ("▁Ein" -> "_Ein"), so a piece that starts a word shows where the word starts; a newline is
"\\n" and a tab "\\t"; WordPiece continuations keep their "##". The classifier's first position is drawn
as "[CLS]" and the decoder's start token as "<s>".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vaswani.models import evaluating
from vaswani.tasks import (
    ClassificationTask,
    EncoderTask,
    LanguageModelTask,
    MaskedLMTask,
    TranslationTask,
)

# Matplotlib's colour map for attention weights: the PNGs draw with it and the HTML page reads the same
# colours from it.
COLORMAP = "Blues"
_SPACE_MARK = "\u2581"
_READABLE = {_SPACE_MARK: "_", " ": "_", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def readable_token(token: str) -> str:
    """A token string as the plots print it: "▁" and spaces as "_", newlines and tabs escaped."""
    return "".join(_READABLE.get(char, char) for char in token)


@dataclass
class AttentionMaps:
    """The attention probabilities of one input, as the model computed them.

    kind: "translation", "classification" or "lm".
    source_tokens: the encoder's tokens (translation: the source; classification: "[CLS]" + the input);
        empty for a language model.
    target_tokens: the decoder's tokens (translation: "<s>" + the target, the decoder input of teacher
        forcing, so row i is the decoder reading token i and predicting token i + 1; lm: the text).
    maps: "encoder" / "decoder" / "cross" -> one (heads, query, key) float32 array per layer (a stack of
        zero layers has no entry).
    text, target: the input text and the target text used (the model's own translation when none was
        given); prediction: the classifier's label and probability.
    source_ids, target_ids: the ids fed to the model (the classifier adds [CLS] itself).
    dropped: lm: the text's first tokens left out because the model reads only its last context window.
    """

    kind: str
    source_tokens: list[str]
    target_tokens: list[str]
    maps: dict[str, list[np.ndarray]]
    text: str = ""
    target: str | None = None
    prediction: str | None = None
    source_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    dropped: int = 0

    def axes(self, name: str) -> tuple[list[str], list[str]]:
        """(query tokens, key tokens) of attention kind `name`: the rows and columns of its maps."""
        self._check_name(name)
        if name == "encoder":
            return self.source_tokens, self.source_tokens
        if name == "decoder":
            return self.target_tokens, self.target_tokens
        return self.target_tokens, self.source_tokens

    def n_layers(self, name: str) -> int:
        self._check_name(name)
        return len(self.maps[name])

    def n_heads(self, name: str) -> int:
        self._check_name(name)
        return self.maps[name][0].shape[0]

    def layer(self, name: str, layer: int) -> np.ndarray:
        """The (heads, query, key) array of `layer` (from 1) of kind `name`."""
        count = self.n_layers(name)
        if not isinstance(layer, int) or not 1 <= layer <= count:
            raise ValueError(f"layer {layer!r}: the {title_of(self, name)} has layers 1 to {count}")
        return self.maps[name][layer - 1]

    def check_head(self, name: str, head: int) -> None:
        """Raise ValueError unless `head` (from 1) is a head of kind `name`."""
        count = self.n_heads(name)
        if not isinstance(head, int) or not 1 <= head <= count:
            raise ValueError(f"head {head!r}: the {title_of(self, name)} has heads 1 to {count}")

    def _check_name(self, name: str) -> None:
        if name not in self.maps:
            raise ValueError(f"no {name!r} attention in a {self.kind} model: it has {', '.join(self.maps)}")


def title_of(maps: AttentionMaps, name: str) -> str:
    """What attention kind `name` is called on plots: "cross-attention", "decoder self-attention", ..."""
    if name == "cross":
        return "cross-attention"
    if maps.kind == "lm":
        return "causal self-attention"
    return f"{name} self-attention"


def axis_names(maps: AttentionMaps, name: str) -> tuple[str, str]:
    """(row name, column name) of kind `name`: "source", "target", "text" or "[CLS] + input"."""
    source = "[CLS] + input" if maps.kind == "classification" else "source"
    target = "text" if maps.kind == "lm" else "target"
    if maps.dropped:
        target = f"text (its last {len(maps.target_tokens)} tokens)"
    return {"encoder": (source, source), "decoder": (target, target), "cross": (target, source)}[name]


def _encode(tokenizer: Any, text: str, what: str) -> list[int]:
    ids = tokenizer.encode(text) if text.strip() else []
    if not ids:
        raise ValueError(f"the {what} is empty: nothing to look at")
    return ids


def _check_fits(length: int, limit: int, what: str) -> None:
    if length > limit:
        raise ValueError(f"the {what} has {length} tokens; the model takes at most {limit}")


def _numpy(weights: dict[str, list[torch.Tensor]]) -> dict[str, list[np.ndarray]]:
    """The model's attention of batch row 0 as float32 arrays; a kind without layers is left out."""
    kept = {name: [w[0].float().cpu().numpy() for w in layers] for name, layers in weights.items() if layers}
    if not kept:
        raise ValueError("the model has no attention layers to look at")
    return kept


def attention_maps(run: Any, text: str, target: str | None = None) -> AttentionMaps:
    """Run `text` through a loaded run (`vaswani.runs.load_run`) and return its attention maps.

    Translation: `text` is the source; the decoder reads "<s>" + `target`, or "<s>" + the model's own
    translation (the run's decoding settings, re-tokenized) when no target is given. Classification: the
    model prepends [CLS] (position 0). Language model: `text` is the context, of which the model reads the
    last `task.context_window` tokens (the maps' `text` is then that window, `dropped` counts the tokens
    before it). The model runs in eval mode
    without gradients, so the maps are exactly `model(..., return_attention=True)` for these ids.
    Raises ValueError, in one line, for an empty or over-long input.
    """
    task, model, device = run.task, run.model, run.device
    if not isinstance(
        task, (TranslationTask, ClassificationTask, LanguageModelTask, EncoderTask, MaskedLMTask)
    ):
        raise ValueError(
            f"attention_maps reads text; a {run.recipe.data.task} run takes "
            "vaswani.interpret.image_attention_maps"
        )
    tokenizer, cfg = task.tokenizer, model.config

    def tokens(ids: list[int]) -> list[str]:
        return [readable_token(tokenizer.id_to_token(i) or "<unk>") for i in ids]

    def tensor(ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=device)

    ids = _encode(tokenizer, text, "text")
    if not isinstance(task, LanguageModelTask):
        # What ends every encoder input (Marian's </s>, BERT's [SEP]; nothing for vaswani's tokenizers).
        ids = [*ids, *tokenizer.suffix_ids]
    if target is not None and not isinstance(task, TranslationTask):
        raise ValueError(f"a target is for translation runs; this is a {run.recipe.data.task} run")
    with torch.no_grad(), evaluating(model):
        if isinstance(task, TranslationTask):
            _check_fits(len(ids), cfg.max_len, "text")
            if target is None:
                target = task.translate(model, [text], device)[0]
                target_ids = tokenizer.encode(target)  # the model may translate into nothing
            else:
                target_ids = _encode(tokenizer, target, "target")
            tgt_in = [cfg.bos_id, *target_ids]
            _check_fits(len(tgt_in), cfg.max_len, "target with <s>")
            _, weights = model(tensor(ids), tensor(tgt_in), return_attention=True)
            return AttentionMaps(
                "translation",
                tokens(ids),
                ["<s>", *tokens(target_ids)],
                _numpy(weights),
                text=text,
                target=target,
                source_ids=ids,
                target_ids=tgt_in,
            )
        if isinstance(task, ClassificationTask):
            _check_fits(len(ids) + 1, cfg.max_len, "text with [CLS]")
            logits, weights = model(tensor(ids), return_attention=True)
            probs = torch.softmax(logits[0].float(), dim=-1)
            best = int(probs.argmax())
            return AttentionMaps(
                "classification",
                ["[CLS]", *tokens(ids)],
                [],
                _numpy(weights),
                text=text,
                prediction=f"{task.label_names[best]} ({float(probs[best]):.3f})",
                source_ids=ids,
            )
        if isinstance(task, MaskedLMTask):  # the classifier's input: [CLS] prepended by the model
            _check_fits(len(ids) + 1, cfg.max_len, "text with [CLS]")
            _, weights = model(tensor(ids), return_attention=True)
            return AttentionMaps(
                "classification", ["[CLS]", *tokens(ids)], [], _numpy(weights), text=text, source_ids=ids
            )
        if isinstance(task, EncoderTask):  # an imported encoder: its own [CLS] and [SEP] are in the input
            ids = [cfg.classifier_cls_id, *ids]
            _check_fits(len(ids), cfg.max_len, "text with [CLS] and [SEP]")
            _, weights = model(tensor(ids), return_attention=True)
            return AttentionMaps(
                "classification", tokens(ids), [], _numpy(weights), text=text, source_ids=ids
            )
        if isinstance(task, LanguageModelTask):
            # What the model reads when it predicts the token after `text`: its last context window.
            window = task.context_window(model)
            dropped = max(0, len(ids) - window)
            ids = ids[dropped:]
            _, weights = model(tensor(ids), return_attention=True)
            if dropped:
                text = tokenizer.decode(ids)
            return AttentionMaps(
                "lm", [], tokens(ids), _numpy(weights), text=text, target_ids=ids, dropped=dropped
            )
    raise ValueError(
        f"attention maps need a translation, classification or lm run, not {type(task).__name__}"
    )
