"""Tasks: what turns a recipe into data, a tokenizer, a model, batches, a loss and metrics.

Three tasks share the training loop (vaswani.training.trainer):
- `TranslationTask`: parallel text -> joint BPE (§5.1) -> `Transformer`, label-smoothed loss, BLEU.
- `ClassificationTask`: labelled text -> word pieces -> `TransformerClassifier`, accuracy and macro-F1.
- `LanguageModelTask`: a text stream -> characters (or BPE) -> `TransformerLM`, bits per character.
- `ImageClassificationTask` (vaswani.vision_task): images -> `VisionTransformer`, accuracy and macro-F1.
- `EncoderTask`: an imported BERT-family encoder (`vaswani import-hf`): embeddings and attention, no training.

A task reads its data lazily, so a trained run can be loaded for inference without the training data.
Special ids (padding, BOS, EOS, [CLS], what ends an encoder input) come from the run's tokenizer, which may
be a pretrained model's (`vaswani.hub`). With `[model] init_from`, the tokenizer and the architecture are the
pretrained model's; the architecture is then written to RUN_DIR/model.json, which fixes it for the run.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaswani.config import TransformerConfig
from vaswani.data.batching import make_classification_batch, make_translation_batch, pad_batch, token_batches
from vaswani.data.datasets import (
    LabeledTexts,
    ParallelCorpus,
    load_classification,
    load_fine_labels,
    load_labeled_file,
    load_parallel_files,
    load_text_file,
    load_tiny_shakespeare,
    load_translation,
)
from vaswani.evaluation import classification_report, corpus_bleu, corpus_chrf
from vaswani.models import (
    Transformer,
    TransformerClassifier,
    TransformerEncoder,
    TransformerLM,
    TransformerMaskedLM,
    combine_heads,
    fine_membership,
)
from vaswani.recipes import Recipe, RecipeError
from vaswani.tokenization import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from vaswani.training.losses import LossOutput, label_smoothed_cross_entropy
from vaswani.vision_task import ImageClassificationTask

TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.txt"
FINE_LABELS_FILE = "fine_labels.txt"  # [data] fine_labels: "fine class<TAB>its class" a line
MODEL_CONFIG_FILE = "model.json"
FILES_SPLITS = ("train", "valid", "test")


class _Task:
    run_files: tuple[str, ...] = (TOKENIZER_FILE,)  # beyond recipe.toml, what loading a trained run needs

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        self.recipe, self.run_dir = recipe, Path(run_dir)

    # ------------------------------------------------------------------ tokenizer
    def _training_texts(self) -> list[str]:
        raise NotImplementedError

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer: loaded from the run directory, else the pretrained model's (init_from), else
        trained on the training data; saved into the run directory."""
        path = self.run_dir / TOKENIZER_FILE
        if path.is_file():
            return load_tokenizer(path)
        if self.recipe.init_from is not None:
            tokenizer = self.pretrained.tokenizer
            tokenizer.save(path)
            return tokenizer
        d = self.recipe.data
        texts = self._training_texts()
        if d.tokenizer == "chars":
            tokenizer = Tokenizer.train_chars(texts)
        elif d.tokenizer == "wordpiece":
            tokenizer = Tokenizer.train_wordpiece(texts, d.vocab_size, lowercase=d.lowercase)
        else:
            tokenizer = Tokenizer.train_bpe(texts, d.vocab_size)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
        return tokenizer

    def model_config(self) -> TransformerConfig:
        """The run's architecture: RUN_DIR/model.json when there is one (imported or fine-tuned models),
        else the pretrained model's adapted to the task (init_from, then written to model.json), else the
        recipe's with the tokenizer's vocabulary and ids."""
        path = self.run_dir / MODEL_CONFIG_FILE
        if path.is_file():
            try:
                values = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ValueError(f"{path}: not a readable JSON file (corrupt?): {error}") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path}: expected a JSON object of model settings")
            try:
                return TransformerConfig.from_dict(values)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}: {error}") from None
        if self.recipe.init_from is not None:
            overrides = {k: v for k, v in self.recipe.model.items() if k != "init_from"}
            cfg = self._adapt_config(self.pretrained.model.config).replace(**overrides)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
            return cfg
        tok = self.tokenizer
        return self._recipe_config(
            vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id
        )

    def _recipe_config(self, **derived) -> TransformerConfig:
        return self.recipe.model_config(**derived)

    # ------------------------------------------------------------------ pretrained weights (init_from)
    #: what the pretrained model must be for this task: model classes accepted as a starting point
    init_sources: tuple[type, ...] = ()

    @cached_property
    def pretrained(self):
        """The model and tokenizer named by [model] init_from, loaded on the CPU."""
        from vaswani.hub import read_hf

        spec = self.recipe.init_from
        if spec.startswith("hf:"):
            pretrained = read_hf(spec[3:])
            model, tokenizer = pretrained.model, pretrained.tokenizer
        else:
            from vaswani.runs import load_run  # runs imports tasks

            run = load_run(spec, device="cpu")
            model, tokenizer = run.model, run.task.tokenizer
        if not isinstance(model, self.init_sources):
            raise RecipeError(
                f"[model] init_from = {spec!r} is a {type(model).__name__}; a {self.recipe.data.task} "
                f"run starts from {' or '.join(c.__name__ for c in self.init_sources)}"
            )
        return _Source(model, tokenizer)

    def _adapt_config(self, cfg: TransformerConfig) -> TransformerConfig:
        return cfg

    def initialize(self, model: nn.Module) -> list[str]:
        """Copy the init_from weights into a freshly built `model` (a no-op without init_from).

        Every tensor of the pretrained model must find its place; the model's tensors that stay new are
        returned (a classifier's head), so that nothing is left out unsaid.
        """
        if self.recipe.init_from is None:
            return []
        source = self.pretrained.model.state_dict()
        target = model.state_dict()
        fresh = self._fresh_tensors(source, target)
        unexpected = sorted(set(source) - set(target) - set(fresh))
        missing = sorted(set(target) - set(source) - set(fresh))
        if unexpected or missing:
            raise ValueError(
                f"init_from weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for key, tensor in target.items():
                if key in fresh:
                    continue
                if source[key].shape != tensor.shape:
                    raise ValueError(
                        f"init_from: {key} has shape {tuple(source[key].shape)}, "
                        f"the model {tuple(tensor.shape)}"
                    )
                tensor.copy_(source[key])
        return sorted(k for k in fresh if k in target)

    def _fresh_tensors(self, source: dict, target: dict) -> set[str]:
        """Tensors the task trains from scratch even with init_from."""
        return set()

    # ------------------------------------------------------------------ data
    def _split_name(self, split: str) -> str:
        """The dataset's own name for "train", "valid" or "test", as the recipe sets it."""
        d = self.recipe.data
        return {"train": d.train_split, "valid": d.valid_split, "test": d.test_split}.get(split, split)

    def _user_file(self, split: str) -> str:
        """dataset = "files": the recipe's {split}_file."""
        _check_files_split(split)
        path = getattr(self.recipe.data, f"{split}_file", None)
        if not path:
            raise ValueError(f"[data] dataset = 'files' needs {split}_file for the {split} split")
        return path

    def _seeded_batches(self, src_lengths, tgt_lengths, epoch: int, shuffle: bool = True) -> list[list[int]]:
        d = self.recipe.data
        return token_batches(
            src_lengths,
            tgt_lengths,
            d.max_tokens,
            shuffle=shuffle,
            seed=self.recipe.train.seed,
            epoch=epoch,
            max_sentences=d.max_sentences,
        )


def _check_files_split(split: str) -> None:
    """dataset = "files" names one file (or pair) per split: train, valid and test, nothing else."""
    if split not in FILES_SPLITS:
        raise ValueError(f"unknown split {split!r}: dataset = 'files' has {', '.join(FILES_SPLITS)}")


class _Source:
    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer


def _limit(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


class TranslationTask(_Task):
    """Sequence-to-sequence translation with the encoder-decoder (the paper's task, §6.1)."""

    best_metric = ("valid_bleu", True)
    init_sources = (Transformer,)

    # ------------------------------------------------------------------ data
    def corpus(self, split: str) -> ParallelCorpus:
        d = self.recipe.data
        if d.dataset == "files":
            _check_files_split(split)
            src, tgt = getattr(d, f"{split}_src", None), getattr(d, f"{split}_tgt", None)
            if not src or not tgt:
                raise ValueError(
                    f"[data] dataset = 'files' needs {split}_src and {split}_tgt for the {split} split"
                )
            return load_parallel_files(src, tgt, d.src_lang, d.tgt_lang)
        return load_translation(
            d.dataset, self._split_name(split), d.src_lang, d.tgt_lang, data_dir=d.data_dir
        )

    @cached_property
    def train_corpus(self) -> ParallelCorpus:
        corpus = self.corpus("train")
        n = self.recipe.data.limit_train
        return ParallelCorpus(_limit(corpus.src, n), _limit(corpus.tgt, n), corpus.src_lang, corpus.tgt_lang)

    @cached_property
    def valid_corpus(self) -> ParallelCorpus:
        corpus = self.corpus("valid")
        n = self.recipe.data.limit_valid
        return ParallelCorpus(_limit(corpus.src, n), _limit(corpus.tgt, n), corpus.src_lang, corpus.tgt_lang)

    def _training_texts(self) -> list[str]:
        # One joint vocabulary for both languages (§5.1: "a shared source-target vocabulary").
        return self.train_corpus.src + self.train_corpus.tgt

    def encode_sources(self, texts: list[str]) -> list[list[int]]:
        """Source ids as the encoder reads them: the tokens, then the tokenizer's suffix (Marian's </s>)."""
        suffix = list(self.tokenizer.suffix_ids)
        return [ids + suffix if ids else [] for ids in self.tokenizer.encode_batch(list(texts))]

    @cached_property
    def train_ids(self) -> tuple[list[list[int]], list[list[int]]]:
        """Encoded training pairs; pairs longer than data.max_len on either side are left out."""
        src = self.encode_sources(self.train_corpus.src)
        tgt = self.tokenizer.encode_batch(self.train_corpus.tgt, target=True)
        limit = min(self.recipe.data.max_len, self.model_config().max_len) - 1
        keep = [i for i in range(len(src)) if 0 < len(src[i]) <= limit and 0 < len(tgt[i]) <= limit]
        return [src[i] for i in keep], [tgt[i] for i in keep]

    @cached_property
    def valid_ids(self) -> tuple[list[list[int]], list[list[int]]]:
        return self.encode_sources(self.valid_corpus.src), self.tokenizer.encode_batch(
            self.valid_corpus.tgt, target=True
        )

    # ------------------------------------------------------------------ training
    def build_model(self) -> Transformer:
        return Transformer(self.model_config())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        src, tgt = self.train_ids
        return self._seeded_batches([len(s) for s in src], [len(t) + 1 for t in tgt], epoch)

    def make_batch(self, indices: list[int], device: torch.device):
        src, tgt = self.train_ids
        return self._batch([src[i] for i in indices], [tgt[i] for i in indices], device)

    def _batch(self, src: list[list[int]], tgt: list[list[int]], device: torch.device):
        tok = self.tokenizer
        return make_translation_batch(src, tgt, tok.bos_id, tok.eos_id, tok.pad_id).to(device)

    def loss(self, model: nn.Module, batch, label_smoothing: float) -> LossOutput:
        logits = model(batch.src, batch.tgt_in)
        return label_smoothed_cross_entropy(logits, batch.tgt_out, label_smoothing, self.tokenizer.pad_id)

    def batch_tokens(self, batch) -> int:
        return int(batch.n_src_tokens) + int(batch.n_tgt_tokens)

    def loss_denominator(self, batch) -> int:
        return int((batch.tgt_out != self.tokenizer.pad_id).sum())

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation NLL per target token, perplexity, and BLEU of greedy decoding (beam search is used by
        `evaluate`; greedy keeps periodic validation cheap)."""
        src, tgt = self.valid_ids
        total = count = 0.0
        for indices in self._seeded_batches(
            [len(s) for s in src], [len(t) + 1 for t in tgt], 0, shuffle=False
        ):
            batch = self._batch([src[i] for i in indices], [tgt[i] for i in indices], device)
            out = self.loss(model, batch, 0.0)
            total += out.nll.item() * int(out.n_tokens)
            count += int(out.n_tokens)
        nll = total / max(count, 1)
        metrics = {"valid_nll": nll, "valid_ppl": math.exp(min(nll, 50.0))}
        n = self.recipe.train.eval_bleu_sentences
        sources = _limit(self.valid_corpus.src, n)
        if sources:
            hypotheses = self.translate(model, sources, device, beam_size=1)
            metrics["valid_bleu"] = corpus_bleu(hypotheses, _limit(self.valid_corpus.tgt, n)).score
        return metrics

    # ------------------------------------------------------------------ inference
    def translate(
        self,
        model: Transformer,
        texts: list[str],
        device: torch.device,
        beam_size: int | None = None,
        length_penalty: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Translate texts in batches of similar length; outputs come back in input order."""
        dec = self.recipe.decode
        beam = dec.beam_size if beam_size is None else beam_size
        alpha = dec.length_penalty if length_penalty is None else length_penalty
        limit = dec.max_new_tokens if max_new_tokens is None else max_new_tokens
        pad, eos = self.tokenizer.pad_id, self.tokenizer.eos_id
        encoded = self.encode_sources(list(texts))
        max_len = model.config.max_len
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"input {i + 1} is empty: nothing to translate")
            if len(ids) > max_len:
                raise ValueError(f"input {i + 1} has {len(ids)} tokens; the model takes at most {max_len}")
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(encoded)
        model.eval()
        for start in range(0, len(order), dec.batch_sentences):
            chunk = order[start : start + dec.batch_sentences]
            src = pad_batch([encoded[i] for i in chunk], pad).to(device)
            generated = model.generate(
                src,
                max_new_tokens=limit,
                beam_size=beam,
                length_penalty=alpha,
                length_penalty_kind=dec.length_penalty_kind,
            )
            for i, row in zip(chunk, generated.tolist(), strict=True):
                tokens = row[: row.index(eos)] if eos in row else row
                outputs[i] = self.tokenizer.decode(tokens)
        return outputs

    def evaluate(self, model: Transformer, device: torch.device, sources: list[str], references: list[str]):
        hypotheses = self.translate(model, sources, device)
        bleu, chrf = corpus_bleu(hypotheses, references), corpus_chrf(hypotheses, references)
        return hypotheses, {"bleu": bleu.to_dict(), "chrf": chrf.to_dict(), "sentences": len(sources)}


class ClassificationTask(_Task):
    """Text classification with the encoder and a [CLS] token."""

    best_metric = ("valid_accuracy", True)
    _epoch = 0  # the epoch whose batches make_batch is serving (seeds word dropout)
    init_sources = (TransformerEncoder, TransformerClassifier, TransformerMaskedLM)

    def data(self, split: str) -> LabeledTexts:
        d = self.recipe.data
        if d.dataset == "files":
            path = self._user_file(split)
            return load_labeled_file(path, d.text_column, d.label_column, label_names=self._known_labels())
        parts = self._split_name(split).split("+")  # "train+valid": see ImageClassificationTask.data
        return LabeledTexts.join(
            [load_classification(d.dataset, part, data_dir=d.data_dir) for part in parts]
        )

    @cached_property
    def _fine_data(self) -> tuple[LabeledTexts, list[str], list[int]]:
        """[data] fine_labels: the training examples with their finer labels (see load_fine_labels)."""
        d = self.recipe.data
        return load_fine_labels(d.dataset, self._split_name("train"), data_dir=d.data_dir)

    @cached_property
    def fine_classes(self) -> tuple[list[str], tuple[int, ...]] | None:
        """[data] fine_labels: the fine class names and the class of each (-1: none), from the run's
        fine_labels.txt, else from the data (then written there); None without fine labels."""
        if not self.recipe.data.fine_labels:
            return None
        path = self.run_dir / FINE_LABELS_FILE
        if path.is_file():
            return self._read_fine_classes(path)
        fine, coarse_names, class_of_fine = self._fine_data
        if coarse_names != self.label_names:
            raise ValueError(f"{self.run_dir / LABELS_FILE}: its classes are not {coarse_names}")
        lines = [
            f"{name}\t{coarse_names[c] if c >= 0 else ''}"
            for name, c in zip(fine.label_names, class_of_fine, strict=True)
        ]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return list(fine.label_names), tuple(class_of_fine)

    def _read_fine_classes(self, path: Path) -> tuple[list[str], tuple[int, ...]]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (corrupt?)") from None
        index = {name: i for i, name in enumerate(self.label_names)}
        names, classes = [], []
        for number, line in enumerate(lines, 1):
            name, tab, cls = line.partition("\t")
            if not tab or not name or (cls and cls not in index):
                raise ValueError(f"{path}: line {number} is not 'fine class<TAB>one of {self.label_names}'")
            names.append(name)
            classes.append(index[cls] if cls else -1)
        if len(names) < 2:
            raise ValueError(f"{path}: names {len(names)} fine class(es); at least 2 are needed (corrupt?)")
        return names, tuple(classes)

    def _known_labels(self) -> list[str] | None:
        path = self.run_dir / LABELS_FILE
        if not path.is_file():
            return None
        try:
            names = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (corrupt?)") from None
        if len(names) < 2:
            raise ValueError(f"{path}: names {len(names)} label(s); a classifier needs at least 2 (corrupt?)")
        return names

    @cached_property
    def label_names(self) -> list[str]:
        known = self._known_labels()
        if known is not None:
            return known
        names = self.train_data.label_names
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / LABELS_FILE).write_text("\n".join(names) + "\n", encoding="utf-8")
        return names

    @cached_property
    def train_data(self) -> LabeledTexts:
        """The training examples; with [data] fine_labels, those of the fine-labelled data (which may hold
        more: SST-5's neutral sentences), each labelled with its class, -1 for none."""
        n = self.recipe.data.limit_train
        if self.recipe.data.fine_labels:
            fine, coarse_names, class_of_fine = self._fine_data
            labels = [class_of_fine[y] for y in fine.labels]
            return LabeledTexts(_limit(fine.texts, n), _limit(labels, n), coarse_names)
        data = self.data("train")
        return LabeledTexts(_limit(data.texts, n), _limit(data.labels, n), data.label_names)

    @cached_property
    def train_fine_labels(self) -> list[int] | None:
        """[data] fine_labels: the fine class of each training example (else None)."""
        if not self.recipe.data.fine_labels:
            return None
        return _limit(self._fine_data[0].labels, self.recipe.data.limit_train)

    @cached_property
    def valid_data(self) -> LabeledTexts:
        data = self.data("valid")
        n = self.recipe.data.limit_valid
        return LabeledTexts(_limit(data.texts, n), _limit(data.labels, n), data.label_names)

    def _training_texts(self) -> list[str]:
        return self.train_data.texts

    def _recipe_config(self, **derived) -> TransformerConfig:
        return self.recipe.model_config(
            **derived,
            cls_id=self.tokenizer.cls_id,
            n_classes=len(self.label_names),
            fine_to_class=self._fine_to_class(),
        )

    def _fine_to_class(self) -> tuple[int, ...] | None:
        return None if self.fine_classes is None else self.fine_classes[1]

    def _adapt_config(self, cfg: TransformerConfig) -> TransformerConfig:
        # A BERT encoder's [CLS] is the tokenizer's; the heads are sized for this data set's labels.
        return cfg.replace(
            n_classes=len(self.label_names), cls_id=cfg.classifier_cls_id, fine_to_class=self._fine_to_class()
        )

    def _fresh_tensors(self, source: dict, target: dict) -> set[str]:
        fresh: set[str] = set()
        for prefix in ("head.", "fine_head."):
            head = {k for k in target if k.startswith(prefix)}
            if all(k in source and source[k].shape == target[k].shape for k in head):
                continue  # a classifier run with as many classes: its head is a starting point too
            fresh |= head | {k for k in source if k.startswith(prefix)}
        return fresh | {k for k in source if k.startswith("mlm_")}  # a masked LM's output bias

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids (then the tokenizer's suffix, BERT's [SEP]), truncated so that [CLS] + ids fits max_len
        (long articles keep their beginning)."""
        suffix = list(self.tokenizer.suffix_ids)
        limit = min(self.recipe.data.max_len, self.model_config().max_len) - 1 - len(suffix)
        encoded = [ids[:limit] for ids in self.tokenizer.encode_batch(list(texts))]
        return [(ids if ids else [self.tokenizer.unk_id]) + suffix for ids in encoded]

    @cached_property
    def train_ids(self) -> list[list[int]]:
        return self.encode(self.train_data.texts)

    @cached_property
    def valid_ids(self) -> list[list[int]]:
        return self.encode(self.valid_data.texts)

    def build_model(self) -> TransformerClassifier:
        return TransformerClassifier(self.model_config())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self._epoch = epoch
        return self._seeded_batches([len(s) + 1 for s in self.train_ids], None, epoch)

    def make_batch(self, indices: list[int], device: torch.device):
        labels = [self.train_data.labels[i] for i in indices]
        ids = [self.train_ids[i] for i in indices]
        if self.recipe.data.word_dropout > 0:
            ids = self._drop_words(ids, indices)
        fine = None if self.train_fine_labels is None else [self.train_fine_labels[i] for i in indices]
        return make_classification_batch(ids, labels, self.tokenizer.pad_id, fine).to(device)

    def _drop_words(self, ids: list[list[int]], indices: list[int]) -> list[list[int]]:
        """Word dropout: tokens replaced by [UNK] at random. The draw depends only on (seed, epoch, batch),
        so a resumed run sees the same corrupted batches as an uninterrupted one."""
        key = (self.recipe.train.seed * 1_000_003 + self._epoch) * 1_000_033 + indices[0]
        generator = torch.Generator().manual_seed(key)
        p, unk = self.recipe.data.word_dropout, self.tokenizer.unk_id
        dropped = []
        for row in ids:
            keep = torch.rand(len(row), generator=generator) >= p
            dropped.append([t if k else unk for t, k in zip(row, keep.tolist(), strict=True)])
        return dropped

    def loss(self, model: nn.Module, batch, label_smoothing: float) -> LossOutput:
        if batch.fine_labels is not None:
            return self._fine_loss(model, batch, label_smoothing)
        logits = model(batch.ids).float()
        loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
        nll = F.cross_entropy(logits, batch.labels) if label_smoothing > 0 else loss
        return LossOutput(loss, nll.detach(), torch.tensor(batch.labels.numel()))

    def _fine_loss(self, model: nn.Module, batch, label_smoothing: float) -> LossOutput:
        """Both heads' (smoothed) cross-entropies summed, per example: the class head's over the examples
        that have a class, the fine head's over all. The NLL is the prediction's (the heads combined), over
        the examples that have a class."""
        logits, fine_logits = model(batch.ids, return_heads=True)
        logits, fine_logits = logits.float(), fine_logits.float()
        labelled = batch.labels >= 0
        loss = F.cross_entropy(
            fine_logits, batch.fine_labels, label_smoothing=label_smoothing, reduction="sum"
        )
        nll = torch.zeros((), device=logits.device)
        if labelled.any():
            labels = batch.labels[labelled]
            loss = loss + F.cross_entropy(
                logits[labelled], labels, label_smoothing=label_smoothing, reduction="sum"
            )
            membership = self._fine_membership.to(logits.device)
            combined = combine_heads(logits[labelled].detach(), fine_logits[labelled].detach(), membership)
            nll = F.nll_loss(combined, labels)
        return LossOutput(loss / batch.labels.numel(), nll, torch.tensor(batch.labels.numel()))

    @cached_property
    def _fine_membership(self) -> torch.Tensor:
        return fine_membership(self._fine_to_class(), len(self.label_names))

    def batch_tokens(self, batch) -> int:
        return int((batch.ids != self.tokenizer.pad_id).sum())

    def loss_denominator(self, batch) -> int:
        return int(batch.labels.numel())

    def predict(
        self, model: TransformerClassifier, ids: list[list[int]], device: torch.device
    ) -> torch.Tensor:
        """Class probabilities (N, n_classes), in input order."""
        order = self._seeded_batches([len(s) + 1 for s in ids], None, 0, shuffle=False)
        probs = torch.empty(len(ids), len(self.label_names))
        model.eval()
        with torch.no_grad():
            for indices in order:
                batch = pad_batch([ids[i] for i in indices], self.tokenizer.pad_id).to(device)
                probs[indices] = torch.softmax(model(batch).float(), dim=-1).cpu()
        return probs

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        probs = self.predict(model, self.valid_ids, device)
        labels = torch.tensor(self.valid_data.labels)
        nll = F.nll_loss(probs.clamp(min=1e-12).log(), labels).item()
        accuracy = (probs.argmax(-1) == labels).float().mean().item()
        return {"valid_nll": nll, "valid_accuracy": accuracy}

    def evaluate(self, model, device, texts: list[str], labels: list[int]):
        predictions = self.predict(model, self.encode(texts), device).argmax(-1).tolist()
        return predictions, classification_report(predictions, labels, self.label_names)


class LanguageModelTask(_Task):
    """Language modelling with the decoder-only model on a character (or subword) stream."""

    best_metric = ("valid_nll", False)
    init_sources = (TransformerLM,)

    def text(self, split: str) -> str:
        d = self.recipe.data
        if d.dataset == "files":
            path = self._user_file(split)
            return load_text_file(path)
        if d.dataset != "tiny_shakespeare":
            raise ValueError(
                f"[data] dataset = {d.dataset!r}: language modelling reads tiny_shakespeare or files"
            )
        return load_tiny_shakespeare(self._split_name(split), data_dir=d.data_dir)

    @cached_property
    def train_text(self) -> str:
        return self.text("train")

    @cached_property
    def valid_text(self) -> str:
        return self.text("valid")

    def _training_texts(self) -> list[str]:
        return [self.train_text]

    @cached_property
    def train_stream(self) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(self.train_text), dtype=torch.long)

    @cached_property
    def valid_stream(self) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(self.valid_text), dtype=torch.long)

    def build_model(self) -> TransformerLM:
        return TransformerLM(self.model_config())

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Random window starts, drawn from a generator seeded by (seed, epoch): reproducible on resume."""
        d = self.recipe.data
        max_len = self.model_config().max_len
        if d.block_size > max_len:  # else the first step fails inside the model, far from the recipe key
            raise RecipeError(
                f"[data] block_size = {d.block_size}: longer than the model's max_len = {max_len}"
            )
        generator = torch.Generator().manual_seed(self.recipe.train.seed * 1_000_003 + epoch)
        high = len(self.train_stream) - d.block_size  # a window holds block_size + 1 tokens
        if high <= 0:
            raise ValueError(f"training text has {len(self.train_stream)} tokens: fewer than block_size + 1")
        starts = torch.randint(
            0, high, (max(1, d.windows_per_epoch // d.batch_size), d.batch_size), generator=generator
        )
        return list(starts)

    def make_batch(self, starts: torch.Tensor, device: torch.device):
        offsets = starts[:, None] + torch.arange(self.recipe.data.block_size + 1)
        windows = self.train_stream[offsets]
        return windows[:, :-1].to(device), windows[:, 1:].to(device)

    def loss(self, model: nn.Module, batch, label_smoothing: float) -> LossOutput:
        x, y = batch
        return label_smoothed_cross_entropy(model(x), y, label_smoothing, self.tokenizer.pad_id)

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def loss_denominator(self, batch) -> int:
        return int((batch[1] != self.tokenizer.pad_id).sum())

    def context_window(self, model: TransformerLM) -> int:
        """The most tokens the model reads at once: the windows it was trained on (positions past them were
        never trained), within max_len. Generation slides this window; attention maps show its last one."""
        return min(self.recipe.data.block_size, model.config.max_len)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """NLL per token over the whole validation text in non-overlapping windows; bits per character."""
        block = self.context_window(model)
        stream = self.valid_stream
        n_windows = (len(stream) - 1) // block
        if n_windows == 0:
            return {}
        usable = n_windows * block
        x = stream[:usable].view(n_windows, block)
        y = stream[1 : usable + 1].view(n_windows, block)
        total = 0.0
        batch = self.recipe.data.batch_size
        for i in range(0, n_windows, batch):
            logits = model(x[i : i + batch].to(device)).float()
            total += F.cross_entropy(
                logits.flatten(0, 1), y[i : i + batch].flatten().to(device), reduction="sum"
            ).item()
        nll = total / usable
        characters = len(self.tokenizer.decode(y.flatten().tolist()))
        return {"valid_nll": nll, "valid_bpc": total / max(characters, 1) / math.log(2)}

    def generate(self, model: TransformerLM, prompt: str, device: torch.device, **options: Any) -> str:
        """Continue `prompt`. Options (None = the recipe's [decode] value): max_new_tokens (recipe's default
        200; the model reads the last `context_window` tokens, so the text may grow past max_len), temperature
        (0 = greedy), top_k, top_p, beam_size, length_penalty, generator."""
        return self.generate_batch(model, [prompt], device, **options)[0]

    def generate_batch(
        self, model: TransformerLM, prompts: list[str], device: torch.device, **options: Any
    ) -> list[str]:
        """Continue several prompts with the same options in one batch (`generate` for each option).

        The model moves each prompt's padding to the left and masks it, so greedy and beam outputs are the
        ones each prompt gets alone; sampled rows draw from one shared generator, so with a seed a row's
        sample depends on the batch it is in.
        """
        encoded = [self.tokenizer.encode(prompt) for prompt in prompts]
        dec = self.recipe.decode
        settings = {
            "temperature": dec.temperature,
            "top_k": dec.top_k,
            "top_p": dec.top_p,
            "beam_size": 1,
            "length_penalty": dec.length_penalty,
            "max_new_tokens": 200 if dec.max_new_tokens is None else dec.max_new_tokens,
        }
        given = {k: v for k, v in options.items() if v is not None}
        settings.update(given)
        if settings["beam_size"] > 1:
            sampling = [k for k in ("top_k", "top_p") if k in given]
            sampling += ["temperature"] if given.get("temperature", 0) != 0 else []
            if sampling:
                raise ValueError(
                    f"beam_size={settings['beam_size']} searches for the best continuation; "
                    f"{', '.join(sampling)} only apply to sampling (beam_size=1)"
                )
        for ids in encoded:
            if not ids:
                raise ValueError("the prompt is empty (or holds only characters the tokenizer does not know)")
            if len(ids) > model.config.max_len:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens; the model takes at most {model.config.max_len}"
                )
        greedy = settings["temperature"] == 0
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_id
        out = model.generate(
            torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device),
            max_new_tokens=settings["max_new_tokens"],
            beam_size=settings["beam_size"],
            length_penalty=settings["length_penalty"],
            do_sample=not greedy and settings["beam_size"] == 1,
            temperature=1.0 if greedy else settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            generator=settings.get("generator"),
            context_window=self.context_window(model),
        )
        eos, texts = self.tokenizer.eos_id, []
        for tokens in out.tolist():
            texts.append(self.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens))
        return texts


