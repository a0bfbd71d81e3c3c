"""Tokenizers: fixed special ids, exact round trips, unknown characters, and files that load back exactly."""

import gzip
import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaswani.config import TransformerConfig
from vaswani.tokenization import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SENTENCES = [
    "A man in an orange hat starring at something.",
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Two young, White males are outside near many bushes.",
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "A little girl climbing into a wooden playhouse.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
] * 4


def requires_data(*parts: str):
    path = DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real-data test: {path} not found")


def read_lines(path: Path, limit: int | None = None, encoding: str = "utf-8") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding) as f:
        lines = f.read().splitlines()
    return lines[:limit]


@pytest.fixture(scope="module")
def small_tokenizers() -> dict[str, Tokenizer]:
    return {
        "bpe": Tokenizer.train_bpe(SENTENCES, vocab_size=200),
        "wordpiece": Tokenizer.train_wordpiece(SENTENCES, vocab_size=200),
        "chars": Tokenizer.train_chars(SENTENCES),
    }


KINDS = ["bpe", "wordpiece", "chars"]


# ------------------------------------------------------------------ no data needed
@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_have_fixed_ids_matching_the_config(small_tokenizers, kind):
    tok = small_tokenizers[kind]
    assert tok.kind == kind
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID]
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID, CLS_ID) == (0, 1, 2, 3, 4)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, cls_id=CLS_ID)
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert [tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_text_encodes_to_nothing(small_tokenizers, kind):
    tok = small_tokenizers[kind]
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize("kind", KINDS)
def test_encode_adds_no_special_tokens_and_batch_equals_single(small_tokenizers, kind):
    tok = small_tokenizers[kind]
    ids = tok.encode_batch(SENTENCES[:6])
    assert ids == [tok.encode(s) for s in SENTENCES[:6]]
    assert all(i >= len(SPECIAL_TOKENS) for row in ids for i in row)
    assert tok.decode_batch(ids) == [tok.decode(row) for row in ids]
    assert len(tok.tokens(SENTENCES[1])) == len(tok.encode(SENTENCES[1]))


@pytest.mark.parametrize("kind", KINDS)
def test_literal_special_token_in_text_is_not_a_control_token(small_tokenizers, kind):
    tok = small_tokenizers[kind]
    ids = tok.encode("a <s> b </s> <pad>")
    assert not {PAD_ID, BOS_ID, EOS_ID, CLS_ID} & set(ids)


def test_bpe_round_trip_restores_whitespace_exactly(small_tokenizers):
    tok = small_tokenizers["bpe"]
    for text in [*SENTENCES[:6], " Ein Mann", "Ein Mann ", "Ein  Mann", "   ", " ", "Mann\tMann"]:
        if all(tok.token_to_id(c) is not None for c in text.replace(" ", "")):
            assert tok.decode(tok.encode(text)) == text, repr(text)


def test_bpe_normalises_to_nfc(small_tokenizers):
    tok = small_tokenizers["bpe"]
    decomposed = unicodedata.normalize("NFD", "Zwei Männer")
    assert decomposed != "Zwei Männer"
    assert tok.encode(decomposed) == tok.encode("Zwei Männer")
    assert tok.decode(tok.encode(decomposed)) == "Zwei Männer"


@pytest.mark.parametrize("kind", KINDS)
def test_unseen_characters_encode_as_unk(small_tokenizers, kind):
    tok = small_tokenizers[kind]
    ids = tok.encode("Ein 日本 Mann 🙂")
    assert UNK_ID in ids
    assert "<unk>" in tok.decode(ids)


def test_decode_drops_control_tokens_but_shows_unk(small_tokenizers):
    tok = small_tokenizers["bpe"]
    ids = tok.encode("Ein Mann")
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "Ein Mann"
    assert tok.decode([CLS_ID, *ids]) == "Ein Mann"
    assert tok.decode([*ids, UNK_ID]) == "Ein Mann<unk>"


def test_wordpiece_rejoins_continuation_pieces(small_tokenizers):
    tok = small_tokenizers["wordpiece"]
    pieces = tok.tokens("Holzmann Mannhut")  # unseen compounds of seen words: spelled with "##" pieces
    assert any(p.startswith("##") for p in pieces)
    assert tok.decode(tok.encode("Holzmann Mannhut")) == "holzmann mannhut"


@given(st.text(alphabet=sorted(set("".join(SENTENCES)) | {"\n", "\r", "\t"}), max_size=60))
@settings(max_examples=60, deadline=None)
def test_char_tokenizer_round_trips_any_text_of_seen_characters(text):
    tok = Tokenizer.train_chars([*SENTENCES, "\n\r\t"])
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_saved_and_loaded_tokenizer_encodes_identically(small_tokenizers, kind, tmp_path):
    tok = small_tokenizers[kind]
    path = tmp_path / "sub" / f"{kind}.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # one file, no temporary left behind
    loaded = Tokenizer.load(path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    text = "Ein Mann <s> mit 日 einem Hut.\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_batch(SENTENCES) == tok.encode_batch(SENTENCES)
    assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def _tamper(document: dict) -> dict:
    document["tokenizer"]["added_tokens"][0]["id"] = 7
    document["tokenizer"]["model"]["vocab"]["<pad>"] = 7
    return document


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(None, id="missing"),
        pytest.param(lambda p, good: p.write_bytes(b"\x00\xff\xfe garbage"), id="binary-garbage"),
        pytest.param(lambda p, good: p.write_text("not json at all"), id="text-garbage"),
        pytest.param(lambda p, good: p.write_text(good[: len(good) // 2]), id="truncated"),
        pytest.param(lambda p, good: p.write_text("[1, 2, 3]"), id="other-json"),
        pytest.param(
            lambda p, good: p.write_text(json.dumps({**json.loads(good), "kind": "wordpiece"})),
            id="wrong-kind",
        ),
        pytest.param(lambda p, good: p.write_text(json.dumps(_tamper(json.loads(good)))), id="moved-special"),
        pytest.param(lambda p, good: p.write_text(good.replace('"merges"', '"merged"')), id="broken-model"),
    ],
)
def test_load_of_a_bad_file_raises_a_one_line_value_error_naming_it(small_tokenizers, tmp_path, write):
    good_path = tmp_path / "good.json"
    small_tokenizers["bpe"].save(good_path)
    path = tmp_path / "bad.json"
    if write is not None:
        write(path, good_path.read_text(encoding="utf-8"))
    with pytest.raises(ValueError) as error:
        Tokenizer.load(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_bpe(SENTENCES, vocab_size=5)


# ------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def multi30k_bpe() -> Tokenizer:
    raw = DATA / "multi30k" / "raw"
    # Joint vocabulary (§5.1): both sides in one training corpus; 5,000 lines each keeps the test fast.
    texts = read_lines(raw / "train.en.gz", 5000) + read_lines(raw / "train.de.gz", 5000)
    return Tokenizer.train_bpe(texts, vocab_size=8000)


@requires_data("multi30k", "raw", "val.de.gz")
def test_multi30k_bpe_round_trips_validation_sentences(multi30k_bpe):
    raw = DATA / "multi30k" / "raw"
    val = read_lines(raw / "val.en.gz") + read_lines(raw / "val.de.gz")
    encoded = multi30k_bpe.encode_batch(val)
    decoded = multi30k_bpe.decode_batch(encoded)
    failures = [(text, ids) for text, ids, out in zip(val, encoded, decoded, strict=True) if out != text]
    rate = 1 - len(failures) / len(val)
    print(f"Multi30k val exact round trip: {rate:.4%} of {len(val)} sentences")
    assert rate >= 0.99
    # The only way to lose text is a character never seen in training (e.g. a no-break space).
    assert all(UNK_ID in ids for _, ids in failures)


@requires_data("multi30k", "raw", "val.de.gz")
def test_multi30k_joint_vocabulary_covers_both_languages(multi30k_bpe):
    assert multi30k_bpe.vocab_size == 8000
    for char in "äöüßÄÖÜ":
        assert multi30k_bpe.token_to_id(char) is not None, char
    for text in ["Ein kleines Mädchen klettert über die Straße.", "A little girl climbs over the street."]:
        ids = multi30k_bpe.encode(text)
        assert UNK_ID not in ids
        assert len(ids) <= 1.5 * len(text.split())  # frequent words of either language are single tokens


@requires_data("tiny_shakespeare", "input.txt")
def test_char_tokenizer_round_trips_tiny_shakespeare_exactly():
    text = (DATA / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    tok = Tokenizer.train_chars([text])
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text) and UNK_ID not in ids
    assert tok.decode(ids) == text
    assert tok.encode("\n") == [tok.token_to_id("\n")]


@requires_data("trec", "TREC.train")
def test_wordpiece_on_trec_round_trips_lowercased_words():
    questions = [
        line.split(" ", 1)[1] for line in read_lines(DATA / "trec" / "TREC.train", encoding="latin-1")
    ]
    tok = Tokenizer.train_wordpiece(questions, vocab_size=4000)
    backend = tok.backend
    exact = 0
    for question, ids in zip(questions, tok.encode_batch(questions), strict=True):
        if UNK_ID in ids:
            continue
        # Decoding gives the normalised words (lowercased, punctuation split off) joined by single spaces.
        words = [
            w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(question))
        ]
        decoded = tok.decode(ids)
        assert decoded == " ".join(words)
        exact += decoded == question.lower()
    assert exact > 0.6 * len(questions)  # TREC is already split on spaces; "U.S." and "'s" come apart
