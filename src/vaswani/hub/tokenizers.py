"""The tokenizers of imported Hugging Face checkpoints, behind the interface of `vaswani.Tokenizer`.

- `WordPieceTokenizer`: a BERT-family tokenizer (its `tokenizer.json`, or `vocab.txt`), run by the
  `tokenizers` library exactly as Hugging Face's fast tokenizer runs it. Encoder inputs end with [SEP];
  the classifier prepends [CLS] itself (`cls_id`).
- `MarianTokenizer`: Marian's SentencePiece models (`source.spm`, `target.spm`) and its `vocab.json`,
  as `transformers.MarianTokenizer` uses them: pieces from the source (or target) model, ids from the
  vocabulary (unknown pieces -> <unk>), </s> appended to every source, target pieces joined back by the
  target model. (Hugging Face also applies Moses punctuation normalisation when `sacremoses` is installed;
  this tokenizer does not.)

Both keep their special ids from the checkpoint and save into one vaswani tokenizer file (kind
"pretrained"), the SentencePiece models inside it, so a run directory needs nothing from the original one.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from vaswani.files import atomic_write_text
from vaswani.tokenization import FILE_FORMAT, FILE_VERSION

KIND = "pretrained"
_SPACE_MARK = "\u2581"


class HFTokenizerError(ValueError):
    """A Hugging Face tokenizer that cannot be read or is not supported; one line naming the file."""


class _PretrainedTokenizer:
    """What both pretrained tokenizers share: special ids, batch helpers and saving."""

    kind = KIND
    family = ""

    def __init__(self, special: dict[str, int | None]) -> None:
        self.pad_id: int = special["pad"]
        self.bos_id: int = special["bos"]
        self.eos_id: int = special["eos"]
        self.unk_id: int = special["unk"]
        self.cls_id: int | None = special.get("cls")
        self.sep_id: int | None = special.get("sep")
        self.special = dict(special)

    def encode(self, text: str, target: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str], target: bool = False) -> list[list[int]]:
        return [self.encode(text, target) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def _document(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """One vaswani tokenizer file (kind "pretrained"), written to a temporary file and renamed."""
        document = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "kind": KIND,
            "family": self.family,
            "special": self.special,
            **self._document(),
        }
        atomic_write_text(path, json.dumps(document, ensure_ascii=False))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class WordPieceTokenizer(_PretrainedTokenizer):
    """A BERT-family WordPiece tokenizer from its `tokenizers` JSON."""

    family = "bert"

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, int | None]) -> None:
        super().__init__(special)
        # A checkpoint's tokenizer.json may carry its training-time padding and truncation (all-MiniLM-L6-v2
        # truncates at 128): batching and max_len are vaswani's business, so both are switched off.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.suffix_ids: tuple[int, ...] = (special["sep"],)

    def encode(self, text: str, target: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], target: bool = False) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        return self._backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _document(self) -> dict[str, Any]:
        return {"tokenizer": json.loads(self._backend.to_str())}


class MarianTokenizer(_PretrainedTokenizer):
    """Marian's SentencePiece tokenizer with one shared vocabulary (Hugging Face's `MarianTokenizer`)."""

    family = "marian"

    def __init__(
        self, source_spm: bytes, target_spm: bytes, vocab: dict[str, int], special: dict[str, int | None]
    ) -> None:
        import sentencepiece

        super().__init__(special)
        self._spm_bytes = (source_spm, target_spm)
        self._source = sentencepiece.SentencePieceProcessor(model_proto=source_spm)
        self._target = sentencepiece.SentencePieceProcessor(model_proto=target_spm)
        self.vocab = dict(vocab)
        self._by_id = {i: token for token, i in self.vocab.items()}
        self.suffix_ids = (special["eos"],)
        # Language codes (">>fra<<") of multilingual models stand as whole tokens at the start of a source.
        self._codes = {t for t in self.vocab if t.startswith(">>") and t.endswith("<<")}
        # Dropped when decoding: every special token but <unk> (an unknown word stays visible).
        self._dropped = {special["pad"], special["eos"], special["bos"]}

    def _pieces(self, text: str, target: bool) -> list[str]:
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            code, text = [text[: end + 2]], text[end + 2 :]
        return code + (self._target if target else self._source).encode(text, out_type=str)

    def encode(self, text: str, target: bool = False) -> list[int]:
        return [self.vocab.get(piece, self.unk_id) for piece in self._pieces(text, target)]

    def tokens(self, text: str) -> list[str]:
        return self._pieces(text, False)

    def decode(self, ids: Sequence[int]) -> str:
        """Target pieces joined by the target model; <unk> written as "<unk>", as Hugging Face does."""
        unk = self._by_id.get(self.unk_id)
        out, pieces = "", []
        for i in map(int, ids):
            if i in self._dropped or i not in self._by_id:
                continue
            token = self._by_id[i]
            if token == unk:
                out += self._target.decode_pieces(pieces) + token + " "
                pieces = []
            else:
                pieces.append(token)
        out += self._target.decode_pieces(pieces)
        return out.replace(_SPACE_MARK, " ").strip()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._by_id.get(int(token_id))

    def _document(self) -> dict[str, Any]:
        source, target = self._spm_bytes
        return {
            "vocab": self.vocab,
            "source_spm": base64.b64encode(source).decode("ascii"),
            "target_spm": base64.b64encode(target).decode("ascii"),
        }


def tokenizer_from_document(document: dict[str, Any]) -> _PretrainedTokenizer:
    """Rebuild a pretrained tokenizer from the document `save` wrote."""
    special = {k: (None if v is None else int(v)) for k, v in document["special"].items()}
    family = document.get("family")
    if family == "bert":
        return WordPieceTokenizer(tokenizers.Tokenizer.from_str(json.dumps(document["tokenizer"])), special)
    if family == "marian":
        return MarianTokenizer(
            base64.b64decode(document["source_spm"]),
            base64.b64decode(document["target_spm"]),
            {str(k): int(v) for k, v in document["vocab"].items()},
            special,
        )
    raise ValueError(f"unknown pretrained tokenizer family {family!r}")


# ---------------------------------------------------------------------------------------- reading HF files
def read_json_object(path: Path, error_type: type[ValueError] = HFTokenizerError) -> dict[str, Any]:
    """A JSON object from one of a checkpoint's files, or `error_type` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise error_type(f"{path}: cannot be read as JSON: {error}") from None
    if not isinstance(value, dict):
        raise error_type(f"{path}: expected a JSON object")
    return value