class EncoderTask(_Task):
    """An imported BERT-family encoder (`vaswani import-hf`): text in, hidden states out. Nothing to train
    here: fine-tune a classifier from it with a classification recipe and `[model] init_from = RUN_DIR`."""

    init_sources = (TransformerEncoder,)

    def _training_texts(self) -> list[str]:
        raise RecipeError("[data] task = 'encoder' runs are imported (vaswani import-hf), not trained")

    def build_model(self) -> TransformerEncoder:
        return TransformerEncoder(self.model_config())

    def encode(self, texts: list[str]) -> list[list[int]]:
        """[CLS] + ids + [SEP], truncated to max_len."""
        tok, cfg = self.tokenizer, self.model_config()
        suffix = list(tok.suffix_ids)
        limit = cfg.max_len - 1 - len(suffix)
        return [[cfg.classifier_cls_id, *ids[:limit], *suffix] for ids in tok.encode_batch(list(texts))]

    def embed(self, model: TransformerEncoder, texts: list[str], device: torch.device) -> torch.Tensor:
        """(N, d_model) sentence embeddings: the mean of each text's token states ([CLS] and [SEP]
        included), L2-normalised, as sentence-transformers pools all-MiniLM-L6-v2."""
        ids = self.encode(texts)
        model.eval()
        out = torch.empty(len(ids), model.config.d_model)
        with torch.no_grad():
            for start in range(0, len(ids), 64):
                chunk = ids[start : start + 64]
                batch = pad_batch(chunk, self.tokenizer.pad_id).to(device)
                real = (batch != self.tokenizer.pad_id).unsqueeze(-1).float()
                hidden = model.encode(batch, attention_mask=real[..., 0].long())
                pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1.0)
                out[start : start + len(chunk)] = F.normalize(pooled, dim=-1).cpu()
        return out


