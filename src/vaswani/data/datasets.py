"""Dataset loaders: Multi30k translation (the small stand-in for WMT 2014 of §6.1), text classification
(TREC, SST, BBC News, AG News) for the encoder classifier, tiny-shakespeare for the language model, and
readers for a user's own files.

Every loader returns plain Python lists (`ParallelCorpus`, `LabeledTexts`) or a string; tokenization and
batching live elsewhere. Files are looked up in the data directory (`resolve_data_dir`), as laid out in
`<data>/README.md`; a file missing there that has a known public source is downloaded into the user cache
and verified against its checksum (`ensure_file`). Every problem with a file is a one-line `DataError`.

Where a dataset has no official validation (or any) split, the loader makes a fixed, seeded split, so that
every run and every machine sees the same examples in the same split:

- TREC: "valid" is 10% of the official training set, stratified by fine label (seed 0); "train" the other
  90%. The official 500-question test set stays held out for the final number.
- BBC News: duplicates removed, then 80/10/10 train/valid/test, stratified by class (seed 0).
- AG News: "valid" is 5% of the official training set, stratified by class (seed 0).
- tiny-shakespeare: the first 90% of the characters are "train", the last 10% "valid" (nanoGPT).
"""

from __future__ import annotations

import csv
import gzip
import html
import inspect
import io
import json
import os
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaswani.data.download import RemoteFile, ensure_file
from vaswani.data.paths import DataError, resolve_data_dir

SPLIT_SEED = 0

PathLike = str | os.PathLike[str]


@dataclass
class ParallelCorpus:
    """Aligned sentence pairs: `tgt[i]` is the translation of `src[i]`."""

    src: list[str]
    tgt: list[str]
    src_lang: str
    tgt_lang: str

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class LabeledTexts:
    """Texts with integer labels; `label_names[labels[i]]` is the class of `texts[i]`. The names (and so the
    integers) are the same for every split of a dataset."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @staticmethod
    def join(parts: Sequence[LabeledTexts]) -> LabeledTexts:
        """The parts one after another (they share their label names, as the splits of a dataset do)."""
        if len(parts) == 1:
            return parts[0]
        return LabeledTexts(
            [t for p in parts for t in p.texts], [y for p in parts for y in p.labels], parts[0].label_names
        )

    def subset(self, indices: Sequence[int]) -> LabeledTexts:
        return LabeledTexts(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names
        )


# helpers -----------------------------------------------------


def _raw_github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _decode(data: bytes, path: Path, latin1_fallback: bool = False) -> str:
    """UTF-8 text (a leading BOM dropped); with `latin1_fallback`, a file that is not valid UTF-8 is read as
    Latin-1 (the one TREC line and the one BBC file that hold a bare Latin-1 byte). Otherwise invalid UTF-8
    is a DataError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if latin1_fallback:
            return data.decode("latin-1")
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})") from e


def _lines(text: str) -> list[str]:
    """Lines without their "\\n" (the last line's terminator is optional); other characters, TABs included,
    are kept."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _canonical_split(dataset: str, split: str, aliases: dict[str, str]) -> str:
    """The split's canonical name; `aliases` maps every accepted name (canonical ones too) to it."""
    if split not in aliases:
        raise DataError(f"unknown split {split!r} for {dataset}; choose from {', '.join(aliases)}")
    return aliases[split]


