"""The implementations the benchmark compares, each behind one small interface (`Runner`).

- `vaswani`: this library's `Transformer`; greedy and beam search are `vaswani.generation`'s, on the model's
  KV-cache stepper.
- `torch`: `torch.nn.Transformer` completed into the same model (`TorchTransformer`): token embeddings scaled
  by sqrt(d_model), the same sinusoidal positions, and an output projection tied to the embedding. Greedy
  decoding is the loop its users write (the PyTorch tutorials' `greedy_decode`): run the decoder on the whole
  prefix at every step. It has no beam search.
- `hf`: Hugging Face `MarianMTModel` from a matching `MarianConfig` (post-LN, ReLU, scaled embeddings,
  [sin | cos] positions, tied embeddings), decoding with `generate`. Optional: without `transformers`
  installed it is skipped.

All three can carry the same weights (`copy_into_torch`, `copy_into_marian`), and then compute the same
function: `tests/test_benchmark.py` checks their logits against each other to 1e-5. The benchmark's models use
`positional="sinusoidal_concat"`, Marian's layout of the same sinusoids (§3.5; a fixed permutation of the
dimensions, so it costs the same as the interleaved layout), so that the Marian model is the same function.

Every decoder is made to generate exactly `new_tokens` tokens for every sentence, so that all do the same
work: EOS is banned (vaswani, torch) or held back by `min_new_tokens` (Hugging Face), and, as vaswani always
does, padding and BOS are never generated (`suppress_tokens` for Hugging Face).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.config import TransformerConfig
from vaswani.generation import beam_search, greedy_search, next_token_log_probs
from vaswani.layers import make_token_embedding, sinusoidal_table
from vaswani.models import Transformer, _EncoderDecoderStepper, evaluating
from vaswani.training.trainer import adam_implementation

IMPLEMENTATIONS = ("vaswani", "torch", "hf")
LABELS = {"vaswani": "vaswani", "torch": "torch.nn.Transformer", "hf": "HF MarianMTModel"}
LENGTH_PENALTY = 0.6  # §6.1; with every hypothesis of the same length it changes no ranking
TRANSFORMERS_MISSING = (
    "transformers is not installed: skipping Hugging Face MarianMTModel (pip install transformers)"
)


def check_config(cfg: TransformerConfig) -> None:
    """The peers can only be built for the paper's model: shared, tied vocabulary; post-LN; biases."""
    if not (cfg.share_embeddings and cfg.tie_output):
        raise ValueError("the benchmark needs a shared vocabulary and a tied output projection")
    if cfg.norm_first or not cfg.bias or not cfg.scale_embeddings:
        raise ValueError("the benchmark compares the paper's post-LN model with biases and scaled embeddings")
    if cfg.positional not in ("sinusoidal", "sinusoidal_concat"):
        raise ValueError("the benchmark's peers use sinusoidal positions")


def banned_ids(cfg: TransformerConfig) -> tuple[int, ...]:
    """What no decoder of the benchmark may generate: padding, BOS and EOS (so all lengths are equal)."""
    return tuple(sorted({cfg.pad_id, cfg.bos_id, cfg.eos_id}))


