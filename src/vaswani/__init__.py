"""vaswani: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017), in PyTorch."""

from vaswani.attention import (
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from vaswani.config import TransformerConfig, VisionConfig
from vaswani.generation import (
    DecodingOptions,
    beam_search,
    greedy_search,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from vaswani.hub import import_hf, load_hf
from vaswani.models import (
    Transformer,
    TransformerClassifier,
    TransformerEncoder,
    TransformerLM,
    TransformerMaskedLM,
)
from vaswani.vision import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "DecodingOptions",
    "KVCache",
    "MultiHeadAttention",
    "Transformer",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerEncoder",
    "TransformerLM",
    "TransformerMaskedLM",
    "VisionConfig",
    "VisionTransformer",
    "beam_search",
    "causal_mask",
    "greedy_search",
    "import_hf",
    "load_hf",
    "padding_mask",
    "sample_next_token",
    "scaled_dot_product_attention",
    "top_k_filter",
    "top_p_filter",
]
