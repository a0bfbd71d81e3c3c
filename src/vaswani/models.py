"""The three models, built from the same blocks (`vaswani.layers`):

- `Transformer`: the encoder-decoder of the paper (§3, Figure 1), for sequence-to-sequence tasks.
- `TransformerClassifier`: the encoder alone, with a [CLS] token and a classification head (BERT's recipe).
- `TransformerLM`: the decoder alone, without cross-attention (a GPT-style language model).
- `TransformerEncoder`: the encoder alone, returning hidden states (BERT-family encoders, vaswani.hub).

Padding comes from `cfg.pad_id`: inputs are right-padded (real tokens first). Source and classifier inputs
are masked as keys; decoder inputs need no padding mask because causal masking already hides every later
position, padding included, from the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.attention import padding_mask
from vaswani.config import TransformerConfig
from vaswani.generation import DecodingOptions, decode
from vaswani.layers import Decoder, DecoderCache, Embeddings, Encoder, make_token_embedding

# Beam search and greedy decoding of §6.1: the output may be up to 50 tokens longer than the input.
EXTRA_OUTPUT_TOKENS = 50


def _check_length(length: int, cfg: TransformerConfig, what: str) -> None:
    if length > cfg.max_len:
        raise ValueError(f"{what} of {length} tokens is longer than max_len={cfg.max_len}")


def _check_ids(ids: Tensor, vocab_size: int, what: str) -> None:
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError(
            f"{what} must be a (batch, length) integer tensor, got {tuple(ids.shape)} {ids.dtype}"
        )
    # Reading values back is a host sync and a graph break under torch.compile, and a constant baked into
    # a traced (ONNX) graph: check in eager mode only.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not ids.numel():
        return
    # One reduction and one read-back: on a GPU an out-of-range id would otherwise end in a device-side
    # assert that kills the process, so the check is worth its single synchronisation.
    low, high = torch.aminmax(ids)
    if bool((low < 0) | (high >= vocab_size)):
        raise ValueError(f"{what} holds token ids outside the vocabulary [0, {vocab_size})")


@contextmanager
def evaluating(module: nn.Module):
    """Run in eval mode (no dropout: generation, attention maps, benchmarks), then restore the mode."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _banned_ids(cfg: TransformerConfig) -> tuple[int, ...]:
    """Tokens generation never emits: padding and BOS."""
    return tuple(sorted({cfg.pad_id, cfg.bos_id}))