class MaskedLMTask(_Task):
    """Masked language modelling (BERT, Devlin et al. 2019, §3.1) on the texts of a data set's training split:
    self-supervised pretraining of the encoder that a classification recipe then starts from
    (`[model] init_from = RUN_DIR`), with no data beyond the task's own ("self-pretraining", Krishna et al.
    2023).

    Each real token is chosen as a target with probability `[data] mask_prob` (BERT: 0.15); a chosen token
    is replaced by <unk> 80% of the time, by a random token 10% and kept 10%. <unk> stands in for BERT's
    [MASK]: it is the token the classifier's word dropout writes, so fine-tuning sees the same corruption.
    The draw depends only on (seed, epoch, batch), so a resumed run sees the same batches; validation masks
    the validation texts the same way in every evaluation (a fixed seed), so its numbers are comparable.
    """

    best_metric = ("valid_nll", False)
    init_sources = (TransformerMaskedLM,)
    _epoch = 0
    VALID_SEED = 0

    def texts(self, split: str) -> list[str]:
        """The texts of a split: a classification data set's (labels unused), or with dataset = "files" the
        non-empty lines of the split's file."""
        d = self.recipe.data
        if d.dataset == "files":
            lines = load_text_file(self._user_file(split)).splitlines()
            return [line for line in lines if line.strip()]
        parts = self._split_name(split).split("+")
        return [t for part in parts for t in load_classification(d.dataset, part, data_dir=d.data_dir).texts]

    @cached_property
    def train_texts(self) -> list[str]:
        return _limit(self.texts("train"), self.recipe.data.limit_train)

    @cached_property
    def valid_texts(self) -> list[str]:
        return _limit(self.texts("valid"), self.recipe.data.limit_valid)

    def _training_texts(self) -> list[str]:
        return self.train_texts

    def _recipe_config(self, **derived) -> TransformerConfig:
        return self.recipe.model_config(**derived, cls_id=self.tokenizer.cls_id)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids truncated so that [CLS] + ids fits max_len, as the classifier reads them."""
        limit = min(self.recipe.data.max_len, self.model_config().max_len) - 1
        return [ids[:limit] or [self.tokenizer.unk_id] for ids in self.tokenizer.encode_batch(list(texts))]

    @cached_property
    def train_ids(self) -> list[list[int]]:
        return self.encode(self.train_texts)

    @cached_property
    def valid_ids(self) -> list[list[int]]:
        return self.encode(self.valid_texts)

    def build_model(self) -> TransformerMaskedLM:
        return TransformerMaskedLM(self.model_config())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self._epoch = epoch
        return self._seeded_batches([len(s) + 1 for s in self.train_ids], None, epoch)

    def mask(self, rows: list[list[int]], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded rows -> (inputs with the chosen tokens corrupted, targets: the chosen tokens' ids, padding
        elsewhere). At least one token is chosen, so that no batch has nothing to predict."""
        tok = self.tokenizer
        ids = pad_batch(rows, tok.pad_id)
        real = ids != tok.pad_id
        chosen = (torch.rand(ids.shape, generator=generator) < self.recipe.data.mask_prob) & real
        if not chosen.any():
            chosen[0, 0] = True
        action = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(len(SPECIAL_TOKENS), tok.vocab_size, ids.shape, generator=generator)
        inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, tok.unk_id), ids)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        return inputs, torch.where(chosen, ids, torch.full_like(ids, tok.pad_id))

    def make_batch(self, indices: list[int], device: torch.device):
        key = (self.recipe.train.seed * 1_000_003 + self._epoch) * 1_000_033 + indices[0]
        inputs, targets = self.mask([self.train_ids[i] for i in indices], torch.Generator().manual_seed(key))
        return inputs.to(device), targets.to(device)

    def loss(self, model: nn.Module, batch, label_smoothing: float) -> LossOutput:
        inputs, targets = batch
        return label_smoothed_cross_entropy(model(inputs), targets, label_smoothing, self.tokenizer.pad_id)

    def batch_tokens(self, batch) -> int:
        return int((batch[0] != self.tokenizer.pad_id).sum())

    def loss_denominator(self, batch) -> int:
        return int((batch[1] != self.tokenizer.pad_id).sum())

    def score(self, model: nn.Module, ids: list[list[int]], device: torch.device) -> dict[str, float]:
        """NLL per masked token and the share of masked tokens predicted right, with the fixed validation
        masking (the same targets at every evaluation)."""
        generator = torch.Generator().manual_seed(self.VALID_SEED)
        pad = self.tokenizer.pad_id
        nll = correct = count = 0.0
        model.eval()
        with torch.no_grad():
            for indices in self._seeded_batches([len(s) + 1 for s in ids], None, 0, shuffle=False):
                inputs, targets = self.mask([ids[i] for i in indices], generator)
                logits = model(inputs.to(device)).float()
                targets = targets.to(device)
                chosen = targets != pad
                nll += F.cross_entropy(logits[chosen], targets[chosen], reduction="sum").item()
                correct += (logits[chosen].argmax(-1) == targets[chosen]).sum().item()
                count += chosen.sum().item()
        return {"valid_nll": nll / max(count, 1), "valid_accuracy": correct / max(count, 1)}

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.score(model, self.valid_ids, device)


TASK_CLASSES = {
    "translation": TranslationTask,
    "classification": ClassificationTask,
    "lm": LanguageModelTask,
    "image_classification": ImageClassificationTask,
    "encoder": EncoderTask,
    "mlm": MaskedLMTask,
}


def make_task(recipe: Recipe, run_dir: Path) -> _Task | ImageClassificationTask:
    return TASK_CLASSES[recipe.data.task](recipe, run_dir)
