"""Model FLOPs, counted from the configuration, cross-checked with torch.utils.flop_counter, and the
machine's measured matmul peak.

Only matrix multiplications are counted (2 FLOPs per multiply-add), as in the "6·N" rule of thumb and
the MFU of PaLM (Chowdhery et al., 2022, App. B): embeddings lookups, softmax, LayerNorm, dropout and the
optimizer are left out. Attention counts the full QK^T and AV products, also for causal self-attention
(as FlopCounterMode does). A training step is forward + backward = 3 × forward: every matmul's backward is
two matmuls of the same size (the gradient of its input and of its weight), and the input gradient of
the first layer is computed too because the embeddings are trained.

Per encoder layer over B sentences of S tokens, d = d_model, f = d_ff:
    2·B·S·(3d² + d² + 2·d·f)            W^Q, W^K, W^V, W^O and the feed-forward network
  + 2·2·B·S²·d                          QK^T and AV over all heads
Per decoder layer over T target tokens:
    2·B·T·(3d² + d² + d² + d² + 2·d·f)  self-attention projections, cross-attention W^Q and W^O, FFN
  + 2·B·S·2d²                           cross-attention W^K, W^V of the encoder output
  + 2·2·B·T²·d + 2·2·B·T·S·d            self- and cross-attention products
Output projection: 2·B·T·d·V.

Incremental (KV-cache) decoding of N tokens encodes once, projects the cross-attention keys and values
once, then at step i (1-based) runs the decoder on one token per row with i keys of self-attention and
S keys of cross-attention, and the output projection. That algorithm's count is the "model FLOPs" of
decoding for every implementation; one that recomputes the prefix (nn.Transformer's loop) does more
work, which FlopCounterMode shows and the achieved model FLOP/s reflect.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vaswani.config import TransformerConfig


def encoder_layer_flops(cfg: TransformerConfig, batch: int, src_len: int) -> int:
    d, f, b, s = cfg.d_model, cfg.d_ff, batch, src_len
    return 2 * b * s * (4 * d * d + 2 * d * f) + 4 * b * s * s * d


def decoder_layer_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> int:
    d, f, b, s, t = cfg.d_model, cfg.d_ff, batch, src_len, tgt_len
    projections = 2 * b * t * (6 * d * d + 2 * d * f) + 2 * b * s * 2 * d * d
    return projections + 4 * b * t * t * d + 4 * b * t * s * d


def forward_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> int:
    """Matmul FLOPs of one forward pass of the encoder-decoder over (batch, src_len) and (batch, tgt_len)."""
    return (
        cfg.n_encoder_layers * encoder_layer_flops(cfg, batch, src_len)
        + cfg.n_decoder_layers * decoder_layer_flops(cfg, batch, src_len, tgt_len)
        + 2 * batch * tgt_len * cfg.d_model * cfg.target_vocab_size
    )


def train_step_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> int:
    """Matmul FLOPs of a training step (forward and backward): 3 × forward."""
    return 3 * forward_flops(cfg, batch, src_len, tgt_len)


def decode_flops(
    cfg: TransformerConfig, batch: int, src_len: int, new_tokens: int, beam_size: int = 1
) -> int:
    """Matmul FLOPs of KV-cache decoding of `new_tokens` tokens for `batch` sentences of `src_len` tokens.

    The encoder runs once on the batch, and the cross-attention keys and values are projected once per
    sentence (the beams of a sentence share them); the decoder runs on batch × beam_size rows. An
    implementation that repeats the encoder output for every beam (Hugging Face) does more work than this.
    """
    d, f, s, n = cfg.d_model, cfg.d_ff, src_len, new_tokens
    rows = batch * beam_size
    total = cfg.n_encoder_layers * encoder_layer_flops(cfg, batch, src_len)
    total += cfg.n_decoder_layers * 2 * batch * s * 2 * d * d
    keys = n * (n + 1) // 2  # self-attention keys summed over the steps: 1 + 2 + ... + n
    per_token = 2 * (6 * d * d + 2 * d * f)
    total += cfg.n_decoder_layers * (rows * n * per_token + 4 * rows * keys * d + 4 * rows * n * s * d)
    total += rows * n * 2 * d * cfg.target_vocab_size
    return total


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running `fn` as torch.utils.flop_counter.FlopCounterMode counts them.

    scaled_dot_product_attention runs on its math backend meanwhile: it decomposes into matmuls that the
    counter sees (the CPU's fused kernel is not in its table), and counts no recomputation in the backward
    pass (FlashAttention's backward recomputes QK^T, which is hardware work, not model work).
    """
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        fn()
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, warmup: int = 2, repeats: int = 5) -> dict:
    """The machine's measured matmul rate: the median time of an (n × n) @ (n × n) product, in FLOP/s."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"n": n, "seconds": seconds, "flops_per_s": 2 * n**3 / seconds}
