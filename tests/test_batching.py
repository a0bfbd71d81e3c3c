"""Batching by token count (§5.1), padding, translation and classification batches, language-model windows."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaswani.data.batching import (
    ClassificationBatch,
    TranslationBatch,
    lm_eval_windows,
    lm_windows,
    make_classification_batch,
    make_translation_batch,
    pad_batch,
    padding_fraction,
    token_batches,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MULTI30K = DATA / "multi30k" / "raw"


def assert_valid_batches(batches, src, tgt, max_tokens, max_sentences=None):
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(src))), "every example exactly once"
    for batch in batches:
        assert batch, "no empty batch"
        assert len(batch) * max(max(src[i], 1) for i in batch) <= max_tokens
        if tgt is not None:
            assert len(batch) * max(max(tgt[i], 1) for i in batch) <= max_tokens
        if max_sentences is not None:
            assert len(batch) <= max_sentences


def random_lengths(n, seed=0, low=1, high=60):
    rng = np.random.default_rng(seed)
    src = rng.integers(low, high, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), low, None)
    return src.tolist(), tgt.tolist()


@pytest.fixture(scope="module")
def multi30k_lengths():
    if not MULTI30K.exists():
        pytest.skip(f"real-data test: {MULTI30K} not found")
    with gzip.open(MULTI30K / "train.en.gz", "rt", encoding="utf-8") as en:
        src = [len(line.split()) for line in en.read().splitlines()]
    with gzip.open(MULTI30K / "train.de.gz", "rt", encoding="utf-8") as de:
        tgt = [len(line.split()) + 1 for line in de.read().splitlines()]
    return src, tgt


# ------------------------------------------------------------------ token_batches
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_batch_respects_the_padded_token_budget_on_both_sides(shuffle):
    src, tgt = random_lengths(2000)
    batches = token_batches(src, tgt, max_tokens=500, shuffle=shuffle, seed=3, epoch=1)
    assert_valid_batches(batches, src, tgt, 500)


def test_max_sentences_caps_the_batch_size():
    src, tgt = random_lengths(500, low=1, high=4)
    batches = token_batches(src, tgt, max_tokens=1000, max_sentences=16)
    assert_valid_batches(batches, src, tgt, 1000, max_sentences=16)
    assert max(len(b) for b in batches) == 16


def test_source_only_batches_ignore_targets():
    src, _ = random_lengths(300)
    batches = token_batches(src, None, max_tokens=256)
    assert_valid_batches(batches, src, None, 256)


def test_batches_are_reproducible_from_seed_and_epoch():
    src, tgt = random_lengths(1000)
    first = token_batches(src, tgt, 400, seed=7, epoch=2)
    assert token_batches(src, tgt, 400, seed=7, epoch=2) == first
    assert token_batches(src, tgt, 400, seed=7, epoch=3) != first
    assert token_batches(src, tgt, 400, seed=8, epoch=2) != first


def test_without_shuffle_batches_come_sorted_by_length():
    src, tgt = random_lengths(1000)
    batches = token_batches(src, tgt, 400, shuffle=False)
    assert token_batches(src, tgt, 400, shuffle=False, epoch=5) == batches
    longest = [max(src[i] for i in batch) for batch in batches]
    assert longest == sorted(longest)


def test_example_too_long_for_the_budget_raises_naming_it():
    src, tgt = [3, 5, 4, 9], [3, 5, 12, 4]
    with pytest.raises(ValueError, match=r"example 2 has 4 source / 12 target tokens.*max_tokens=10"):
        token_batches(src, tgt, max_tokens=10)
    with pytest.raises(ValueError, match=r"example 3 has 9 source tokens"):
        token_batches([1, 2, 3, 9], None, max_tokens=8)


@pytest.mark.parametrize(
    ("src", "tgt", "max_tokens", "match"),
    [
        ([1, 2], [1], 10, "entries"),
        ([1, -2], None, 10, "negative"),
        ([1, 2], None, 0, "max_tokens"),
        ([[1, 2]], None, 10, "1-D"),
    ],
)
def test_bad_arguments_are_rejected(src, tgt, max_tokens, match):
    with pytest.raises(ValueError, match=match):
        token_batches(src, tgt, max_tokens)


def test_empty_and_zero_length_inputs():
    assert token_batches([], [], 100) == []
    batches = token_batches([0] * 10, [0] * 10, max_tokens=4)  # an empty sequence still takes a row
    assert_valid_batches(batches, [0] * 10, [0] * 10, 4)


@given(
    lengths=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=200),
    max_tokens=st.integers(50, 400),
    max_sentences=st.none() | st.integers(1, 20),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 100),
)
@settings(max_examples=150, deadline=None)
def test_property_budget_respected_and_every_index_exactly_once(
    lengths, max_tokens, max_sentences, shuffle, seed, epoch
):
    src = [s for s, _ in lengths]
    tgt = [t for _, t in lengths]
    batches = token_batches(src, tgt, max_tokens, shuffle, seed, epoch, max_sentences)
    assert_valid_batches(batches, src, tgt, max_tokens, max_sentences)


def test_bucketed_batches_pad_far_less_than_random_ones_on_multi30k(multi30k_lengths):
    src, tgt = multi30k_lengths
    batches = token_batches(src, tgt, max_tokens=2048, seed=0, epoch=0)
    assert_valid_batches(batches, src, tgt, 2048)
    size = round(len(src) / len(batches))  # random batches of the same mean number of sentences
    order = np.random.default_rng(0).permutation(len(src)).tolist()
    random_batches = [order[i : i + size] for i in range(0, len(order), size)]
    bucketed = padding_fraction(batches, src), padding_fraction(batches, tgt)
    random = padding_fraction(random_batches, src), padding_fraction(random_batches, tgt)
    print(f"padding fraction src/tgt: bucketed {bucketed[0]:.3f}/{bucketed[1]:.3f}", end=", ")
    print(f"random {random[0]:.3f}/{random[1]:.3f}")
    assert bucketed[0] < 0.05 and bucketed[1] < 0.25
    assert bucketed[0] < random[0] / 4 and bucketed[1] < random[1] / 2


def test_padding_fraction_counts_padded_positions():
    assert padding_fraction([[0, 1], [2]], [2, 4, 3]) == pytest.approx(1 - 9 / 11)
    assert padding_fraction([], []) == 0.0


# ------------------------------------------------------------------ padding
def test_pad_batch_right_pads_lists_and_tensors():
    expected = torch.tensor([[5, 6, 7], [8, 0, 0], [0, 0, 0]])
    assert torch.equal(pad_batch([[5, 6, 7], [8], []]), expected)
    assert torch.equal(pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([])]), expected)
    assert torch.equal(pad_batch([[1], [2, 3]], pad_id=9), torch.tensor([[1, 9], [2, 3]]))
    assert pad_batch([[1, 2]], dtype=torch.int32).dtype == torch.int32
    assert pad_batch([]).shape == (0, 0)


def test_translation_batch_places_bos_eos_and_padding():
    batch = make_translation_batch(
        [[10, 11, 12], [13]], [[20, 21], [22, 23, 24]], bos_id=1, eos_id=2, pad_id=0
    )
    assert isinstance(batch, TranslationBatch)
    assert torch.equal(batch.src, torch.tensor([[10, 11, 12], [13, 0, 0]]))
    assert torch.equal(batch.tgt_in, torch.tensor([[1, 20, 21, 0], [1, 22, 23, 24]]))
    assert torch.equal(batch.tgt_out, torch.tensor([[20, 21, 2, 0], [22, 23, 24, 2]]))
    assert batch.tgt_in.shape == batch.tgt_out.shape
    assert batch.n_src_tokens == 4 and batch.n_tgt_tokens == 7 == int((batch.tgt_out != 0).sum())
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.n_tgt_tokens == 7
    with pytest.raises(ValueError, match="targets"):
        make_translation_batch([[1]], [], 1, 2, 0)


def test_classification_batch_pads_ids_and_stacks_labels():
    batch = make_classification_batch([[7, 8], [9]], [1, 0], pad_id=0)
    assert isinstance(batch, ClassificationBatch)
    assert torch.equal(batch.ids, torch.tensor([[7, 8], [9, 0]]))
    assert torch.equal(batch.labels, torch.tensor([1, 0])) and batch.labels.dtype == torch.long
    with pytest.raises(ValueError, match="labels"):
        make_classification_batch([[1]], [0, 1])


# ------------------------------------------------------------------ language models
def test_lm_windows_are_shifted_by_one_and_reproducible():
    stream = torch.arange(100, 1100)
    x, y = lm_windows(stream, block_size=16, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # the stream is consecutive numbers, so y is x's next token
    x2, _ = lm_windows(stream, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_lm_windows_reach_both_ends_of_the_stream():
    stream = torch.arange(10)
    starts = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = lm_windows(stream.tolist(), block_size=4, batch_size=8, generator=generator)
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= 9
    assert starts == set(range(6))
    with pytest.raises(ValueError, match="no window"):
        lm_windows(torch.arange(4), 4, 1, generator)


@pytest.mark.parametrize(
    ("length", "block", "batch_size"), [(101, 10, 3), (100, 10, 4), (11, 10, 1), (5, 10, 2)]
)
def test_lm_eval_windows_predict_every_token_but_the_first_exactly_once(length, block, batch_size):
    stream = torch.arange(length)
    targets = []
    for x, y in lm_eval_windows(stream, block, batch_size):
        assert x.shape == y.shape and x.dim() == 2 and x.size(0) <= batch_size and x.size(1) <= block
        assert torch.equal(y, x + 1)
        targets += y.flatten().tolist()
    assert targets == list(range(1, length))