# ------------------------------------------------------------------------------------- torch.nn.Transformer
class TorchTransformer(nn.Module):
    """`torch.nn.Transformer` with what it leaves to its users, so that it is the paper's model:

    token embeddings scaled by sqrt(d_model) (§3.4), sinusoidal positions (§3.5) and dropout on their sum
    (§5.4), and a pre-softmax projection tied to the embedding (§3.4). nn.Transformer always appends a final
    LayerNorm to its encoder and decoder stacks, which the post-LN paper model has not: those two are removed.
    nn.Transformer's one `dropout` also drops attention weights and the feed-forward hidden layer; those
    are set to the config's `attention_dropout` and `activation_dropout` (0 in the paper).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.embedding = make_token_embedding(cfg.vocab_size, cfg.d_model, cfg.pad_id)
        self.scale = math.sqrt(cfg.d_model)
        layout = "concat" if cfg.positional == "sinusoidal_concat" else "interleaved"
        self.register_buffer(
            "positions", sinusoidal_table(cfg.max_len, cfg.d_model, layout), persistent=False
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            d_model=cfg.d_model,
            nhead=cfg.n_heads,
            num_encoder_layers=cfg.n_encoder_layers,
            num_decoder_layers=cfg.n_decoder_layers,
            dim_feedforward=cfg.d_ff,
            dropout=cfg.dropout,
            activation=cfg.activation,
            layer_norm_eps=cfg.layer_norm_eps,
            batch_first=True,
            norm_first=False,
        )
        self.transformer.encoder.norm = None
        self.transformer.decoder.norm = None
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.self_attn.dropout = cfg.attention_dropout
            if hasattr(layer, "multihead_attn"):
                layer.multihead_attn.dropout = cfg.attention_dropout
            layer.dropout.p = cfg.activation_dropout

    def embed(self, ids: Tensor, start: int = 0) -> Tensor:
        return self.dropout(self.embedding(ids) * self.scale + self.positions[start : start + ids.size(1)])

    def project(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embedding.weight)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T) -> logits (B, T, V): one call of nn.Transformer.forward."""
        key_padding = src == self.config.pad_id
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=tgt_in.device)
        hidden = self.transformer(
            self.embed(src),
            self.embed(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=key_padding,
            memory_key_padding_mask=key_padding,
            tgt_is_causal=True,
        )
        return self.project(hidden)

    @torch.no_grad()
    def greedy(self, src: Tensor, new_tokens: int) -> Tensor:
        """The usual nn.Transformer greedy loop: encode once, rerun the decoder on the prefix each step."""
        cfg = self.config
        with evaluating(self):
            key_padding = src == cfg.pad_id
            with _encoder_fast_path_unless_cpu_autocast(src.device), warnings.catch_warnings():
                # The inference fast path packs padded sources into nested tensors, with a warning that
                # their API is a prototype.
                warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
                memory = self.transformer.encoder(self.embed(src), src_key_padding_mask=key_padding)
            ys = torch.full((src.size(0), 1), cfg.bos_id, dtype=torch.long, device=src.device)
            for _ in range(new_tokens):
                causal = nn.Transformer.generate_square_subsequent_mask(ys.size(1), device=src.device)
                hidden = self.transformer.decoder(
                    self.embed(ys),
                    memory,
                    tgt_mask=causal,
                    memory_key_padding_mask=key_padding,
                    tgt_is_causal=True,
                )
                log_probs = next_token_log_probs(self.project(hidden[:, -1]), banned_ids(cfg))
                ys = torch.cat((ys, log_probs.argmax(dim=-1, keepdim=True)), dim=1)
        return ys[:, 1:]


@contextmanager
def _encoder_fast_path_unless_cpu_autocast(device: torch.device):
    """nn.TransformerEncoderLayer's inference fast path checks `torch.is_autocast_enabled()`, which only
    sees CUDA autocast: under CPU autocast it takes the fast path and fails ("expected scalar type Float but
    found BFloat16", torch 2.13). Turn the fast path off there, as a user would have to."""
    if device.type == "cuda" or not torch.is_autocast_enabled(device.type):
        yield
        return
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.no_grad()
def copy_into_torch(source: Transformer, target: TorchTransformer) -> TorchTransformer:
    """Load a vaswani Transformer's weights into a TorchTransformer of the same config.

    vaswani's MultiHeadAttention keeps W^Q, W^K, W^V stacked as nn.MultiheadAttention does, so every tensor
    copies over as it is.
    """

    def attention(dst: nn.MultiheadAttention, src) -> None:
        dst.in_proj_weight.copy_(src.in_proj_weight)
        dst.in_proj_bias.copy_(src.in_proj_bias)
        dst.out_proj.weight.copy_(src.out_proj.weight)
        dst.out_proj.bias.copy_(src.out_proj.bias)

    def linear(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    target.embedding.weight.copy_(source.src_embed.tokens.weight)
    for dst, src in zip(target.transformer.encoder.layers, source.encoder.layers, strict=True):
        attention(dst.self_attn, src.self_attn)
        linear(dst.linear1, src.feed_forward.linear1)
        linear(dst.linear2, src.feed_forward.linear2)
        linear(dst.norm1, src.attn_block.norm)
        linear(dst.norm2, src.ff_block.norm)
    for dst, src in zip(target.transformer.decoder.layers, source.decoder.layers, strict=True):
        attention(dst.self_attn, src.self_attn)
        attention(dst.multihead_attn, src.cross_attn)
        linear(dst.linear1, src.feed_forward.linear1)
        linear(dst.linear2, src.feed_forward.linear2)
        linear(dst.norm1, src.self_block.norm)
        linear(dst.norm2, src.cross_block.norm)
        linear(dst.norm3, src.ff_block.norm)
    return target


# ---------------------------------------------------------------------------------------- Hugging Face Marian
def import_transformers():
    """The `transformers` module with its Marian classes loaded, or None when it is not installed.

    transformers imports its submodules lazily, on first use; they are loaded here so that neither a timing
    nor a memory measurement pays for importing them (about 130 MiB of resident memory).
    """
    try:
        import transformers

        transformers.MarianConfig, transformers.MarianMTModel, transformers.GenerationConfig  # noqa: B018
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return transformers


def marian_config(cfg: TransformerConfig, transformers):
    """The MarianConfig of the same model: post-LN, ReLU, scaled embeddings, tied vocabulary, no final norm.

    Marian starts decoding with `decoder_start_token_id`, here vaswani's BOS; `forced_eos_token_id` (0 by
    default) is cleared, or the last generated token would be forced.
    """
    check_config(cfg)
    return transformers.MarianConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function=cfg.activation,
        dropout=float(cfg.dropout),
        attention_dropout=float(cfg.attention_dropout),
        activation_dropout=float(cfg.activation_dropout),
        max_position_embeddings=cfg.max_len,
        scale_embedding=True,
        pad_token_id=cfg.pad_id,
        eos_token_id=cfg.eos_id,
        bos_token_id=cfg.bos_id,
        decoder_start_token_id=cfg.bos_id,
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )


def make_marian(cfg: TransformerConfig, transformers) -> nn.Module:
    """A randomly initialised MarianMTModel of the same model (its default attention implementation)."""
    return transformers.MarianMTModel(marian_config(cfg, transformers))


@torch.no_grad()
def copy_into_marian(source: Transformer, target: nn.Module) -> nn.Module:
    """Load a vaswani Transformer's weights into a MarianMTModel of the same config.

    The stacked W^Q, W^K, W^V of vaswani split into Marian's q_proj, k_proj, v_proj; the embedding is one
    shared matrix in both; Marian's final_logits_bias is zero. Marian computes its own positional table,
    the same [sin | cos] sinusoids as vaswani's "sinusoidal_concat".
    """
    if source.config.positional != "sinusoidal_concat":
        raise ValueError("copy_into_marian needs positional='sinusoidal_concat', Marian's layout")

    def attention(dst: nn.Module, src) -> None:
        for proj, w, b in zip(
            (dst.q_proj, dst.k_proj, dst.v_proj),
            src.in_proj_weight.chunk(3, dim=0),
            src.in_proj_bias.chunk(3, dim=0),
            strict=True,
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        linear(dst.out_proj, src.out_proj)

    def linear(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)

    model = target.model
    model.shared.weight.copy_(source.src_embed.tokens.weight)
    target.final_logits_bias.zero_()
    for dst, src in zip(model.encoder.layers, source.encoder.layers, strict=True):
        attention(dst.self_attn, src.self_attn)
        linear(dst.self_attn_layer_norm, src.attn_block.norm)
        linear(dst.fc1, src.feed_forward.linear1)
        linear(dst.fc2, src.feed_forward.linear2)
        linear(dst.final_layer_norm, src.ff_block.norm)
    for dst, src in zip(model.decoder.layers, source.decoder.layers, strict=True):
        attention(dst.self_attn, src.self_attn)
        linear(dst.self_attn_layer_norm, src.self_block.norm)
        attention(dst.encoder_attn, src.cross_attn)
        linear(dst.encoder_attn_layer_norm, src.cross_block.norm)
        linear(dst.fc1, src.feed_forward.linear1)
        linear(dst.fc2, src.feed_forward.linear2)
        linear(dst.final_layer_norm, src.ff_block.norm)
    return target


# ---------------------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One implementation as the benchmark drives it.

    logits(src, tgt_in) -> (B, T, V) in training mode; greedy(src, n) and beam(src, n, k) -> (B, n) ids of
    exactly n tokens per sentence; `beam` is None where the implementation has no beam search.
    """

    name: str
    model: nn.Module
    logits: Callable[[Tensor, Tensor], Tensor]
    greedy: Callable[[Tensor, int], Tensor]
    beam: Callable[[Tensor, int, int], Tensor] | None
    details: dict = field(default_factory=dict)
    # How the implementation's own training loop builds Adam: vaswani's trainer and Hugging Face's Trainer
    # (for torch >= 2.8) use the fused kernel; a hand-written nn.Transformer loop gets torch.optim's default.
    optimizer_options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS[self.name]


def vaswani_runner(model: Transformer) -> Runner:
    cfg = model.config
    banned = banned_ids(cfg)

    def start(src: Tensor, new_tokens: int, beams: int):
        memory, mask, _ = model.encode(src)
        stepper = _EncoderDecoderStepper(model, memory, mask, capacity=new_tokens)
        first = torch.full((src.size(0) * beams, 1), cfg.bos_id, dtype=torch.long, device=src.device)
        limits = torch.full((src.size(0),), new_tokens, dtype=torch.long, device=src.device)
        return stepper, first, limits

    @torch.no_grad()
    def greedy(src: Tensor, new_tokens: int) -> Tensor:
        with evaluating(model):
            stepper, first, limits = start(src, new_tokens, 1)
            return greedy_search(stepper, first, limits, cfg.eos_id, cfg.pad_id, banned)

    @torch.no_grad()
    def beam(src: Tensor, new_tokens: int, beam_size: int) -> Tensor:
        with evaluating(model):
            stepper, first, limits = start(src, new_tokens, beam_size)
            output = beam_search(
                stepper, first, src.size(0), beam_size, limits, cfg.eos_id, cfg.pad_id, banned, LENGTH_PENALTY
            )
            return output.tokens

    details = {
        "attention": f"attention_impl={cfg.attention_impl!r}",
        "decoding": "generation.greedy_search / beam_search on the model's KV-cache stepper",
        "optimizer": "training.trainer.adam_implementation: fused Adam on CPU and CUDA",
    }
    options = adam_implementation(list(model.parameters()))
    return Runner("vaswani", model, model, greedy, beam, details, options)


def torch_runner(model: TorchTransformer) -> Runner:
    details = {
        "attention": "nn.MultiheadAttention (scaled_dot_product_attention inside)",
        "decoding": "greedy: the decoder rerun on the whole prefix each step (no KV cache); no beam search",
        "optimizer": "torch.optim.Adam with its defaults (the per-tensor loop on CPU, foreach on CUDA)",
    }
    return Runner("torch", model, model, model.greedy, None, details)


def hf_runner(model: nn.Module, transformers) -> Runner:
    cfg = model.config

    def generation_config(new_tokens: int, beams: int):
        return transformers.GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # holds EOS back: every sentence gets exactly new_tokens tokens
            num_beams=beams,
            do_sample=False,
            length_penalty=LENGTH_PENALTY,
            decoder_start_token_id=cfg.decoder_start_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            forced_eos_token_id=None,
            suppress_tokens=sorted({cfg.pad_token_id, cfg.bos_token_id}),
            use_cache=True,
        )

    def logits(src: Tensor, tgt_in: Tensor) -> Tensor:
        mask = (src != cfg.pad_token_id).long()
        return model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in, use_cache=False).logits

    def run(src: Tensor, new_tokens: int, beams: int) -> Tensor:
        with evaluating(model):
            out = model.generate(
                input_ids=src,
                attention_mask=(src != cfg.pad_token_id).long(),
                generation_config=generation_config(new_tokens, beams),
            )
        return out[:, 1:]  # drop the decoder start token

    details = {
        "attention": f"attn_implementation={getattr(cfg, '_attn_implementation', None)!r}",
        "decoding": "model.generate(num_beams=1 or 4, do_sample=False, min_new_tokens=max_new_tokens)",
        "transformers": transformers.__version__,
        "optimizer": "fused Adam, as the Trainer's default optim='adamw_torch_fused' (torch >= 2.8)",
    }
    return Runner(
        "hf",
        model,
        logits,
        lambda src, n: run(src, n, 1),
        lambda src, n, k: run(src, n, k),
        details,
        {"fused": True},
    )


def build_runner(
    name: str, cfg: TransformerConfig, reference: Transformer | None = None, transformers=None
) -> Runner:
    """Build implementation `name` of `cfg` in fp32 on the CPU; with a `reference` vaswani model, with its
    weights (otherwise each initialises itself)."""
    if name == "vaswani":
        model = reference if reference is not None else Transformer(cfg)
        return vaswani_runner(model)
    if name == "torch":
        model = TorchTransformer(cfg)
        if reference is not None:
            copy_into_torch(reference, model)
        return torch_runner(model)
    if name == "hf":
        if transformers is None:
            raise ValueError(TRANSFORMERS_MISSING)
        model = make_marian(cfg, transformers)
        if reference is not None:
            copy_into_marian(reference, model)
        return hf_runner(model, transformers)
    raise ValueError(f"unknown implementation {name!r}: choose from {', '.join(IMPLEMENTATIONS)}")
