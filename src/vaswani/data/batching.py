"""Batching: batches by token count with length bucketing (§5.1), padding, and language-model windows.

§5.1 of the paper: "Sentence pairs were batched together by approximate sequence length. Each training batch
contained a set of sentence pairs containing approximately 25000 source tokens and 25000 target tokens."
`token_batches` does this the way fairseq's `max_tokens` does: examples sorted by length are cut into
batches whose PADDED size (rows x longest row) stays within the budget on both sides, since the padded
tensor is what the memory holds. Sorting keeps similar lengths together, so little of that is padding.

Tensors are right-padded (real tokens first), the convention of `vaswani.models`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor


# ------------------------------------------------------------------ batching
def token_batches(
    src_lengths: Sequence[int],
    tgt_lengths: Sequence[int] | None,
    max_tokens: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    max_sentences: int | None = None,
) -> list[list[int]]:
    """Example indices grouped into batches of about `max_tokens` tokens per side (§5.1).

    Every batch satisfies len(batch) * max(src length in batch) <= max_tokens, and the same for the target
    when `tgt_lengths` is given (None for single-sequence tasks), and holds at most `max_sentences`
    examples. Pass the lengths the tensors will have: for a target shifted by `make_translation_batch`
    that is len(target) + 1 (BOS + target, target + EOS). An empty sequence counts as length 1, because it
    still takes a row. Every index appears in exactly one batch.

    Examples are sorted by source length, then target length, and cut greedily. With `shuffle`, ties in
    length are broken at random and the order of the batches is shuffled, both from (seed, epoch): each epoch
    sees the batches in another order, and any epoch can be reproduced exactly (for resumed training).
    Without `shuffle`, ties keep index order and batches come shortest first.

    An example that alone exceeds `max_tokens` raises ValueError naming it, rather than being put in an
    over-budget batch (which could run out of memory far into training) or dropped silently (which would
    change the data set): filter such examples out beforehand, or raise the budget.
    """
    src = _lengths_array(src_lengths, "src_lengths")
    tgt = None if tgt_lengths is None else _lengths_array(tgt_lengths, "tgt_lengths")
    if tgt is not None and tgt.shape != src.shape:
        raise ValueError(f"src_lengths has {src.size} entries but tgt_lengths has {tgt.size}")
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens!r} must be a positive integer")
    if max_sentences is not None and (not isinstance(max_sentences, (int, np.integer)) or max_sentences <= 0):
        raise ValueError(f"max_sentences={max_sentences!r} must be None or a positive integer")
    for name, value in (("seed", seed), ("epoch", epoch)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")

    src_cost = np.maximum(src, 1)
    tgt_cost = src_cost if tgt is None else np.maximum(tgt, 1)
    too_long = np.flatnonzero(np.maximum(src_cost, tgt_cost) > max_tokens)
    if too_long.size:
        i = int(too_long[0])
        sizes = f"{src[i]} source" + ("" if tgt is None else f" / {tgt[i]} target")
        raise ValueError(
            f"example {i} has {sizes} tokens, more than max_tokens={max_tokens} on its own "
            f"({too_long.size} example(s) too long): filter them out or raise max_tokens"
        )

    rng = np.random.default_rng([int(seed), int(epoch)])
    keys = [src] if tgt is None else [tgt, src]  # np.lexsort sorts by the last key first
    if shuffle:
        keys.insert(0, rng.permutation(src.size))
    order = np.lexsort(keys) if src.size else np.zeros(0, dtype=np.int64)

    batches: list[list[int]] = []
    batch: list[int] = []
    longest_src = longest_tgt = 0
    limit = max_sentences or src.size
    for i, s, t in zip(order.tolist(), src_cost[order].tolist(), tgt_cost[order].tolist(), strict=True):
        new_src, new_tgt, rows = max(longest_src, s), max(longest_tgt, t), len(batch) + 1
        if batch and (rows * new_src > max_tokens or rows * new_tgt > max_tokens or rows > limit):
            batches.append(batch)
            batch, new_src, new_tgt = [], s, t
        batch.append(i)
        longest_src, longest_tgt = new_src, new_tgt
    if batch:
        batches.append(batch)

    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches)).tolist()]
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded positions (rows x longest row, summed over batches) that are padding.

    A measure of how well batches are bucketed: what `token_batches` keeps low.
    """
    lengths_array = np.asarray(lengths, dtype=np.int64)
    padded = real = 0
    for batch in batches:
        batch_lengths = lengths_array[np.asarray(batch, dtype=np.int64)]
        if batch_lengths.size:
            padded += int(batch_lengths.max()) * batch_lengths.size
            real += int(batch_lengths.sum())
    return 0.0 if padded == 0 else 1.0 - real / padded


def _lengths_array(lengths: Sequence[int], name: str) -> np.ndarray:
    array = np.asarray(lengths)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of integers")
    if array.size and array.min() < 0:
        raise ValueError(f"{name}[{int(array.argmin())}]={int(array.min())}: lengths cannot be negative")
    return array.astype(np.int64)


