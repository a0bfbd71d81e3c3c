"""Attention, §3.2 of the paper: scaled dot-product attention (§3.2.1, Eq. 1) and multi-head attention
(§3.2.2), the masks that restrict it, and the key/value cache used for incremental decoding.

Mask convention, everywhere inside the library: a boolean tensor broadcastable to
(batch, heads, query_len, key_len) where True means "this query may attend to this key". Other conventions
(PyTorch's `key_padding_mask` with True = ignore, Hugging Face's 0/1 attention masks) are converted at the
boundaries that receive them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.config import ATTENTION_IMPLS


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> Tensor:
    """(query_len, key_len) mask where query i may attend keys 0..key_len - query_len + i (§3.2.3).

    The queries are the last `query_len` positions of the key sequence, which is what incremental decoding
    needs when earlier keys come from a cache.
    """
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=key_len - query_len)


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(batch, 1, 1, len) mask that lets every query attend to the real (non-pad) tokens of `ids`."""
    return (ids != pad_id)[:, None, None, :]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    impl: str = "sdpa",
) -> tuple[Tensor, Tensor | None]:
    """Attention(Q, K, V) = softmax(QK^T / sqrt(d_k)) V  (§3.2.1, Eq. 1).

    query (B, H, Tq, d_k), key (B, H, Tk, d_k), value (B, H, Tk, d_v); `mask` boolean, True = may attend,
    broadcastable to (B, H, Tq, Tk); `is_causal` adds the causal mask aligned to the end of the keys.
    Returns the output (B, H, Tq, d_v) and, when `need_weights`, the attention probabilities (B, H, Tq, Tk).

    A query that may attend to no key at all (a source row that is all padding) gets an all-zero output and
    all-zero weights, in every dtype, forward and backward. A plain softmax over a row of -inf is NaN
    (torch.nn.MultiheadAttention returns NaN there); such rows are opened to every key so the kernels see
    finite numbers, and their output is zeroed afterwards.

    `impl="sdpa"` runs torch.nn.functional.scaled_dot_product_attention (FlashAttention or memory-efficient
    kernels on a GPU, a fused kernel on CPU); `impl="explicit"` writes the equation out. Weights can only come
    from the explicit path, so `need_weights=True` always takes it.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} must be one of {ATTENTION_IMPLS}")
    query_len, key_len = query.size(-2), key.size(-2)
    if is_causal and query_len == 1:
        is_causal = False  # the newest position may attend to every key there is
    if is_causal and (mask is not None or query_len != key_len or need_weights or impl == "explicit"):
        causal = causal_mask(query_len, key_len, query.device)
        mask = causal if mask is None else mask & causal
        is_causal = False

    has_key = None
    if mask is not None:
        has_key = mask.any(dim=-1, keepdim=True)
        mask = mask | ~has_key

    weights = None
    if impl == "sdpa" and not need_weights:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )
    else:
        scores = torch.matmul(query, key.transpose(-2, -1)) * query.size(-1) ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # fp16/bf16 softmax loses mass on long rows; compute it in fp32 and return to the input dtype.
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        if has_key is not None:
            weights = weights.masked_fill(~has_key, 0.0)
        out = torch.matmul(F.dropout(weights, dropout_p) if dropout_p > 0 else weights, value)
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)
    return out, weights


class KVCache:
    """Keys and values of one attention layer, kept between decoding steps (incremental decoding).

    A growing cache (self-attention) preallocates `capacity` positions on the first `append` and writes each
    step's keys and values in place, so that a step costs no concatenation of the whole history. A static
    cache (`capacity=None`, cross-attention) holds the projected encoder output, computed once.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0
        self._spare: tuple[Tensor, Tensor] | None = None  # the second buffer of a growing cache's reorder

    @property
    def is_empty(self) -> bool:
        return self.keys is None

    def set_static(self, keys: Tensor, values: Tensor) -> None:
        self.keys, self.values, self.length = keys, values, keys.size(-2)

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, t, d) keys and values; return all keys and values so far."""
        if self.capacity is None:
            raise RuntimeError(
                "append() on a static KVCache: static caches are filled once with set_static()"
            )
        new = keys.size(-2)
        if self.length + new > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot add {new} to {self.length}")
        if self.keys is None:
            batch, heads, _, dim = keys.shape
            self.keys = keys.new_empty(batch, heads, self.capacity, dim)
            self.values = values.new_empty(batch, heads, self.capacity, values.size(-1))
        self.keys[:, :, self.length : self.length + new] = keys
        self.values[:, :, self.length : self.length + new] = values
        self.length += new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search reorders hypotheses after every step).

        A growing cache copies only its filled positions, into a second buffer that then becomes the
        cache: copying the whole capacity each step would cost beam search more than the step's matmuls
        early in a long decode."""
        if self.keys is None:
            return
        if self.capacity is None:
            self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
            return
        rows, filled = index.numel(), self.length
        if self._spare is None or self._spare[0].size(0) != rows:
            self._spare = (
                self.keys.new_empty(rows, *self.keys.shape[1:]),
                self.values.new_empty(rows, *self.values.shape[1:]),
            )
        spare_keys, spare_values = self._spare
        torch.index_select(self.keys[:, :, :filled], 0, index, out=spare_keys[:, :, :filled])
        torch.index_select(self.values[:, :, :filled], 0, index, out=spare_values[:, :, :filled])
        self._spare = (self.keys, self.values)
        self.keys, self.values = spare_keys, spare_values