class Transformer(nn.Module):
    """The encoder-decoder Transformer, §3 and Figure 1 of the paper.

    Source and target embeddings and the pre-softmax projection share one matrix when the vocabulary is
    shared (§3.4: "we share the same weight matrix between the two embedding layers and the pre-softmax
    linear transformation"), as configured by `share_embeddings` and `tie_output`.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        src_tokens = make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        if cfg.share_embeddings:
            tgt_tokens = src_tokens
        else:
            tgt_tokens = make_token_embedding(cfg.target_vocab_size, cfg.d_model, cfg.pad_id)
        self.src_embed = Embeddings(cfg, src_tokens)
        self.tgt_embed = Embeddings(cfg, tgt_tokens)
        self.encoder = Encoder(cfg, cfg.n_encoder_layers)
        self.decoder = Decoder(cfg, cfg.n_decoder_layers, cross_attention=True)
        self.output_projection = nn.Linear(cfg.d_model, cfg.target_vocab_size, bias=False)
        if cfg.tie_output:
            self.output_projection.weight = tgt_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=cfg.d_model**-0.5)
        # Marian's fixed logit offsets: a buffer, saved and averaged with the weights but never trained.
        self.final_logits_bias: Tensor | None
        if cfg.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, cfg.target_vocab_size))
        else:
            self.final_logits_bias = None

    def logits(self, hidden: Tensor) -> Tensor:
        """Decoder output (..., d_model) -> logits (..., V): the pre-softmax projection (§3.4)."""
        logits = self.output_projection(hidden)
        return logits if self.final_logits_bias is None else logits + self.final_logits_bias

    def encode(self, src: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
        """src (B, S) -> encoder output (B, S, d_model), its key mask (B, 1, 1, S), encoder attention."""
        _check_ids(src, self.config.vocab_size, "src")
        _check_length(src.size(1), self.config, "source")
        mask = padding_mask(src, self.config.pad_id)
        positions = torch.arange(src.size(1), device=src.device)
        memory, weights = self.encoder(self.src_embed(src, positions), mask, need_weights)
        return memory, mask, weights

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        memory_mask: Tensor | None,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """tgt_in (B, T) -> logits (B, T, V), decoder self-attention, cross-attention.

        `memory_mask` (B, 1, 1, S), True = a real source token; None: every source token is real.
        With a `cache`, `tgt_in` holds only the newest tokens; their positions continue from the cache.
        """
        start = cache.length if cache is not None else 0
        _check_length(start + tgt_in.size(1), self.config, "target")
        positions = torch.arange(start, start + tgt_in.size(1), device=tgt_in.device)
        hidden, self_weights, cross_weights = self.decoder(
            self.tgt_embed(tgt_in, positions),
            memory,
            memory_mask,
            is_causal=True,
            cache=cache,
            need_weights=need_weights,
        )
        return self.logits(hidden), self_weights, cross_weights

    def forward(self, src: Tensor, tgt_in: Tensor, return_attention: bool = False):
        """src (B, S), tgt_in (B, T) (BOS + target, shifted right) -> logits (B, T, V).

        With `return_attention=True` also a dict of attention probabilities, each a list with one
        (B, n_heads, T_query, T_key) tensor per layer: "encoder", "decoder" and "cross".
        """
        _check_ids(tgt_in, self.config.target_vocab_size, "tgt_in")
        memory, memory_mask, enc_weights = self.encode(src, need_weights=return_attention)
        logits, dec_weights, cross_weights = self.decode(
            tgt_in, memory, memory_mask, need_weights=return_attention
        )
        if return_attention:
            return logits, {"encoder": enc_weights, "decoder": dec_weights, "cross": cross_weights}
        return logits

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        length_penalty_kind: str = "gnmt",
        use_cache: bool = True,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Translate src (B, S) -> (B, L) target ids without BOS; a finished row is EOS then padding.

        beam_size 1 is greedy search (or sampling with `do_sample`); beam_size > 1 is beam search ranked by
        log-probability / lp(length) (§6.1: beam 4, alpha 0.6). The default `max_new_tokens` is each
        sentence's source length + 50 (§6.1), capped at max_len. Runs in eval mode, without gradients.
        """
        cfg = self.config
        options = DecodingOptions(
            beam_size, length_penalty, length_penalty_kind, do_sample, temperature, top_k, top_p, generator
        )
        src_lengths = (src != cfg.pad_id).sum(dim=1)
        if max_new_tokens is None:
            limits = (src_lengths + EXTRA_OUTPUT_TOKENS).clamp(max=cfg.max_len)
        else:
            if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
            _check_length(max_new_tokens, cfg, "max_new_tokens")
            limits = torch.full_like(src_lengths, max_new_tokens)
        with evaluating(self):
            memory, memory_mask, _ = self.encode(src)

            def make_stepper(beams: int) -> _EncoderDecoderStepper:
                # The encoder output is not repeated per beam: cross-attention groups a sentence's beams.
                return _EncoderDecoderStepper(
                    self, memory, memory_mask, capacity=int(limits.max()) if use_cache else None
                )

            bos = torch.full((src.size(0), 1), cfg.bos_id, dtype=torch.long, device=src.device)
            return decode(make_stepper, bos, limits, options, cfg.eos_id, cfg.pad_id, _banned_ids(cfg))


