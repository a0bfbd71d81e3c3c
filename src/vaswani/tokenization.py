"""Tokenizers for the three task families, trained with the Hugging Face `tokenizers` library.

- `Tokenizer.train_bpe`: byte-pair encoding (Sennrich et al., 2016) for translation. §5.1 of the paper encodes
  WMT 2014 English-German with "byte-pair encoding, which has a shared source-target vocabulary of about
  37000 tokens": training on source and target texts together gives that joint vocabulary (about 8-10k
  merges suit a corpus the size of Multi30k).
- `Tokenizer.train_wordpiece`: BERT-style WordPiece for classification.
- `Tokenizer.train_chars`: one token per character, for character-level language modelling.

Every tokenizer holds the same special tokens at the same ids (`SPECIAL_TOKENS`), matching the defaults of
`TransformerConfig` (pad_id=0, bos_id=1, eos_id=2; set cls_id=CLS_ID for the classifier). `encode` never adds
them: where BOS, EOS and [CLS] go is the business of batching and of the models. A special token written in
the text itself (a literal "<s>") is encoded as ordinary text, never as the control token.

The tasks and the command line read the special ids from the tokenizer (`pad_id`, `bos_id`, `eos_id`,
`unk_id`, `cls_id`, `suffix_ids`), never from the constants, so that a pretrained model's tokenizer
(`vaswani.hub.tokenizers`, other ids) works the same way; `load_tokenizer` reads either kind of file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from vaswani.files import atomic_write_text

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, CLS_TOKEN = "<pad>", "<s>", "</s>", "<unk>", "<cls>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, CLS_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID = range(len(SPECIAL_TOKENS))

KINDS = ("bpe", "wordpiece", "chars")
FILE_FORMAT = "vaswani-tokenizer"
FILE_VERSION = 1

# SentencePiece's word-boundary mark: a space becomes part of the following token, so decoding is exact.
_SPACE_MARK = "\u2581"
# Control tokens `decode` drops. <unk> stays visible: a translation that silently loses a word reads fluent.
_DROPPED_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID, CLS_ID))
# The `tokenizers` model type behind each kind, checked on load to catch a file whose kind was edited.
_MODEL_TYPES = {"bpe": "BPE", "wordpiece": "WordPiece", "chars": "BPE"}


class Tokenizer:
    """A trained `tokenizers.Tokenizer` plus its kind ("bpe", "wordpiece" or "chars").

    Build one with `train_bpe`, `train_wordpiece`, `train_chars` or `load`. The constructor checks that the
    special tokens sit at their fixed ids, because every model and batch in the library relies on them.
    """

    def __init__(self, backend: tokenizers.Tokenizer, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r} must be one of {KINDS}")
        wrong = [
            f"{token}={backend.token_to_id(token)} (expected {i})"
            for i, token in enumerate(SPECIAL_TOKENS)
            if backend.token_to_id(token) != i
        ]
        if wrong:
            raise ValueError(f"special tokens at the wrong ids: {', '.join(wrong)}")
        # Not saved in the tokenizers JSON, so it is set here on every construction, loading included.
        backend.encode_special_tokens = True
        self._backend = backend
        self.kind = kind

    # ------------------------------------------------------------------ training
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """BPE for translation (§5.1); pass source and target texts together for a joint vocabulary.

        Normalisation is NFC, not NFKC: NFC only composes canonically equivalent sequences (a + combining
        diaeresis -> ä), so decode(encode(x)) == NFC(x), which is x for nearly all real text. NFKC would also
        fold compatibility characters (x² -> x2, ﬁ -> fi, … -> ...), changing the text a model is scored on.

        Spaces are kept SentencePiece-style: every space becomes "▁" and starts the following token, and a
        "▁" is prepended to the text, so that decoding restores all whitespace exactly (leading, trailing and
        repeated spaces included). The one loss: a literal "▁" in the input decodes as a space.
        Every character seen in training is in the vocabulary (min_frequency applies to merges only); an
        unseen character encodes as <unk>. The vocabulary may come out smaller than `vocab_size` if the
        corpus runs out of pairs seen `min_frequency` times.
        """
        _check_vocab_size(vocab_size)
        backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Prepend(_SPACE_MARK), normalizers.Replace(" ", _SPACE_MARK)]
        )
        # The normalizer already prepends the mark; the pre-tokenizer's own prepending would skip a text that
        # starts with a space and so lose that space on decoding.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE_MARK, prepend_scheme="never")
        backend.decoder = decoders.Metaspace(replacement=_SPACE_MARK, prepend_scheme="always")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, "bpe")

    @classmethod
    def train_wordpiece(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2, lowercase: bool = True
    ) -> Tokenizer:
        """BERT-style WordPiece for classification: BERT's normaliser (lowercasing and accent stripping when
        `lowercase`) and pre-tokenizer (split on whitespace and punctuation), "##" continuation pieces.

        Decoding rejoins the "##" pieces and puts one space between words, punctuation included ("what is
        it ?"); BERT's clean-up of those spaces is off because it also rewrites words ("do not" -> "don't").
        A word that cannot be spelled from the vocabulary encodes as a single <unk>.

        Training is not deterministic: `tokenizers`' trainer numbers the "##" pieces in hash-map order, which
        breaks ties between equally frequent merges differently from run to run (huggingface/tokenizers
        issue 1794). A run saves its tokenizer and reuses it on resume; two fresh runs may differ slightly.
        `train_bpe` has no continuation pieces and is deterministic.
        """
        _check_vocab_size(vocab_size)
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, continuing_subword_prefix="##"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix="##",
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, "wordpiece")

    @classmethod
    def train_chars(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in `texts` (after the special tokens, in code-point order), with no
        normalisation, so decode(encode(x)) == x for any x made of seen characters, newlines included.

        Built as a BPE model with no merges and no pre-tokenizer: the text goes through whole and each
        character maps to its id (about three times faster than splitting into one pre-token per character).
        """
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("train_chars: the texts contain no characters")
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(sorted(chars))})
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(backend, "chars")

    # ------------------------------------------------------------------ encoding and decoding
    def encode(self, text: str, target: bool = False) -> list[int]:
        """Token ids of `text`, without special tokens; "" gives []. `target` (a translation target) makes no
        difference here: the vocabulary is joint (§5.1)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], target: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads inside the library.

        As with any `tokenizers` parallelism, a process forked afterwards (DataLoader workers) encodes on one
        thread and the library warns about it; encode before forking, or set TOKENIZERS_PARALLELISM.
        """
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        """The token strings of `text` (subwords with their "▁" or "##" marks), for attention-map axes."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, dropping <pad>, <s>, </s> and <cls> wherever they are; <unk> is written as "<unk>".

        Nothing stops at EOS: a caller decoding generated output cuts it at the first EOS first. Ids outside
        the vocabulary are skipped. Accepts any sequence of integers (a list, a 1-D tensor, a numpy array).
        """
        return self._backend.decode(self._keep(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        """`decode` for many sequences at once."""
        return self._backend.decode_batch([self._keep(ids) for ids in batch], skip_special_tokens=False)

    @staticmethod
    def _keep(ids: Sequence[int]) -> list[int]:
        return [i for i in map(int, ids) if i not in _DROPPED_IDS]

    # ------------------------------------------------------------------ special ids
    pad_id, bos_id, eos_id, unk_id, cls_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID
    # What ends every encoder input (a source sentence, a classifier's text): nothing here; a pretrained
    # tokenizer appends its own (Marian's </s>, BERT's [SEP]).
    suffix_ids: tuple[int, ...] = ()

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the `vocab_size` a model needs."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for what this class does not expose."""
        return self._backend

    def token_to_id(self, token: str) -> int | None:
        """Id of `token`, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of `token_id`, or None if the id is outside the vocabulary."""
        return self._backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one JSON file: {"format", "version", "kind", "tokenizer": <the tokenizers JSON>}.

        Written to a temporary file and renamed, so an interrupted save never leaves a half-written file.
        """
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "kind": self.kind,
            "tokenizer": json.loads(self._backend.to_str()),
        }
        atomic_write_text(path, json.dumps(document, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a file written by `save`. Raises ValueError, naming the file, if it is missing, unreadable,
        not JSON, or not a vaswani tokenizer (corrupt or tampered)."""
        path = Path(path)
        document = read_tokenizer_document(path)
        kind, spec = document.get("kind"), document.get("tokenizer")
        if kind not in KINDS:
            raise _tampered(path, f"kind {kind!r} is not one of {KINDS}")
        model_type = spec.get("model", {}).get("type") if isinstance(spec, dict) else None
        if model_type != _MODEL_TYPES[kind]:
            raise _tampered(
                path, f"a {kind!r} tokenizer needs a {_MODEL_TYPES[kind]} model, found {model_type!r}"
            )
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as error:  # the library raises plain Exception for a malformed specification
            raise _tampered(
                path, str(error).splitlines()[0] if str(error) else type(error).__name__
            ) from None
        try:
            return cls(backend, kind)
        except ValueError as error:
            raise _tampered(path, str(error)) from None


def _tampered(path: Path, why: str) -> ValueError:
    return ValueError(f"tokenizer file {path} is corrupt or tampered: {why}")


def read_tokenizer_document(path: Path) -> dict:
    """The JSON document of a tokenizer file, checked for format and version (either kind of tokenizer)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"tokenizer file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"tokenizer file {path} is not UTF-8 text (corrupt or not a tokenizer)") from None
    except OSError as error:
        raise ValueError(f"tokenizer file {path} cannot be read: {error.strerror or error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"tokenizer file {path} is not valid JSON (truncated or corrupt?): {error}"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise _tampered(path, f"not a {FILE_FORMAT} file")
    if document.get("version") != FILE_VERSION:
        raise _tampered(
            path, f"format version {document.get('version')!r}, this library reads {FILE_VERSION}"
        )
    return document


def load_tokenizer(path: str | os.PathLike[str]):
    """Load a run's tokenizer file: a vaswani `Tokenizer`, or a pretrained model's tokenizer (kind
    "pretrained", written by `vaswani import-hf` or `init_from`)."""
    path = Path(path)
    document = read_tokenizer_document(path)
    if document.get("kind") == "pretrained":
        from vaswani.hub.tokenizers import tokenizer_from_document  # only runs with imported models need it

        try:
            return tokenizer_from_document(document)
        # sentencepiece raises RuntimeError and `tokenizers` plain Exception for a malformed model: any
        # failure to rebuild the tokenizer from the file means the file is bad.
        except Exception as error:
            why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise _tampered(path, f"pretrained tokenizer: {why}") from None
    return Tokenizer.load(path)


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer above {len(SPECIAL_TOKENS)}")
