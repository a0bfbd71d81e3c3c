"""The blocks the models are stacked from: position-wise feed-forward networks (§3.3), embeddings (§3.4),
positional encodings (§3.5), encoder and decoder layers with residual connections and LayerNorm (§3.1), and
the encoder and decoder stacks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vaswani.attention import KVCache, MultiHeadAttention
from vaswani.config import TransformerConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class FeedForward(nn.Module):
    """Position-wise feed-forward network, §3.3, Eq. 2: FFN(x) = max(0, x W1 + b1) W2 + b2.

    The activation is ReLU in the paper; GELU and SiLU are options (BERT, later models).
    """

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def sinusoidal_table(max_len: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """The sinusoidal positional encodings of §3.5 for positions 0..max_len-1, shape (max_len, d_model).

    PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
    `layout="interleaved"` places them as the equation does (sin, cos, sin, cos, ...); `layout="concat"` puts
    all sines first and all cosines after ([sin | cos]), the layout of Marian and tensor2tensor, with the same
    frequencies. (fairseq's table is also [sin | cos] but divides by half_dim - 1 instead of half_dim.)
    """
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angles = position * inv_freq  # (max_len, d_model / 2)
    if layout == "interleaved":
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)
    elif layout == "concat":
        table = torch.cat((angles.sin(), angles.cos()), dim=-1)
    else:
        raise ValueError(f"sinusoidal layout {layout!r} must be 'interleaved' or 'concat'")
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positional encodings, §3.5, looked up by position index."""

    def __init__(self, max_len: int, d_model: int, layout: str = "interleaved") -> None:
        super().__init__()
        # Not saved in checkpoints: it is a function of the config.
        self.register_buffer("table", sinusoidal_table(max_len, d_model, layout), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


class LearnedPositionalEmbedding(nn.Module):
    """Learned position embeddings (the paper's variant in Table 3, row E; BERT's choice)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions]


def make_token_embedding(vocab_size: int, d_model: int, pad_id: int) -> nn.Embedding:
    """Token embedding with N(0, d_model^-0.5) init and a zero, never-updated padding row.

    With the sqrt(d_model) scale of §3.4 the embedded tokens then have unit variance, the same scale as the
    positional encodings they are added to.
    """
    embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
    nn.init.normal_(embedding.weight, mean=0.0, std=d_model**-0.5)
    with torch.no_grad():
        embedding.weight[pad_id].zero_()
    return embedding


class Embeddings(nn.Module):
    """Token embeddings scaled by sqrt(d_model) (§3.4) plus positional encodings (§3.5), then dropout
    (§5.4: "we apply dropout to the sums of the embeddings and the positional encodings").

    `tokens` may be shared with another Embeddings (source and target) and with the output projection.
    Imported BERT-family models add token-type embeddings (`type_vocab_size`) and a LayerNorm on the sum
    (`embedding_norm`); both are off by default.
    """

    def __init__(self, cfg: TransformerConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.max_len = cfg.max_len
        if cfg.positional == "learned":
            self.positions: nn.Module = LearnedPositionalEmbedding(cfg.max_len, cfg.d_model)
        else:
            layout = "concat" if cfg.positional == "sinusoidal_concat" else "interleaved"
            self.positions = SinusoidalPositionalEncoding(cfg.max_len, cfg.d_model, layout)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        if self.token_types is not None:
            nn.init.normal_(self.token_types.weight, mean=0.0, std=cfg.d_model**-0.5)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, positions: Tensor, token_types: Tensor | None = None) -> Tensor:
        """ids (B, T); positions (T,) or (B, T), each < max_len; token_types (B, T) or None (all type 0),
        only for a model with token-type embeddings."""
        x = self.tokens(ids) * self.scale + self.positions(positions)
        if self.token_types is not None:
            # BERT adds type 0 to every token of a single-segment input: its row is part of the embedding.
            x = x + (self.token_types.weight[0] if token_types is None else self.token_types(token_types))
        elif token_types is not None:
            raise ValueError("token_types given, but this model has no token-type embeddings")
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class _Sublayer(nn.Module):
    """Residual connection around a sub-layer with LayerNorm (§3.1) and residual dropout (§5.4).

    Post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x))). Pre-LN: x + Dropout(Sublayer(LayerNorm(x))),
    which trains deep stacks without warm-up but needs a final LayerNorm after the stack.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, fn) -> tuple[Tensor, Tensor | None]:
        if self.norm_first:
            out, weights = fn(self.norm(x))
            return x + self.dropout(out), weights
        out, weights = fn(x)
        return self.norm(x + self.dropout(out)), weights