class _EncoderDecoderStepper:
    """A `generation.Stepper` over `Transformer.decode`: with a KV cache (capacity given) each step runs the
    decoder on the newest token only; without one, it reruns the decoder on the whole prefix."""

    def __init__(self, model: Transformer, memory: Tensor, memory_mask: Tensor, capacity: int | None) -> None:
        # Sources without padding need no cross-attention mask: dropping it once here spares every step and
        # layer the mask handling and lets SDPA take its unmasked kernel (one check per generate call).
        if bool(memory_mask.all()):
            memory_mask = None
        self.model, self.memory, self.memory_mask = model, memory, memory_mask
        self.cache = DecoderCache(len(model.decoder.layers), capacity) if capacity is not None else None
        self.prefix: Tensor | None = None

    def step(self, tokens: Tensor) -> Tensor:
        if self.cache is not None:
            logits = self.model.decode(tokens, self.memory, self.memory_mask, cache=self.cache)[0]
        else:
            self.prefix = tokens if self.prefix is None else torch.cat((self.prefix, tokens), dim=1)
            logits = self.model.decode(self.prefix, self.memory, self.memory_mask)[0]
        return logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.prefix = self.prefix.index_select(0, index)


def fine_membership(fine_to_class: Sequence[int], n_classes: int) -> Tensor:
    """(n_fine, n_classes) 0/1: row f marks the class of fine class f (none for -1). A matrix to multiply by
    rather than a scatter, so that an exported graph stays plain."""
    membership = torch.zeros(len(fine_to_class), n_classes)
    for fine, cls in enumerate(fine_to_class):
        if cls >= 0:
            membership[fine, cls] = 1.0
    return membership


def combine_heads(logits: Tensor, fine_logits: Tensor, membership: Tensor) -> Tensor:
    """A class head's and a fine head's logits -> the log of the average of their class distributions
    (B, n_classes), in fp32. The fine distribution is summed within each class (`fine_membership`) and
    renormalised over the fine classes that have one."""
    fine = torch.softmax(fine_logits.float(), dim=-1) @ membership.to(torch.float32)
    fine = fine / fine.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(fine.dtype).tiny)
    probs = 0.5 * (torch.softmax(logits.float(), dim=-1) + fine)
    return probs.clamp(min=torch.finfo(probs.dtype).tiny).log()


