"""The configuration objects of the library, with the papers' presets.

`TransformerConfig` describes the encoder-decoder of Vaswani et al. (2017) and the two variants built from
the same blocks (an encoder-only classifier and a decoder-only language model), with Table 3's presets.
`VisionConfig` describes the Vision Transformer (Dosovitskiy et al., 2020) built on the same encoder, with
the presets of its Table 1. Both are validated when they are made, so that a wrong value fails at once with
a message naming the field, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu", "gelu", "silu")
POSITIONAL_ENCODINGS = ("sinusoidal", "sinusoidal_concat", "learned")
ATTENTION_IMPLS = ("sdpa", "explicit")
POOLINGS = ("cls", "mean", "max")
INITS = ("xavier",)
PATCH_EMBEDDINGS = ("conv", "linear")


@dataclass
class TransformerConfig:
    """Hyperparameters of a Transformer (Vaswani et al., 2017, §3 and Table 3).

    The defaults are the paper's base model. Vocabulary ids: `pad_id` marks padding (masked as a key and
    ignored by the loss), `bos_id` starts every target sequence, `eos_id` ends one. `bos_id` may equal
    `pad_id` (Marian starts decoding with the pad token); `eos_id` may not.

    Fields beyond the paper:
      tgt_vocab_size       a separate target vocabulary; None shares `vocab_size` (the paper's setting).
      share_embeddings     one matrix for source and target embeddings (needs a shared vocabulary).
      tie_output           the pre-softmax projection reuses the target embedding matrix (§3.4).
      norm_first           pre-LN (LayerNorm before each sub-layer, plus a final LayerNorm); the paper is
                           post-LN (False).
      positional           "sinusoidal" (§3.5, interleaved sin/cos), "sinusoidal_concat" ([sin | cos],
                           as fairseq and Marian lay it out) or "learned".
      attention_impl       "sdpa" (torch.nn.functional.scaled_dot_product_attention: fused kernels) or
                           "explicit" (softmax(QK^T/sqrt(d_k))V written out). Both compute the same function;
                           the explicit path is always used when attention weights are requested.
      n_classes, pooling   for `TransformerClassifier`: number of classes and "cls" (the [CLS] state),
                           "mean" or "max" (mean or elementwise maximum of the real token states).
      cls_id               the [CLS] token the classifier prepends; None uses `bos_id`.
      fine_to_class        for a classifier also trained on finer labels (TREC's 50 classes under its 6):
                           the class of each fine class, -1 for none (SST-5's neutral under SST-2). Adds a
                           second head; the prediction averages the two heads' class probabilities.

    Fields for imported pretrained models (vaswani.hub); their defaults are the paper's model:
      type_vocab_size      BERT's token-type (segment) embeddings added to the input embeddings; 0 = none.
      embedding_norm       a LayerNorm on the summed input embeddings before dropout (BERT); False = none.
      final_logits_bias    a fixed (not trained) bias added to the output logits (Marian); False = none.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_len: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    tgt_vocab_size: int | None = None
    share_embeddings: bool = True
    tie_output: bool = True
    scale_embeddings: bool = True
    norm_first: bool = False
    activation: str = "relu"
    positional: str = "sinusoidal"
    layer_norm_eps: float = 1e-5
    attention_impl: str = "sdpa"
    bias: bool = True
    init: str = "xavier"
    n_classes: int | None = None
    pooling: str = "cls"
    cls_id: int | None = None
    fine_to_class: tuple[int, ...] | None = None
    type_vocab_size: int = 0
    embedding_norm: bool = False
    final_logits_bias: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        if self.d_model % self.n_heads != 0:
            fail("d_model", f"must be divisible by n_heads={self.n_heads}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(name, "must be a probability in [0, 1)")
        if self.tgt_vocab_size is not None:
            if not isinstance(self.tgt_vocab_size, int) or self.tgt_vocab_size <= 0:
                fail("tgt_vocab_size", "must be a positive integer or None")
            if self.share_embeddings and self.tgt_vocab_size != self.vocab_size:
                fail("share_embeddings", "needs one shared vocabulary (tgt_vocab_size None or = vocab_size)")
        smallest_vocab = min(self.vocab_size, self.tgt_vocab_size or self.vocab_size)
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < smallest_vocab:
                fail(name, f"must be a token id in [0, {smallest_vocab})")
        if self.eos_id == self.pad_id:
            fail("eos_id", "must differ from pad_id: a finished row is eos followed by padding")
        if self.cls_id is not None and (
            not isinstance(self.cls_id, int) or not 0 <= self.cls_id < self.vocab_size
        ):
            fail("cls_id", f"must be None or a token id in [0, {self.vocab_size})")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"must be one of {ACTIVATIONS}")
        if self.positional not in POSITIONAL_ENCODINGS:
            fail("positional", f"must be one of {POSITIONAL_ENCODINGS}")
        if self.positional != "learned" and self.d_model % 2 != 0:
            fail("d_model", "must be even for sinusoidal positional encodings")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.pooling not in POOLINGS:
            fail("pooling", f"must be one of {POOLINGS}")
        if self.init not in INITS:
            fail("init", f"must be one of {INITS}")
        if self.n_classes is not None and (not isinstance(self.n_classes, int) or self.n_classes < 2):
            fail("n_classes", "must be None or an integer >= 2")
        if self.fine_to_class is not None:
            if isinstance(self.fine_to_class, list):  # as read back from JSON
                self.fine_to_class = tuple(self.fine_to_class)
            classes = self.n_classes or 0
            if (
                not isinstance(self.fine_to_class, tuple)
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in self.fine_to_class)
                or sorted(set(self.fine_to_class) - {-1}) != list(range(classes))
                or len(self.fine_to_class) < 2
            ):
                fail(
                    "fine_to_class",
                    f"must give 2 or more fine classes each a class in [0, n_classes={self.n_classes}) "
                    "or -1, with every class under some fine class",
                )
        if not isinstance(self.layer_norm_eps, float) or not self.layer_norm_eps > 0:
            fail("layer_norm_eps", "must be a positive float")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            fail("type_vocab_size", "must be a non-negative integer (0 = no token-type embeddings)")
        for name in ("embedding_norm", "final_logits_bias"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def target_vocab_size(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    @property
    def classifier_cls_id(self) -> int:
        return self.bos_id if self.cls_id is None else self.cls_id

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        """Build a config from a mapping; an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown field(s) {', '.join(unknown)}")
        if "vocab_size" not in values:
            raise ValueError("TransformerConfig: missing required field vocab_size")
        return cls(**values)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def base(cls, vocab_size: int, **overrides: Any) -> TransformerConfig:
        """The paper's base model (Table 3): N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1."""
        values = dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1)
        return cls(vocab_size=vocab_size, **{**values, **overrides})

    @classmethod
    def big(cls, vocab_size: int, **overrides: Any) -> TransformerConfig:
        """The paper's big model (Table 3): N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (EN-DE)."""
        values = dict(
            d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3
        )
        return cls(vocab_size=vocab_size, **{**values, **overrides})

    @classmethod
    def small(cls, vocab_size: int, **overrides: Any) -> TransformerConfig:
        """A CPU-sized model: 3+3 layers, d_model=256, d_ff=1024, h=4 (about 3.2M parameters + embeddings)."""
        values = dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1)
        return cls(vocab_size=vocab_size, **{**values, **overrides})

    @classmethod
    def tiny(cls, vocab_size: int, **overrides: Any) -> TransformerConfig:
        """A model for tests and demos: 2+2 layers, d_model=64, d_ff=256, h=4."""
        values = dict(
            d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1, max_len=256
        )
        return cls(vocab_size=vocab_size, **{**values, **overrides})


@dataclass
class VisionConfig:
    """Hyperparameters of a Vision Transformer (Dosovitskiy et al., 2020, §3.1 and Table 1).

    Images are square, `image_size` pixels a side with `channels` channels, cut into (image_size /
    patch_size)^2 patches of patch_size x patch_size pixels; image_size must be a multiple of patch_size,
    because no image is ever padded or cropped. The encoder fields have the names and meanings of
    `TransformerConfig`'s; the defaults are ViT-Base (12 layers, d_model 768, MLP 3072, 12 heads), pre-LN
    with GELU as in the ViT paper (Eq. 2-3), LayerNorm eps 1e-6 as in its reference code.

    Fields beyond the encoder's:
      n_classes         the classification head's outputs.
      pooling           "cls" (the final [CLS] state, Eq. 4) or "mean" (the mean of the patch states:
                        the global average pooling of the paper's Appendix D.3).
      patch_embedding   "conv" (a convolution with kernel and stride patch_size) or "linear" (flatten each
                        patch, multiply by E, Eq. 1): the same function of the same weights.
    """

    image_size: int
    patch_size: int
    n_classes: int
    channels: int = 3
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    n_encoder_layers: int = 12
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    norm_first: bool = True
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_impl: str = "sdpa"
    bias: bool = True
    pooling: str = "cls"
    patch_embedding: str = "conv"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"VisionConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("image_size", "patch_size", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if self.image_size % self.patch_size != 0:
            fail("patch_size", f"must divide image_size={self.image_size}: images are never padded")
        if not isinstance(self.n_classes, int) or isinstance(self.n_classes, bool) or self.n_classes < 2:
            fail("n_classes", "must be an integer >= 2")
        if self.pooling not in POOLINGS:
            fail("pooling", f"must be one of {POOLINGS}")
        if self.patch_embedding not in PATCH_EMBEDDINGS:
            fail("patch_embedding", f"must be one of {PATCH_EMBEDDINGS}")
        try:
            self.encoder_config()
        except ValueError as error:
            raise ValueError(str(error).replace("TransformerConfig.", "VisionConfig.", 1)) from None

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    def encoder_config(self) -> TransformerConfig:
        """The `TransformerConfig` of the encoder stack.

        The encoder reads only the fields it uses; the vocabulary fields are placeholders that a patch
        sequence never looks at, set to the smallest values the config accepts.
        """
        return TransformerConfig(
            vocab_size=2,
            pad_id=0,
            bos_id=0,
            eos_id=1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_encoder_layers=self.n_encoder_layers,
            n_decoder_layers=0,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            max_len=1 + self.n_patches,
            norm_first=self.norm_first,
            activation=self.activation,
            positional="learned",
            layer_norm_eps=self.layer_norm_eps,
            attention_impl=self.attention_impl,
            bias=self.bias,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> VisionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets (ViT paper, Table 1)
    @classmethod
    def base(cls, image_size: int, patch_size: int, n_classes: int, **overrides: Any) -> VisionConfig:
        """ViT-Base: 12 layers, d_model 768, MLP 3072, 12 heads (86M parameters as ViT-B/16 at 224)."""
        values = dict(d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=12)
        return cls(image_size, patch_size, n_classes, **{**values, **overrides})

    @classmethod
    def large(cls, image_size: int, patch_size: int, n_classes: int, **overrides: Any) -> VisionConfig:
        """ViT-Large: 24 layers, d_model 1024, MLP 4096, 16 heads (307M)."""
        values = dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=24)
        return cls(image_size, patch_size, n_classes, **{**values, **overrides})

    @classmethod
    def huge(cls, image_size: int, patch_size: int, n_classes: int, **overrides: Any) -> VisionConfig:
        """ViT-Huge: 32 layers, d_model 1280, MLP 5120, 16 heads (632M)."""
        values = dict(d_model=1280, n_heads=16, d_ff=5120, n_encoder_layers=32)
        return cls(image_size, patch_size, n_classes, **{**values, **overrides})