class MultiHeadAttention(nn.Module):
    """Multi-head attention, §3.2.2: h parallel heads of scaled dot-product attention (§3.2.1) over learned
    projections of queries, keys and values, concatenated and projected back by W^O.

    The projections W^Q, W^K, W^V are stored stacked in one (3 d_model, d_model) matrix, the layout of
    torch.nn.MultiheadAttention, so self-attention runs one fused matmul and weights copy over directly.
    Cross-attention (§3.2.3, "encoder-decoder attention") projects the query from the decoder and the keys and
    values from the encoder output (`key_value`).
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, impl: str = "sdpa"
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r} must be one of {ATTENTION_IMPLS}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout, self.impl = dropout, impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model)) if bias else None
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform for each of W^Q, W^K, W^V, W^O as its own d_model x d_model matrix; zero biases."""
        for block in self.in_proj_weight.data.chunk(3, dim=0):
            nn.init.xavier_uniform_(block)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """query (B, Tq, d_model); `key_value` (B, Tk, d_model) for cross-attention, None for self-attention.
        Cross-attention also takes `key_value` (B / g, Tk, d_model): rows g*i .. g*i + g - 1 of the query then
        all attend to row i (beam search's g beams of one sentence), with `mask` of B / g rows.

        With a growing `cache` (self-attention), `query` holds only the new positions and the keys/values of
        earlier steps come from the cache. With a static cache (cross-attention), the keys/values of
        `key_value` are projected on the first call and reused afterwards.
        Returns the output (B, Tq, d_model) and the attention weights (B, H, Tq, Tk) when `need_weights`.
        """
        d = self.d_model
        if key_value is None:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            bias_q = bias_kv = None
            if self.in_proj_bias is not None:
                bias_q, bias_kv = self.in_proj_bias[:d], self.in_proj_bias[d:]
            q = self._split_heads(F.linear(query, self.in_proj_weight[:d], bias_q))
            if cache is not None and not cache.is_empty:
                k, v = cache.keys, cache.values
            else:
                k, v = F.linear(key_value, self.in_proj_weight[d:], bias_kv).chunk(2, dim=-1)
                k, v = self._split_heads(k), self._split_heads(v)
                if cache is not None:
                    cache.set_static(k, v)
        rows, group = q.size(0), 1
        if key_value is not None and k.size(0) != rows:
            # Several query rows per memory row (the beams of one source sentence in beam search): the
            # group's queries attend together to their sentence's keys, read once rather than once a beam.
            # Exact because cross-attention masks keys only, the same for every query of the sentence.
            group = rows // k.size(0)
            if group * k.size(0) != rows or (mask is not None and mask.size(0) != k.size(0)):
                raise ValueError(f"{rows} query rows do not group over {k.size(0)} key_value rows")
            heads, length, dim = q.shape[1:]
            q = (
                q.view(k.size(0), group, heads, length, dim)
                .transpose(1, 2)
                .reshape(k.size(0), heads, -1, dim)
            )
        out, weights = scaled_dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            impl=self.impl,
        )
        if group > 1:
            out = (
                out.view(k.size(0), heads, group, length, dim)
                .transpose(1, 2)
                .reshape(rows, heads, length, dim)
            )
            if weights is not None:
                weights = weights.view(k.size(0), heads, group, length, -1).transpose(1, 2)
                weights = weights.reshape(rows, heads, length, -1)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, d)
        return self.out_proj(out), weights