class TransformerClassifier(nn.Module):
    """The Transformer encoder as a sequence classifier (as in BERT, Devlin et al. 2019).

    A [CLS] token (`cfg.cls_id`, by default `bos_id`) is prepended at position 0; padding is masked as keys;
    a linear head reads the final [CLS] state (`pooling="cls"`), or the mean (`"mean"`) or elementwise
    maximum (`"max"`) of the real token states ([CLS] excluded). Uses `n_encoder_layers`.

    With `cfg.fine_to_class`, a second head reads the same pooled state and predicts the finer classes
    (TREC's 50 under its 6); `forward` then returns the log of the average of the two heads' class
    distributions, the fine one summed within each class (fine classes with no class left out), and
    `head_logits` the two heads' own logits for training.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.n_classes is None:
            raise ValueError("TransformerConfig.n_classes must be set for a TransformerClassifier")
        self.config = cfg
        self.embed = Embeddings(cfg, make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id))
        self.encoder = Encoder(cfg, cfg.n_encoder_layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.fine_head: nn.Linear | None = None
        if cfg.fine_to_class is not None:
            self.fine_head = nn.Linear(cfg.d_model, len(cfg.fine_to_class))
            nn.init.xavier_uniform_(self.fine_head.weight)
            nn.init.zeros_(self.fine_head.bias)
            # Derived from the config: not saved with the weights.
            membership = fine_membership(cfg.fine_to_class, cfg.n_classes)
            self.register_buffer("fine_membership", membership, persistent=False)

    def encode(self, ids: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor, list[Tensor]]:
        """ids (B, S) -> hidden states (B, 1 + S, d_model) with [CLS] first, their mask, attention."""
        cfg = self.config
        _check_ids(ids, cfg.vocab_size, "ids")
        cls = torch.full((ids.size(0), 1), cfg.classifier_cls_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat((cls, ids), dim=1)
        _check_length(ids.size(1), cfg, "input with [CLS]")
        mask = padding_mask(ids, cfg.pad_id)
        positions = torch.arange(ids.size(1), device=ids.device)
        hidden, weights = self.encoder(self.embed(ids, positions), mask, need_weights)
        return hidden, mask, weights

    def forward(self, ids: Tensor, return_attention: bool = False, return_heads: bool = False):
        """ids (B, S) -> class logits (B, n_classes) (log-probabilities with `fine_to_class`); with
        `return_attention`, also {"encoder": [...]} whose tensors are (B, n_heads, 1 + S, 1 + S), [CLS] at
        index 0. `return_heads` (training with fine classes): the class head's logits and the fine head's
        (B, n_fine), or None, instead."""
        logits, fine_logits, weights = self._heads(ids, return_attention)
        if return_heads:
            return logits, fine_logits
        if fine_logits is not None:
            logits = combine_heads(logits, fine_logits, self.fine_membership)
        if return_attention:
            return logits, {"encoder": weights}
        return logits

    def _heads(self, ids: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        hidden, mask, weights = self.encode(ids, need_weights=return_attention)
        pooling = self.config.pooling
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "mean":
            real = mask[:, 0, 0, 1:, None].to(hidden.dtype)
            pooled = (hidden[:, 1:] * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        else:  # max over the real tokens, as the max-over-time pooling of Kim (2014)'s CNN
            real = mask[:, 0, 0, 1:, None]
            pooled = hidden[:, 1:].masked_fill(~real, float("-inf")).amax(dim=1)
            pooled = pooled.masked_fill(~real.any(dim=1), 0.0)  # a row of padding only: no -inf
        pooled = self.dropout(pooled)
        fine_logits = None if self.fine_head is None else self.fine_head(pooled)
        return self.head(pooled), fine_logits, weights


class TransformerEncoder(nn.Module):
    """The encoder stack alone (§3.1), returning its last hidden states: what a BERT-family encoder is.

    No [CLS] is added: `ids` are fed as they are (a BERT tokenizer's "[CLS] ... [SEP]"). Its state dict is
    a `TransformerClassifier`'s without the head, so its weights can start a classifier's fine-tuning.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg, make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id))
        self.encoder = Encoder(cfg, cfg.n_encoder_layers)

    def encode(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor:
        """ids (B, S) -> last hidden states (B, S, d_model).

        `attention_mask` (B, S) is Hugging Face's: 1 (or True) = a real token, 0 = padding; None masks the
        `pad_id` tokens. `token_type_ids` (B, S): segment ids, None = all 0.
        """
        return self._run(ids, attention_mask, token_type_ids, need_weights)[0]

    def _run(self, ids, attention_mask, token_type_ids, need_weights):
        cfg = self.config
        _check_ids(ids, cfg.vocab_size, "ids")
        _check_length(ids.size(1), cfg, "input")
        if attention_mask is None:
            mask = padding_mask(ids, cfg.pad_id)
        else:
            if attention_mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, ids {tuple(ids.shape)}"
                )
            mask = (attention_mask != 0)[:, None, None, :]  # the boundary: HF 1/0 -> True = may attend
        positions = torch.arange(ids.size(1), device=ids.device)
        return self.encoder(self.embed(ids, positions, token_type_ids), mask, need_weights)

    def forward(
        self,
        ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        return_attention: bool = False,
    ):
        """`encode`; with `return_attention`, also {"encoder": [(B, n_heads, S, S) per layer]}."""
        hidden, weights = self._run(ids, attention_mask, token_type_ids, return_attention)
        if return_attention:
            return hidden, {"encoder": weights}
        return hidden