def _special_names(directory: Path, defaults: dict[str, str]) -> dict[str, str]:
    """Special token strings from tokenizer_config.json / special_tokens_map.json, else the defaults."""
    names = dict(defaults)
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / file
        if path.is_file():
            for key, value in read_json_object(path).items():
                if key.endswith("_token") and key[: -len("_token")] in names:
                    # Either "[PAD]" or {"content": "[PAD]", ...} (an AddedToken written out).
                    names[key[: -len("_token")]] = value["content"] if isinstance(value, dict) else value
    return names


def _ids_of(names: dict[str, str], lookup, where: Path) -> dict[str, int]:
    ids = {}
    for role, token in names.items():
        token_id = lookup(token)
        if token_id is None:
            raise HFTokenizerError(f"{where}: the {role} token {token!r} is not in the vocabulary")
        ids[role] = int(token_id)
    return ids


def load_bert_tokenizer(directory: Path) -> WordPieceTokenizer:
    """A BERT-family tokenizer from tokenizer.json, or from vocab.txt with BERT's normaliser."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # the library raises plain Exception for a malformed file
            raise HFTokenizerError(f"{directory / 'tokenizer.json'}: {str(error).splitlines()[0]}") from None
    elif (directory / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        config = (
            read_json_object(directory / "tokenizer_config.json")
            if (directory / "tokenizer_config.json").is_file()
            else {}
        )
        backend = BertWordPieceTokenizer(
            str(directory / "vocab.txt"),
            lowercase=bool(config.get("do_lower_case", True)),
            strip_accents=config.get("strip_accents"),
            handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        )._tokenizer
    else:
        raise HFTokenizerError(f"{directory}: no tokenizer.json or vocab.txt for the BERT tokenizer")
    defaults = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}
    ids = _ids_of(_special_names(directory, defaults), backend.token_to_id, directory)
    # An encoder has no BOS/EOS of its own; [CLS] and [SEP] stand for them where a config needs ids.
    return WordPieceTokenizer(backend, {**ids, "bos": ids["cls"], "eos": ids["sep"]})


def load_marian_tokenizer(directory: Path) -> MarianTokenizer:
    directory = Path(directory)
    missing = [f for f in ("source.spm", "target.spm", "vocab.json") if not (directory / f).is_file()]
    if missing:
        raise HFTokenizerError(f"{directory}: the Marian tokenizer needs {', '.join(missing)}")
    config = (
        read_json_object(directory / "tokenizer_config.json")
        if (directory / "tokenizer_config.json").is_file()
        else {}
    )
    if config.get("separate_vocabs"):
        raise HFTokenizerError(
            f"{directory}: Marian tokenizers with separate source and target vocabularies are not supported"
        )
    vocab = read_json_object(directory / "vocab.json")
    names = _special_names(directory, {"pad": "<pad>", "unk": "<unk>", "eos": "</s>"})
    ids = _ids_of(names, vocab.get, directory / "vocab.json")
    # Marian starts decoding from the pad token (decoder_start_token_id): BOS is pad.
    return MarianTokenizer(
        (directory / "source.spm").read_bytes(),
        (directory / "target.spm").read_bytes(),
        {str(k): int(v) for k, v in vocab.items()},
        {**ids, "bos": ids["pad"]},
    )