def _stratified_holdout(
    labels: Sequence[int], fractions: dict[str, float], seed: int
) -> dict[str, list[int]]:
    """Split indices into the held-out parts named in `fractions` and a "train" remainder, class by class.

    Each class's indices are shuffled by one generator seeded with `seed` (classes in label order), and
    round(fraction * class size) go to each held-out part in turn. Indices keep file order within a part.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    parts: dict[str, list[int]] = {name: [] for name in (*fractions, "train")}
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        start = 0
        for name, fraction in fractions.items():
            take = min(int(fraction * len(indices) + 0.5), len(indices) - start)
            parts[name].extend(indices[start : start + take])
            start += take
        parts["train"].extend(indices[start:])
    return {name: sorted(part) for name, part in parts.items()}


# Multi30k ----------------------------------------------------

MULTI30K_LANGS = ("en", "de")
_MULTI30K_SPLITS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "test_2016_flickr": "test_2016_flickr",
    "test": "test_2016_flickr",
}
_MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
_MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}
MULTI30K_FILES = {
    name: RemoteFile(_raw_github("multi30k/dataset", _MULTI30K_COMMIT, f"data/task1/raw/{name}"), sha256=sha)
    for name, sha in _MULTI30K_SHA256.items()
}


def load_multi30k(
    split: str, src_lang: str = "en", tgt_lang: str = "de", data_dir: PathLike | None = None
) -> ParallelCorpus:
    """Multi30k task 1 (WMT16 multimodal), English-German in either direction, original (raw) text.

    Splits: "train" (29,000 pairs), "val" or "valid" (1,014), "test_2016_flickr" or "test" (1,000). Reads
    `multi30k/raw/{split}.{lang}.gz`, downloading a missing file from the official repository at a pinned
    commit. Only the line terminator is removed. One German training line (7,366) holds a TAB and
    surrounding double quotes; it is kept exactly as published, as one sentence, since tokenizers treat the
    TAB as whitespace and the quotes are in the reference text.
    """
    if src_lang not in MULTI30K_LANGS or tgt_lang not in MULTI30K_LANGS or src_lang == tgt_lang:
        langs = " and ".join(MULTI30K_LANGS)
        raise DataError(f"multi30k translates between {langs}; got {src_lang}-{tgt_lang}")
    split = _canonical_split("multi30k", split, _MULTI30K_SPLITS)
    root = resolve_data_dir(data_dir)
    sides = []
    for lang in (src_lang, tgt_lang):
        name = f"{split}.{lang}.gz"
        path = ensure_file(root, f"multi30k/raw/{name}", MULTI30K_FILES[name])
        sides.append(_lines(_decode(_read_bytes(path), path)))
    return _aligned(sides[0], sides[1], src_lang, tgt_lang, f"multi30k/raw/{split}.{{{src_lang},{tgt_lang}}}")


def _aligned(src: list[str], tgt: list[str], src_lang: str, tgt_lang: str, where: str) -> ParallelCorpus:
    if len(src) != len(tgt):
        raise DataError(f"{where}: {len(src)} source lines but {len(tgt)} target lines")
    return ParallelCorpus(src, tgt, src_lang, tgt_lang)


def load_parallel_files(
    src_path: PathLike, tgt_path: PathLike, src_lang: str = "src", tgt_lang: str = "tgt"
) -> ParallelCorpus:
    """A user's own line-aligned parallel text (plain or .gz, UTF-8): line i of one file translates line i
    of the other. Line terminators ("\\n" or "\\r\\n") are removed, nothing else. An empty file, files of
    different lengths, or text that is not UTF-8 raise DataError naming the file and line."""
    sides = []
    for path in (Path(src_path), Path(tgt_path)):
        lines = [line.removesuffix("\r") for line in _lines(_decode(_read_bytes(path), path))]
        if not lines:
            raise DataError(f"{path}: file is empty")
        sides.append(lines)
    src, tgt = sides
    if len(src) != len(tgt):
        shorter, longer = (src_path, tgt_path) if len(src) < len(tgt) else (tgt_path, src_path)
        raise DataError(
            f"{shorter}: ends at line {min(len(src), len(tgt))} but {longer} has "
            f"{max(len(src), len(tgt))} lines; the files must be aligned line by line"
        )
    return ParallelCorpus(src, tgt, src_lang, tgt_lang)


# TREC --------------------------------------------------------

TREC_COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
_TREC_SPLITS = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
    "train_full": "train_full",
}
_SENT_CONV_COMMIT = "d61ded09c99c0199d8c5bca946cd65864de2b296"
TREC_FILES = {
    "TREC.train": RemoteFile(
        _raw_github("harvardnlp/sent-conv-torch", _SENT_CONV_COMMIT, "data/raw/TREC.train"),
        sha256="9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
    ),
    "TREC.test": RemoteFile(
        _raw_github("harvardnlp/sent-conv-torch", _SENT_CONV_COMMIT, "data/raw/TREC.test"),
        sha256="033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
    ),
}


def _read_trec(root: Path, name: str) -> list[tuple[str, str]]:
    """(fine label such as "NUM:dist", question) pairs of one TREC file."""
    path = ensure_file(root, f"trec/{name}", TREC_FILES[name])
    rows = []
    for number, line in enumerate(_lines(_decode(_read_bytes(path), path, latin1_fallback=True)), 1):
        label, _, question = line.partition(" ")
        if ":" not in label or not question:
            raise DataError(f"{path}: line {number} is not 'COARSE:fine question'")
        rows.append((label, question))
    return rows


def load_trec(split: str, fine: bool = False, data_dir: PathLike | None = None) -> LabeledTexts:
    """TREC question classification (Li & Roth 2002): 6 coarse classes, or with `fine` 50 fine classes named
    "COARSE:fine" (a bare fine name such as "other" occurs under several coarse classes). Label names are
    sorted; the fine ones are those of the official training set, which holds all 50 (the test set has 42).

    Splits: "train_full" is the official training set (5,452 questions); "train" (4,905) and "valid" (547;
    aliases "val", "dev") split it 90/10, stratified by fine label with seed 0, so tuning never touches the
    official "test" set (500). The split is the same for coarse and fine labels. Line 66 of TREC.train holds
    a bare Latin-1 byte (0xF0 in "sister\\xf0city"); the file is read as Latin-1 when it is not valid UTF-8,
    giving "sisterðcity".
    """
    split = _canonical_split("trec", split, _TREC_SPLITS)
    root = resolve_data_dir(data_dir)
    train = _read_trec(root, "TREC.train")
    fine_names = sorted({label for label, _ in train})
    rows = _read_trec(root, "TREC.test") if split == "test" else train
    names = fine_names if fine else TREC_COARSE
    index = {name: i for i, name in enumerate(names)}
    try:
        labels = [index[label if fine else label.partition(":")[0]] for label, _ in rows]
    except KeyError as e:
        raise DataError(f"trec/TREC.{split}: label {e.args[0]!r} is not one of the training labels") from e
    data = LabeledTexts([question for _, question in rows], labels, names)
    if split in ("test", "train_full"):
        return data
    fine_index = {name: i for i, name in enumerate(fine_names)}
    parts = _stratified_holdout([fine_index[label] for label, _ in rows], {"valid": 0.1}, SPLIT_SEED)
    return data.subset(parts[split])


# SST ---------------------------------------------------------

SST2_LABELS = ["negative", "positive"]
SST5_LABELS = ["very negative", "negative", "neutral", "positive", "very positive"]
_SST_SPLITS = {"train": "train", "dev": "dev", "valid": "dev", "val": "dev", "test": "test"}
_SST_SHA256 = {
    "stsa.binary.train": "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338",
    "stsa.binary.dev": "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1",
    "stsa.binary.test": "6a80dc9b9a0db2d3b37f2f809304febad31c90ab67a5b4157b7d9f881c53ef5b",
    "stsa.fine.train": "9b52b5f686ed438d4d0274c385369251b3d579b578fddd340ba8a9bae2ca4bee",
    "stsa.fine.dev": "b2f76c62b960f9fda5c6d751edb125abab4f878eb94a8754239b7f4af647f4c3",
    "stsa.fine.test": "0e2ebb450c231f7b3d67fc932066e7bb26ae7bad8c88488f45ed44ef02eb3c73",
}
SST_FILES = {
    name: RemoteFile(_raw_github("harvardnlp/sent-conv-torch", _SENT_CONV_COMMIT, f"data/{name}"), sha256=sha)
    for name, sha in _SST_SHA256.items()
}


def load_sst(split: str, fine: bool = False, data_dir: PathLike | None = None) -> LabeledTexts:
    """Stanford Sentiment Treebank sentences (Socher et al. 2013) in Kim's (2014) split: SST-2 (negative,
    positive; neutral sentences removed) or with `fine` SST-5 (very negative ... very positive).

    Splits: "train", "dev" (aliases "valid", "val"), "test": 6,920 / 872 / 1,821 sentences for SST-2 and
    8,544 / 1,101 / 2,210 for SST-5. The text is lower-cased and PTB-tokenized upstream ("-lrb-" for "(").
    """
    split = _canonical_split("sst", split, _SST_SPLITS)
    names = SST5_LABELS if fine else SST2_LABELS
    name = f"stsa.{'fine' if fine else 'binary'}.{split}"
    path = ensure_file(resolve_data_dir(data_dir), f"sst/{name}", SST_FILES[name])
    texts, labels = [], []
    for number, line in enumerate(_lines(_decode(_read_bytes(path), path)), 1):
        label, _, text = line.partition(" ")
        if not label.isdigit() or int(label) >= len(names) or not text:
            raise DataError(f"{path}: line {number} is not 'LABEL sentence' with LABEL 0-{len(names) - 1}")
        texts.append(text)
        labels.append(int(label))
    return LabeledTexts(texts, labels, list(names))


# BBC News ----------------------------------------------------

BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
_BBC_SPLITS = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}


def load_bbc_news(split: str, data_dir: PathLike | None = None) -> LabeledTexts:
    """BBC News topic classification (Greene & Cunningham 2006), 5 classes, from `bbc_news/bbc/<class>/*.txt`.

    Text: the headline, a newline, then the body paragraphs joined by single newlines (the files' blank
    lines between paragraphs, sometimes doubled, are dropped). Files are UTF-8, except sport/199.txt whose
    one `£` is a bare Latin-1 byte; it is read as Latin-1.

    There is no official split. Duplicates are removed first so that no article is both trained on and
    tested on: articles whose text is identical up to whitespace (the 98 exact duplicates plus 2 that
    differ only in paragraph breaks) are kept once, as the lowest-numbered file, leaving 2,125 of 2,225.
    Then each class is split 80/10/10 with seed 0: "train" 1,701, "valid" (aliases "val", "dev") 212,
    "test" 212 articles.
    """
    split = _canonical_split("bbc_news", split, _BBC_SPLITS)
    root = resolve_data_dir(data_dir) / "bbc_news" / "bbc"
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(BBC_LABELS):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise DataError(f"{root / name}: no articles found (expected bbc_news/bbc/{name}/NNN.txt)")
        for path in files:
            lines = [line.strip() for line in _lines(_decode(_read_bytes(path), path, latin1_fallback=True))]
            if not lines or not lines[0]:
                raise DataError(f"{path}: line 1 should be the headline but is empty")
            title, body = lines[0], [line for line in lines[1:] if line]
            text = "\n".join([title, *body])
            key = " ".join(text.split())
            if key in seen:
                continue
            seen.add(key)
            texts.append(text)
            labels.append(label)
    parts = _stratified_holdout(labels, {"valid": 0.1, "test": 0.1}, SPLIT_SEED)
    return LabeledTexts(texts, labels, list(BBC_LABELS)).subset(parts[split])


# AG News -----------------------------------------------------

_AG_NEWS_BASE = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"
# torchtext's AG_NEWS location and MD5s; classes.txt's sha256 is from data/ag_news/SOURCE.md.
AG_NEWS_FILES = {
    "train.csv": RemoteFile(f"{_AG_NEWS_BASE}/train.csv", md5="b1a00f826fdfbd249f79597b59e1dc12"),
    "test.csv": RemoteFile(f"{_AG_NEWS_BASE}/test.csv", md5="d52ea96a97a2d943681189a97654912d"),
    "classes.txt": RemoteFile(
        f"{_AG_NEWS_BASE}/classes.txt",
        sha256="612dbfa932f07a6ed837295a7d5746ce7412e7bb4bc32ba919fdb3cda3a1b9b5",
    ),
}
_AG_NEWS_SPLITS = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}
_AG_ENTITY = re.compile(r" #(\d+);")
_HTML_TAG = re.compile(r"</?(?:a|b|br|em|font|i|img|nobr|p|strong)\b[^<>]*>", re.IGNORECASE)


def clean_ag_news_text(text: str) -> str:
    """Undo the AG News CSV's mangling of the original HTML text.

    `\\$` is an escaped dollar sign; any other run of backslashes stood for a line or paragraph break and
    becomes a space. Numeric entities lost their `&` to a space (`Street #39;s`, `the  #36;10`): the space
    is turned back into `&` and all entities are unescaped (`&#151;` is an em dash, as in HTML). Markup
    that this reveals (`<A HREF=...>`, `<FONT ...>`, `<b>`) is removed, but not Reuters tickers such as
    `<TXN.N>`. Runs of whitespace become one space.
    """
    text = re.sub(r"\\+", " ", text.replace("\\$", "$"))
    text = html.unescape(_AG_ENTITY.sub(r"&#\1;", text))
    return " ".join(_HTML_TAG.sub(" ", text).split())


def _read_ag_news_csv(path: Path, num_classes: int) -> LabeledTexts:
    texts, labels = [], []
    reader = csv.reader(io.StringIO(_decode(_read_bytes(path), path), newline=""))
    try:
        for row in reader:
            if len(row) != 3 or not row[0].isdigit() or not 1 <= int(row[0]) <= num_classes:
                raise DataError(
                    f"{path}: line {reader.line_num} is not 'class (1-{num_classes}), title, description'"
                )
            title, description = clean_ag_news_text(row[1]), clean_ag_news_text(row[2])
            # A headline rarely ends in punctuation; ". " keeps it a sentence of its own.
            separator = " " if title.endswith((".", "!", "?")) else ". "
            texts.append(separator.join(part for part in (title, description) if part))
            labels.append(int(row[0]) - 1)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from e
    if not texts:
        raise DataError(f"{path}: file is empty")
    return LabeledTexts(texts, labels, [])


def load_ag_news(split: str, data_dir: PathLike | None = None) -> LabeledTexts:
    """AG News topic classification (Zhang et al. 2015), 4 classes named by classes.txt (World, Sports,
    Business, Sci/Tech); the CSV's 1-based labels become 0-3.

    Text: the cleaned title, ". " (just " " when the title already ends in . ! or ?), the cleaned
    description; see `clean_ag_news_text`. Splits: "train" (114,000) and "valid" (6,000; aliases "val",
    "dev") are a 95/5 split of the official 120,000 training rows, stratified by class with seed 0;
    "test" is the official 7,600. The training file is not in the shared data folder, so it is downloaded
    (about 30 MB, MD5-checked) into the user cache on first use.
    """
    split = _canonical_split("ag_news", split, _AG_NEWS_SPLITS)
    root = resolve_data_dir(data_dir)
    classes_path = ensure_file(root, "ag_news/classes.txt", AG_NEWS_FILES["classes.txt"])
    class_lines = _lines(_decode(_read_bytes(classes_path), classes_path))
    names = [line.strip() for line in class_lines if line.strip()]
    name = "test.csv" if split == "test" else "train.csv"
    data = _read_ag_news_csv(ensure_file(root, f"ag_news/{name}", AG_NEWS_FILES[name]), len(names))
    data.label_names = names
    if split == "test":
        return data
    return data.subset(_stratified_holdout(data.labels, {"valid": 0.05}, SPLIT_SEED)[split])


# tiny-shakespeare --------------------------------------------

TINY_SHAKESPEARE_FILE = RemoteFile(
    _raw_github(
        "karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e", "data/tinyshakespeare/input.txt"
    ),
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
_SHAKESPEARE_SPLITS = {"train": "train", "valid": "valid", "val": "valid"}


def load_tiny_shakespeare(split: str, data_dir: PathLike | None = None) -> str:
    """Karpathy's tiny-shakespeare (1,115,394 characters) for character-level language modelling.

    nanoGPT's shakespeare_char split: "train" is the first 90% of the characters (1,003,854), "valid"
    (alias "val") the last 10% (111,540). The cut falls mid-line; that is the convention, kept for
    comparable numbers.
    """
    split = _canonical_split("tiny_shakespeare", split, _SHAKESPEARE_SPLITS)
    path = ensure_file(resolve_data_dir(data_dir), "tiny_shakespeare/input.txt", TINY_SHAKESPEARE_FILE)
    text = _decode(_read_bytes(path), path)
    cut = int(0.9 * len(text))
    return text[:cut] if split == "train" else text[cut:]


# user files --------------------------------------------------

_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"[+-]?\d+")


def _read_table(
    path: Path, text: str, file_format: str, columns: tuple[str, str]
) -> list[tuple[int, Any, Any]]:
    """(line number, text, label) rows of a CSV/TSV file with a header row, or of a JSONL file."""
    rows = []
    if file_format == "jsonl":
        for number, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number} is not valid JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            for column in columns:
                if column not in record:
                    raise DataError(f"{path}: line {number} has no {column!r} field")
            rows.append((number, record[columns[0]], record[columns[1]]))
        return rows
    dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if file_format == "tsv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **dialect)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty")
        missing = [column for column in columns if column not in header]
        if missing:
            found = ", ".join(header)
            raise DataError(f"{path}: line 1 (header) has no column {missing[0]!r}; it has {found}")
        positions = [header.index(column) for column in columns]
        for row in reader:
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
                )
            rows.append((reader.line_num, row[positions[0]], row[positions[1]]))
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from e
    return rows


def load_labeled_file(
    path: PathLike,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    file_format: str | None = None,
) -> LabeledTexts:
    """A user's own classification data: TSV or CSV with a header row, or JSONL (one object per line), UTF-8,
    plain or .gz; the format comes from the extension (.tsv, .csv, .jsonl/.ndjson) unless `file_format`
    names it.

    Labels are class names or integers. With `label_names`, a label is looked up by name, and an integer
    label is an index into the list. Without it, integer labels (in JSON, or strings of digits in CSV/TSV)
    are kept and named "0".."max"; any other labels are mapped to their sorted names. A missing column,
    an empty file, a non-text value or an unknown label raises DataError naming the file and line.
    """
    path = Path(path)
    suffixes = [suffix.lower() for suffix in path.suffixes if suffix.lower() != ".gz"]
    file_format = file_format or (_FORMATS.get(suffixes[-1], "") if suffixes else "")
    if file_format not in ("tsv", "csv", "jsonl"):
        raise DataError(f"{path}: unknown format; pass file_format='tsv', 'csv' or 'jsonl'")
    rows = _read_table(path, _decode(_read_bytes(path), path), file_format, (text_column, label_column))
    if not rows:
        raise DataError(f"{path}: file has no examples")

    def as_int(label: Any) -> int | None:
        if isinstance(label, int) and not isinstance(label, bool):
            return label
        return int(label) if isinstance(label, str) and _INT.fullmatch(label.strip()) else None

    for number, text, label in rows:
        if not isinstance(text, str):
            raise DataError(f"{path}: line {number}: {text_column!r} is {text!r}, not text")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{path}: line {number}: label {label!r} is neither a name nor an integer")
    if label_names is not None:
        names = list(label_names)
        index = {name: i for i, name in enumerate(names)}
    elif all(as_int(label) is not None for _, _, label in rows):
        highest = max(int(label) for _, _, label in rows)
        names = [str(i) for i in range(highest + 1)]
        index = {}
    else:
        names = sorted({str(label) for _, _, label in rows})
        index = {name: i for i, name in enumerate(names)}
    labels = []
    for number, _, label in rows:
        value = index.get(label) if isinstance(label, str) else None
        if value is None:
            value = as_int(label)
        if value is None or not 0 <= value < len(names):
            known = ", ".join(names)
            raise DataError(f"{path}: line {number}: unknown label {label!r}; the labels are {known}")
        labels.append(value)
    return LabeledTexts([text for _, text, _ in rows], labels, names)


def load_text_file(path: PathLike) -> str:
    """A user's own text for language modelling (plain or .gz, UTF-8), exactly as written. A missing or
    empty file, or text that is not UTF-8, raises DataError naming the file (and line)."""
    path = Path(path)
    text = _decode(_read_bytes(path), path)
    if not text:
        raise DataError(f"{path}: file is empty")
    return text


# registry ----------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its loader, the options that select it (e.g. fine=True) and its canonical splits."""

    loader: Callable[..., Any]
    splits: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