class TransformerMaskedLM(nn.Module):
    """The encoder stack trained by masked language modelling (BERT, Devlin et al. 2019, §3.1 "Task #1"):
    self-supervised pretraining for a classifier, on nothing but text.

    The input is what a `TransformerClassifier` reads: [CLS] (`cfg.cls_id`) is prepended at position 0 and
    padding is masked as keys. Every input position gets a distribution over the vocabulary through the
    token embedding matrix (shared, as §3.4 shares the decoder's) plus a bias. `embed` and `encoder` are
    named as in the classifier, so a classification recipe with `[model] init_from = RUN_DIR` starts from
    them; `mlm_bias` stays behind.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg, make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id))
        self.encoder = Encoder(cfg, cfg.n_encoder_layers)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, ids: Tensor, return_attention: bool = False):
        """ids (B, S) -> logits (B, S, vocab_size) for the S input positions ([CLS] is read, not predicted);
        with `return_attention`, also {"encoder": [...]} whose tensors are (B, n_heads, 1 + S, 1 + S)."""
        cfg = self.config
        _check_ids(ids, cfg.vocab_size, "ids")
        cls = torch.full((ids.size(0), 1), cfg.classifier_cls_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat((cls, ids), dim=1)
        _check_length(ids.size(1), cfg, "input with [CLS]")
        positions = torch.arange(ids.size(1), device=ids.device)
        hidden, weights = self.encoder(
            self.embed(ids, positions), padding_mask(ids, cfg.pad_id), return_attention
        )
        logits = F.linear(hidden[:, 1:], self.embed.tokens.weight, self.mlm_bias)
        if return_attention:
            return logits, {"encoder": weights}
        return logits


class TransformerLM(nn.Module):
    """A decoder-only language model: the decoder stack of §3.1 without encoder-decoder attention, with
    causal self-attention and the output projection tied to the embedding (§3.4). Uses `n_decoder_layers`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        tokens = make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        self.embed = Embeddings(cfg, tokens)
        self.decoder = Decoder(cfg, cfg.n_decoder_layers, cross_attention=False)
        self.output_projection = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_output:
            self.output_projection.weight = tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=cfg.d_model**-0.5)

    def decode(
        self,
        ids: Tensor,
        positions: Tensor,
        key_valid: Tensor | None = None,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """ids (B, T) at `positions` ((T,) or (B, T)) -> logits (B, T, V), self-attention weights.

        `key_valid` (B, keys) marks real keys (False for the left padding of batched prompts); it covers
        the cached keys plus `ids`. None: every key is real.
        """
        mask = None if key_valid is None else key_valid[:, None, None, :]
        hidden, weights, _ = self.decoder(
            self.embed(ids, positions), self_mask=mask, is_causal=True, cache=cache, need_weights=need_weights
        )
        return self.output_projection(hidden), weights

    def forward(self, ids: Tensor, return_attention: bool = False):
        """ids (B, T), right-padded -> next-token logits (B, T, V); with `return_attention`, also
        {"decoder": [(B, n_heads, T, T) per layer]}."""
        _check_ids(ids, self.config.vocab_size, "ids")
        _check_length(ids.size(1), self.config, "input")
        positions = torch.arange(ids.size(1), device=ids.device)
        logits, weights = self.decode(ids, positions, need_weights=return_attention)
        if return_attention:
            return logits, {"decoder": weights}
        return logits

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int = 100,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        length_penalty_kind: str = "gnmt",
        use_cache: bool = True,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        context_window: int | None = None,
    ) -> Tensor:
        """Continue each prompt of prompt_ids (B, T) -> (B, L) new tokens (the prompt is not repeated);
        a row that produces EOS is padded after it.

        Prompts of different lengths are padded with pad_id (on either side); they are moved to the left
        internally and the padding is masked, so a prompt continues the same way alone or in a batch.

        The model reads at most `context_window` tokens (default max_len; give the length it was trained
        on): once prompt and continuation are longer, each step reads the last `context_window` tokens at
        positions 0, 1, ... (nanoGPT's crop), so generation may run past max_len. Past the window every step
        recomputes the window, because with absolute positions a shifted window changes every key.
        """
        cfg = self.config
        window = cfg.max_len if context_window is None else context_window
        if not isinstance(window, int) or not 1 <= window <= cfg.max_len:
            raise ValueError(f"context_window={window!r} must be an integer from 1 to max_len={cfg.max_len}")
        options = DecodingOptions(
            beam_size, length_penalty, length_penalty_kind, do_sample, temperature, top_k, top_p, generator
        )
        _check_ids(prompt_ids, cfg.vocab_size, "prompt_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        real = prompt_ids != cfg.pad_id
        if not bool(real.any(dim=1).all()):
            raise ValueError("every prompt needs at least one token that is not padding")
        # Stable sort on the real flag moves padding to the left and keeps the tokens' order.
        order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices
        prompt_ids, real = prompt_ids.gather(1, order), real.gather(1, order)
        limits = torch.full((prompt_ids.size(0),), max_new_tokens, dtype=torch.long, device=prompt_ids.device)
        padded = not bool(real.all())
        with evaluating(self):

            def make_stepper(beams: int) -> _LMStepper:
                # The last new token is never fed back: a row reads at most prompt + max_new - 1 tokens.
                capacity = min(window, prompt_ids.size(1) + max_new_tokens - 1) if use_cache else None
                return _LMStepper(
                    self, real.repeat_interleave(beams, dim=0) if padded else None, window, capacity
                )

            return decode(make_stepper, prompt_ids, limits, options, cfg.eos_id, cfg.pad_id, _banned_ids(cfg))


class _LMStepper:
    """A `generation.Stepper` over `TransformerLM.decode`, cached or recomputing the whole prefix, that reads
    at most the last `window` tokens of each row.

    The first step takes the (left-padded) prompts; real tokens get positions 0, 1, ... in every row. A row's
    positions count its real tokens within the window, so a prompt reads the same alone or in a batch.
    """

    def __init__(
        self, model: TransformerLM, prompt_valid: Tensor | None, window: int, capacity: int | None
    ) -> None:
        self.model = model
        self.window = window
        # A cache of `capacity` (<= window) tokens, or None: dropped at the first step past the window.
        self.cache = DecoderCache(len(model.decoder.layers), capacity) if capacity is not None else None
        self.valid = prompt_valid  # (N, tokens so far), None while no row has padding
        self.tokens: Tensor | None = None  # (N, tokens so far): every token fed

    def step(self, tokens: Tensor) -> Tensor:
        rows, new = tokens.shape
        if self.tokens is None:
            self.tokens = tokens
        else:
            self.tokens = torch.cat((self.tokens, tokens), dim=1)
            if self.valid is not None:
                ones = torch.ones(rows, new, dtype=torch.bool, device=tokens.device)
                self.valid = torch.cat((self.valid, ones), dim=1)
        if self.cache is not None and self.cache.length + new > self.cache.capacity:
            self.cache = None  # the window slides from here on: recompute it at every step
        if self.cache is not None:  # every token so far fits the window: feed only the new ones
            positions = self._positions(self.valid, self.tokens.size(1), rows, tokens.device)[:, -new:]
            logits, _ = self.model.decode(tokens, positions, self.valid, cache=self.cache)
            return logits[:, -1]
        context = self.tokens[:, -self.window :]
        valid = None if self.valid is None else self.valid[:, -self.window :]
        positions = self._positions(valid, context.size(1), rows, tokens.device)
        logits, _ = self.model.decode(context, positions, valid)
        return logits[:, -1]

    @staticmethod
    def _positions(valid: Tensor | None, width: int, rows: int, device: torch.device) -> Tensor:
        if valid is None:
            return torch.arange(width, device=device).expand(rows, width)
        return (valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)
        self.tokens = self.tokens.index_select(0, index)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, index)
