"""Property-based tests (hypothesis) on random input: tokenizers trained on random Unicode text, batches
of random lengths as the tensors the model sees, and decoding of random sources with random settings.

They complement the example tests of test_tokenization.py, test_batching.py and test_generation.py: the
properties are stated once and checked on inputs nobody chose. Modest `max_examples` and `deadline=None`
keep the whole file to a few seconds on a busy CPU.
"""

from __future__ import annotations

import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vaswani import Transformer, TransformerConfig, TransformerLM
from vaswani.data.batching import make_classification_batch, make_translation_batch, token_batches
from vaswani.tokenization import BOS_ID, CLS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL_IDS = {PAD_ID, BOS_ID, EOS_ID, CLS_ID}

# Printable text of every script, astral planes included; no surrogates (not encodable), no controls
# other than newline and tab, and not "▁": BPE's space mark, documented to decode as a space.
TEXT_CHARS = st.characters(
    blacklist_categories=("Cs", "Cc", "Co", "Cn"), blacklist_characters="\u2581"
) | st.sampled_from(" \n\t")
CORPUS = st.lists(st.text(TEXT_CHARS, min_size=1, max_size=40), min_size=1, max_size=12)


def _composes(text: str) -> bool:
    """True when NFC changes the text: a character of it could then be one the tokenizer never saw."""
    return unicodedata.normalize("NFC", text) != text


# ---------------------------------------------------------------------------------------- tokenizers
@given(corpus=CORPUS, data=st.data())
@SETTINGS
def test_char_tokenizer_round_trips_random_unicode_exactly(corpus, data):
    tok = Tokenizer.train_chars(corpus)
    alphabet = sorted(set("".join(corpus)))
    text = data.draw(st.text(st.sampled_from(alphabet), max_size=60))
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per character, astral ones included
    assert all(len(CONTROL_IDS) < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@given(corpus=CORPUS, data=st.data())
@SETTINGS
def test_bpe_round_trips_random_unicode_to_its_nfc_form(corpus, data):
    tok = Tokenizer.train_bpe(corpus, vocab_size=64)
    alphabet = sorted(set(unicodedata.normalize("NFC", "".join(corpus))))
    text = data.draw(st.text(st.sampled_from(alphabet), max_size=60))
    assume(not _composes(text))  # NFC(text) == text: each of its characters was seen in training
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size and i not in CONTROL_IDS and i != UNK_ID for i in ids)
    assert tok.decode(ids) == text


@given(corpus=CORPUS, text=st.text(TEXT_CHARS | st.characters(), max_size=60))
@SETTINGS
def test_any_text_encodes_to_ids_in_range_and_never_to_control_tokens(corpus, text):
    """Whatever the text (unseen scripts, lone combining marks, control characters, "<s>" written out),
    every id is a vocabulary id, never padding/BOS/EOS/[CLS]; what is unknown becomes <unk>."""
    for tok in (Tokenizer.train_chars(corpus), Tokenizer.train_bpe(corpus, vocab_size=64)):
        ids = tok.encode(text + "<s></s><pad>")
        assert all(0 <= i < tok.vocab_size and i not in CONTROL_IDS for i in ids)
        assert isinstance(tok.decode(ids), str)


WORDS = st.lists(
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzäöüß"), min_size=1, max_size=8), min_size=1
)


@given(corpus=st.lists(WORDS, min_size=1, max_size=10), data=st.data())
@SETTINGS
def test_wordpiece_round_trips_sentences_of_seen_words(corpus, data):
    """WordPiece lowercases, strips accents and puts one space between words: text already in that form
    (lower-case words of the corpus, no accents, single spaces) comes back exactly."""
    texts = [" ".join(words) for words in corpus]
    tok = Tokenizer.train_wordpiece(texts, vocab_size=80, lowercase=False)
    vocabulary = sorted({word for words in corpus for word in words})
    words = data.draw(st.lists(st.sampled_from(vocabulary), min_size=1, max_size=8))
    text = " ".join(words)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size and i not in CONTROL_IDS and i != UNK_ID for i in ids)
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------------------- batching
SEQUENCES = st.lists(st.lists(st.integers(5, 99), min_size=0, max_size=30), min_size=1, max_size=60)


@given(
    src=SEQUENCES,
    data=st.data(),
    max_tokens=st.integers(31, 200),
    max_sentences=st.none() | st.integers(1, 16),
    seed=st.integers(0, 2**31),
    epochs=st.integers(1, 3),
)
@SETTINGS
def test_translation_batches_hold_every_pair_once_within_budget_with_matching_padding(
    src, data, max_tokens, max_sentences, seed, epochs
):
    """The tensors the model sees, as TranslationTask builds them: each pair exactly once per epoch, no
    tensor over the budget, and the padding mask equal to the lengths, with the real ids in place."""
    tgt = data.draw(st.lists(st.lists(st.integers(5, 99), max_size=29), min_size=len(src), max_size=len(src)))
    for epoch in range(epochs):
        batches = token_batches(
            [len(s) for s in src], [len(t) + 1 for t in tgt], max_tokens, True, seed, epoch, max_sentences
        )
        assert sorted(i for batch in batches for i in batch) == list(range(len(src)))
        for batch in batches:
            b = make_translation_batch(
                [src[i] for i in batch], [tgt[i] for i in batch], BOS_ID, EOS_ID, PAD_ID
            )
            assert b.src.numel() <= max_tokens or b.src.shape[1] == 0
            assert b.tgt_in.numel() <= max_tokens and b.tgt_out.numel() <= max_tokens
            assert max_sentences is None or len(batch) <= max_sentences
            assert (b.src != PAD_ID).sum(1).tolist() == [len(src[i]) for i in batch]
            assert (b.tgt_out != PAD_ID).sum(1).tolist() == [len(tgt[i]) + 1 for i in batch]
            for row, i in enumerate(batch):
                assert b.src[row, : len(src[i])].tolist() == src[i]
                assert b.tgt_in[row, : len(tgt[i]) + 1].tolist() == [BOS_ID, *tgt[i]]
                assert b.tgt_out[row, : len(tgt[i]) + 1].tolist() == [*tgt[i], EOS_ID]
            assert b.n_src_tokens == sum(len(src[i]) for i in batch)