CLASSIFICATION_DATASETS: dict[str, DatasetSpec] = {
    "trec": DatasetSpec(load_trec, ("train", "valid", "test", "train_full")),
    "trec-fine": DatasetSpec(load_trec, ("train", "valid", "test", "train_full"), {"fine": True}),
    "sst2": DatasetSpec(load_sst, ("train", "dev", "test")),
    "sst5": DatasetSpec(load_sst, ("train", "dev", "test"), {"fine": True}),
    "bbc_news": DatasetSpec(load_bbc_news, ("train", "valid", "test")),
    "ag_news": DatasetSpec(load_ag_news, ("train", "valid", "test")),
}
TRANSLATION_DATASETS: dict[str, DatasetSpec] = {
    "multi30k": DatasetSpec(load_multi30k, ("train", "val", "test_2016_flickr")),
}


@dataclass(frozen=True)
class FineLabelSpec:
    """Where a coarse classification dataset's finer labels are: the dataset that has them, the coarse
    class names, and the coarse class of each fine class name (None: none, as SST-5's neutral sentences
    under SST-2). The fine dataset holds every example of the coarse one, in each split."""

    fine_dataset: str
    coarse_names: tuple[str, ...]
    coarse_of: Callable[[str], str | None]


_SST5_TO_SST2 = dict(zip(SST5_LABELS, ["negative", "negative", None, "positive", "positive"], strict=True))
FINE_LABEL_DATASETS: dict[str, FineLabelSpec] = {
    # The same questions, each under one of 50 fine classes named "COARSE:fine".
    "trec": FineLabelSpec("trec-fine", tuple(TREC_COARSE), lambda fine: fine.partition(":")[0]),
    # SST-5's sentences of the same split: the SST-2 ones, graded in two strengths, plus the neutral ones.
    "sst2": FineLabelSpec("sst5", tuple(SST2_LABELS), _SST5_TO_SST2.__getitem__),
}