# ------------------------------------------------------------------ padding
def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0, dtype: torch.dtype = torch.long) -> Tensor:
    """(B, max_len) tensor of `sequences`, right-padded with `pad_id`; rows may be lists or 1-D tensors."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if len(sequences) else 0
    out = torch.full((len(sequences), width), pad_id, dtype=dtype)
    if width:
        if all(isinstance(s, Tensor) for s in sequences):
            flat = torch.cat([s.reshape(-1).to(dtype) for s in sequences])
        else:  # one conversion of all ids at once is much faster than a tensor per row
            flat = torch.tensor(list(chain.from_iterable(sequences)), dtype=dtype)
        out[torch.arange(width) < lengths[:, None]] = flat
    return out


@dataclass
class TranslationBatch:
    """A padded batch of sentence pairs for teacher forcing.

    src (B, S): source ids as given. tgt_in (B, T): BOS + target, the decoder input. tgt_out (B, T): target +
    EOS, what each decoder position must predict. n_src_tokens and n_tgt_tokens count real tokens (no
    padding) of src and of tgt_out, the number a per-token loss is averaged over.
    """

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_src_tokens: int
    n_tgt_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TranslationBatch:
        """A copy with the tensors on `device`."""
        return TranslationBatch(
            self.src.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.n_src_tokens,
            self.n_tgt_tokens,
        )


def make_translation_batch(
    src_ids: list[list[int]], tgt_ids: list[list[int]], bos_id: int, eos_id: int, pad_id: int
) -> TranslationBatch:
    """Pad sources as they are, and build the shifted decoder input (BOS + target) and output (target + EOS).

    No EOS is added to the source: whether sources carry one is the caller's choice (fairseq appends one;
    the paper does not say).
    """
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
    tgt_in = pad_batch([[bos_id, *t] for t in tgt_ids], pad_id)
    tgt_out = pad_batch([[*t, eos_id] for t in tgt_ids], pad_id)
    return TranslationBatch(
        src=pad_batch(src_ids, pad_id),
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        n_src_tokens=sum(len(s) for s in src_ids),
        n_tgt_tokens=sum(len(t) + 1 for t in tgt_ids),
    )


@dataclass
class ClassificationBatch:
    """ids (B, S), right-padded, and labels (B,); with fine classes (a classifier's `fine_to_class`), also
    fine_labels (B,), and a label may be -1 (an example with a fine class but no class). The [CLS] token is
    not here: the classifier prepends it."""

    ids: Tensor
    labels: Tensor
    fine_labels: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ClassificationBatch:
        """A copy with the tensors on `device`."""
        fine = None if self.fine_labels is None else self.fine_labels.to(device, non_blocking=non_blocking)
        return ClassificationBatch(
            self.ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            fine,
        )


def make_classification_batch(
    ids_list: Sequence[Sequence[int]],
    labels: Sequence[int],
    pad_id: int = 0,
    fine_labels: Sequence[int] | None = None,
) -> ClassificationBatch:
    """Pad token ids and stack labels (and fine labels) into a `ClassificationBatch`."""
    if len(ids_list) != len(labels):
        raise ValueError(f"{len(ids_list)} sequences but {len(labels)} labels")
    if fine_labels is not None and len(fine_labels) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(fine_labels)} fine labels")
    fine = None if fine_labels is None else torch.as_tensor(fine_labels, dtype=torch.long)
    return ClassificationBatch(pad_batch(ids_list, pad_id), torch.as_tensor(labels, dtype=torch.long), fine)


# ------------------------------------------------------------------ language models
def _stream(ids: Sequence[int] | Tensor, block_size: int) -> Tensor:
    stream = torch.as_tensor(ids)
    if stream.dim() != 1:
        raise ValueError(f"the token stream must be 1-D, got shape {tuple(stream.shape)}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    return stream


def lm_windows(
    ids: Sequence[int] | Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """`batch_size` random windows of a long token stream, nanoGPT-style: x (B, block_size) and the next
    tokens y (B, block_size), y[:, j] = ids[start + j + 1] for x[:, j] = ids[start + j].

    Starts are uniform over every position with a full window and its target, drawn from `generator` (a CPU
    generator; the windows are gathered on the device of `ids`). Pass `ids` as a tensor made once: a Python
    list would be converted on every call.
    """
    stream = _stream(ids, block_size)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if stream.numel() <= block_size:
        raise ValueError(f"a stream of {stream.numel()} tokens has no window of {block_size} + 1 tokens")
    starts = torch.randint(stream.numel() - block_size, (batch_size,), generator=generator)
    positions = (starts[:, None] + torch.arange(block_size + 1)).to(stream.device)
    window = stream[positions].long()
    return window[:, :-1], window[:, 1:]


def lm_eval_windows(
    ids: Sequence[int] | Tensor, block_size: int, batch_size: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows covering the stream once, for evaluation: (x, y) batches of up to
    `batch_size` full windows of `block_size`, then one last shorter window (1, r) if tokens remain.

    Every token but the first is a target exactly once, so summing the loss over all yielded targets and
    dividing by len(ids) - 1 gives the per-token loss of the whole stream. Each window starts without
    context, so this is a little pessimistic next to a sliding window; it is cheaper and deterministic.
    """
    stream = _stream(ids, block_size)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    n_targets = stream.numel() - 1
    if n_targets < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens has nothing to predict")
    n_full = n_targets // block_size
    end = n_full * block_size
    x_full = stream[:end].long().view(n_full, block_size)
    y_full = stream[1 : end + 1].long().view(n_full, block_size)
    for i in range(0, n_full, batch_size):
        yield x_full[i : i + batch_size], y_full[i : i + batch_size]
    if end < n_targets:
        yield stream[end:n_targets].long()[None], stream[end + 1 :].long()[None]