def _attention(cfg: TransformerConfig) -> MultiHeadAttention:
    return MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cfg.bias, cfg.attention_impl)


class EncoderLayer(nn.Module):
    """One encoder layer, §3.1: multi-head self-attention, then a position-wise feed-forward network."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = _attention(cfg)
        self.feed_forward = FeedForward(
            cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout, cfg.bias
        )
        self.attn_block = _Sublayer(cfg)
        self.ff_block = _Sublayer(cfg)

    def forward(
        self, x: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        x, weights = self.attn_block(x, lambda h: self.self_attn(h, mask=mask, need_weights=need_weights))
        x, _ = self.ff_block(x, lambda h: (self.feed_forward(h), None))
        return x, weights


class DecoderLayer(nn.Module):
    """One decoder layer, §3.1: masked multi-head self-attention, multi-head attention over the encoder
    output (left out in a decoder-only language model), then a position-wise feed-forward network."""

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = True) -> None:
        super().__init__()
        self.self_attn = _attention(cfg)
        self.self_block = _Sublayer(cfg)
        self.cross_attn = _attention(cfg) if cross_attention else None
        self.cross_block = _Sublayer(cfg) if cross_attention else None
        self.feed_forward = FeedForward(
            cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout, cfg.bias
        )
        self.ff_block = _Sublayer(cfg)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        self_mask: Tensor | None = None,
        is_causal: bool = True,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, self_weights = self.self_block(
            x,
            lambda h: self.self_attn(
                h, mask=self_mask, is_causal=is_causal, cache=self_cache, need_weights=need_weights
            ),
        )
        cross_weights = None
        if self.cross_attn is not None:
            x, cross_weights = self.cross_block(
                x,
                lambda h: self.cross_attn(
                    h, memory, mask=memory_mask, cache=cross_cache, need_weights=need_weights
                ),
            )
        x, _ = self.ff_block(x, lambda h: (self.feed_forward(h), None))
        return x, self_weights, cross_weights


class Encoder(nn.Module):
    """The encoder stack, §3.1: N identical layers (plus a final LayerNorm when pre-LN)."""

    def __init__(self, cfg: TransformerConfig, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(
        self, x: Tensor, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        weights = []
        for layer in self.layers:
            x, w = layer(x, mask, need_weights)
            if need_weights:
                weights.append(w)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, weights


class DecoderCache:
    """Everything a decoder keeps between incremental decoding steps (fairseq's "incremental state"):
    per layer, a growing self-attention KVCache and a static cross-attention KVCache."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.self_attn = [KVCache(capacity) for _ in range(n_layers)]
        self.cross_attn = [KVCache() for _ in range(n_layers)]
        # Counted here, not read off a layer's cache: a decoder may have no layers.
        self.length = 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` of the self-attention state, as beam search asks after each step.

        The cross-attention caches are left alone: beam search only moves hypotheses among the beams of the
        same source sentence, whose encoder keys and values are identical.
        """
        for cache in self.self_attn:
            cache.reorder(index)


class Decoder(nn.Module):
    """The decoder stack, §3.1: N identical layers (plus a final LayerNorm when pre-LN)."""

    def __init__(self, cfg: TransformerConfig, n_layers: int, cross_attention: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, cross_attention) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        self_mask: Tensor | None = None,
        is_causal: bool = True,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        if cache is not None and cache.length + x.size(1) > cache.capacity:
            raise ValueError(
                f"decoder cache holds {cache.capacity} positions; cannot add {x.size(1)} to {cache.length}"
            )
        self_weights, cross_weights = [], []
        for i, layer in enumerate(self.layers):
            x, sw, cw = layer(
                x,
                memory,
                memory_mask,
                self_mask,
                is_causal,
                self_cache=cache.self_attn[i] if cache is not None else None,
                cross_cache=cache.cross_attn[i] if cache is not None else None,
                need_weights=need_weights,
            )
            if need_weights:
                self_weights.append(sw)
                if cw is not None:
                    cross_weights.append(cw)
        if cache is not None:
            cache.length += x.size(1)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, self_weights, cross_weights