def load_fine_labels(
    name: str, split: str, data_dir: PathLike | None = None
) -> tuple[LabeledTexts, list[str], list[int]]:
    """A classification dataset's split with finer labels (TREC's 50 classes for "trec", SST-5's five for
    "sst2"): the fine-labelled examples, the coarse class names, and for each fine class the index of its
    coarse class (-1: none). What a classifier trained with `[data] fine_labels` reads."""
    key = name.lower().replace("-", "_")
    if key not in FINE_LABEL_DATASETS:
        raise DataError(
            f"dataset {name!r} has no finer labels; those that do: {', '.join(FINE_LABEL_DATASETS)}"
        )
    spec = FINE_LABEL_DATASETS[key]
    fine = LabeledTexts.join(
        [load_classification(spec.fine_dataset, part, data_dir=data_dir) for part in split.split("+")]
    )
    index = {label: i for i, label in enumerate(spec.coarse_names)}
    coarse = [spec.coarse_of(label) for label in fine.label_names]
    return fine, list(spec.coarse_names), [-1 if c is None else index[c] for c in coarse]


def _lookup(registry: dict[str, DatasetSpec], kind: str, name: str) -> DatasetSpec:
    """The spec for `name`, with "-" and "_" treated alike (trec_fine, bbc-news)."""
    wanted = name.lower().replace("-", "_")
    for key, spec in registry.items():
        if key.replace("-", "_") == wanted:
            return spec
    raise DataError(f"unknown {kind} dataset {name!r}; choose from {', '.join(registry)}")


def load_classification(
    name: str, split: str, data_dir: PathLike | None = None, **options: Any
) -> LabeledTexts:
    """Load a classification dataset by name (see CLASSIFICATION_DATASETS); `options` go to its loader
    (e.g. fine=True for "trec") and override those the name implies."""
    spec = _lookup(CLASSIFICATION_DATASETS, "classification", name)
    accepted = set(inspect.signature(spec.loader).parameters) - {"split", "data_dir"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise DataError(f"dataset {name!r} takes no option {unknown[0]!r}; it takes {takes}")
    return spec.loader(split, data_dir=data_dir, **{**spec.options, **options})


def load_translation(
    name: str, split: str, src_lang: str = "en", tgt_lang: str = "de", data_dir: PathLike | None = None
) -> ParallelCorpus:
    """Load a translation dataset by name (see TRANSLATION_DATASETS) in the direction src_lang -> tgt_lang."""
    spec = _lookup(TRANSLATION_DATASETS, "translation", name)
    return spec.loader(split, src_lang=src_lang, tgt_lang=tgt_lang, data_dir=data_dir)