@given(ids=SEQUENCES.filter(lambda rows: all(rows)), max_tokens=st.integers(30, 200), seed=st.integers(0, 99))
@SETTINGS
def test_classification_batches_pad_to_the_lengths_and_keep_labels_aligned(ids, max_tokens, seed):
    labels = [i % 3 for i in range(len(ids))]
    for batch in token_batches([len(s) + 1 for s in ids], None, max_tokens, True, seed, 0):
        b = make_classification_batch([ids[i] for i in batch], [labels[i] for i in batch], PAD_ID)
        assert (b.ids.shape[1] + 1) * len(batch) <= max_tokens  # + 1: the [CLS] the model prepends
        assert (b.ids != PAD_ID).sum(1).tolist() == [len(ids[i]) for i in batch]
        assert b.labels.tolist() == [labels[i] for i in batch]


# ---------------------------------------------------------------------------------------- decoding
VOCAB = 24


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """A tiny random encoder-decoder and language model, each with and without a bias towards EOS (so
    that some rows finish early and others run to the limit)."""
    built = {}
    for name, cls in (("transformer", Transformer), ("lm", TransformerLM)):
        for eos_bias in (0.0, 3.0):
            torch.manual_seed(0)
            model = cls(TransformerConfig.tiny(vocab_size=VOCAB, dropout=0.0, max_len=64)).eval()
            if eos_bias:
                bias = torch.zeros(VOCAB)
                bias[EOS_ID] = eos_bias
                model.output_projection.register_forward_hook(lambda _m, _i, out, bias=bias: out + bias)
            built[f"{name}+eos" if eos_bias else name] = model
    return built


def assert_valid_output(out: torch.Tensor, rows: int, max_new_tokens: int) -> None:
    """(rows, L <= max_new_tokens) ids in range; never BOS; padding only after the row's EOS."""
    assert out.shape[0] == rows and out.shape[1] <= max_new_tokens
    assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert not (out == BOS_ID).any()
    for row in out.tolist():
        end = row.index(EOS_ID) if EOS_ID in row else len(row)
        assert PAD_ID not in row[:end], row  # pad is never generated before the end
        assert all(t == PAD_ID for t in row[end + 1 :]), row  # after EOS: padding only


DECODING = {
    "model": st.sampled_from(["transformer", "transformer+eos", "lm", "lm+eos"]),
    "lengths": st.lists(st.integers(1, 10), min_size=1, max_size=4),
    "max_new_tokens": st.integers(1, 12),
    "beam_size": st.integers(1, 4),
    "sample": st.booleans(),
    "temperature": st.floats(0.1, 3.0),
    "top_k": st.none() | st.integers(1, VOCAB + 5),
    "top_p": st.none() | st.floats(0.05, 1.0),
    "seed": st.integers(0, 2**31),
}


@given(**DECODING)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decoding_random_inputs_gives_valid_ids_that_stop_at_eos_within_max_length(
    models, model, lengths, max_new_tokens, beam_size, sample, temperature, top_k, top_p, seed
):
    net = models[model]
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    inputs = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    options = {"max_new_tokens": max_new_tokens}
    if sample:
        options.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
    else:
        options.update(beam_size=beam_size)
    out = net.generate(inputs, **options)
    assert_valid_output(out, len(rows), max_new_tokens)
    # The scores of what was produced are finite: no NaN or inf along any generated path.
    with torch.no_grad():
        if model.startswith("transformer"):
            tgt_in = torch.cat([torch.full((len(rows), 1), BOS_ID), out], dim=1)
            logits = net(inputs, tgt_in)
        else:
            logits = net(torch.cat([inputs, out], dim=1).clamp(min=3))
    assert torch.isfinite(logits).all()


@given(
    model=st.sampled_from(["transformer", "transformer+eos", "lm", "lm+eos"]),
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    max_new_tokens=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_beam_size_one_equals_greedy_and_top_k_one_sampling_on_random_inputs(
    models, model, lengths, max_new_tokens, seed
):
    net = models[model]
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    inputs = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    greedy = net.generate(inputs, max_new_tokens=max_new_tokens)
    beam_one = net.generate(inputs, max_new_tokens=max_new_tokens, beam_size=1, length_penalty=1.0)
    top_one = net.generate(inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=1, generator=g)
    assert torch.equal(beam_one, greedy) and torch.equal(top_one, greedy)
