"""The Vision Transformer (Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words", arXiv:2010.11929,
§3.1): the encoder of §3.1 of Vaswani et al., unchanged, on a sequence of image patches.

ViT's Eq. 1-4, and where each lives:

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos     (Eq. 1)  `PatchEmbedding`, `VisionTransformer.embed`
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                   (Eq. 2)  `vaswani.layers.EncoderLayer`, pre-LN
    z_l  = MLP(LN(z'_l)) + z'_l                         (Eq. 3)  the same layer's feed-forward block
    y    = LN(z_L^0)                                    (Eq. 4)  the `Encoder`'s final LayerNorm, [CLS] row

There is no second transformer here: the stack is `vaswani.layers.Encoder`, with its one mask convention
(no mask at all, since every image has the same number of patches and none is padding).

Departures, on purpose: the pixels of a patch are flattened in (channel, row, column) order, the layout
of a convolution's weight, where the paper's JAX code uses (row, column, channel); that only permutes the
rows of E. `norm_first=False` gives the post-LN layers of Vaswani et al. instead of Eq. 2-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.config import VisionConfig
from vaswani.layers import Encoder


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C * P * P): the flattened patches x_p of §3.1.

    Patch (row i, column j) of the grid is token i * (W / P) + j (row-major, as the convolution lays its
    outputs out); its values are in (channel, row, column) order. H and W must be multiples of P.
    """
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"a {h}x{w} image cannot be cut into {p}x{p} patches without padding")
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class PatchEmbedding(nn.Module):
    """The patch embedding of Eq. 1: each flattened patch times the trainable projection E, plus a bias.

    One weight, shaped (d_model, C, P, P) like a convolution's, serves both forms: `mode="linear"` flattens
    the patches and multiplies (the equation as written); `mode="conv"` is the same function as a
    convolution with kernel and stride P (what the paper's code does). Xavier-uniform on the
    (d_model, C * P * P) matrix, like every other projection of the library; zero bias.
    """

    def __init__(self, channels: int, patch_size: int, d_model: int, mode: str = "conv") -> None:
        super().__init__()
        if mode not in ("conv", "linear"):
            raise ValueError(f"patch embedding mode {mode!r} must be 'conv' or 'linear'")
        self.patch_size, self.mode = patch_size, mode
        self.weight = nn.Parameter(torch.empty(d_model, channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.zeros(d_model))
        nn.init.xavier_uniform_(self.weight.view(d_model, -1))

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> patch embeddings (B, N, d_model), in `patchify`'s order."""
        if self.mode == "conv":
            if images.size(-2) % self.patch_size or images.size(-1) % self.patch_size:
                raise ValueError(
                    f"a {images.size(-2)}x{images.size(-1)} image cannot be cut into "
                    f"{self.patch_size}x{self.patch_size} patches without padding"
                )
            out = F.conv2d(images, self.weight, self.bias, stride=self.patch_size)  # padding 0
            return out.flatten(2).transpose(1, 2)
        return F.linear(patchify(images, self.patch_size), self.weight.flatten(1), self.bias)


def resize_position_embeddings(table: Tensor, new_grid: int, mode: str = "bicubic") -> Tensor:
    """Position embeddings (1 + g*g, D) for a g x g patch grid -> (1 + new_grid^2, D).

    §3.2 of the ViT paper ("Fine-tuning and higher resolution"): the learned embeddings of the patch grid
    are interpolated in 2D, by their place in the image; the [CLS] row has no place and is kept as it is.
    Bicubic, as timm does it (the paper's code is bilinear); to the same grid it is the identity.
    """
    cls_row, grid_rows = table[:1], table[1:]
    old_grid = math.isqrt(grid_rows.size(0))
    if old_grid * old_grid != grid_rows.size(0):
        raise ValueError(f"{grid_rows.size(0)} patch positions do not form a square grid")
    if new_grid < 1:
        raise ValueError(f"new grid size {new_grid} must be at least 1")
    grid = grid_rows.T.reshape(1, -1, old_grid, old_grid)
    resized = F.interpolate(grid.float(), size=(new_grid, new_grid), mode=mode, align_corners=False)
    return torch.cat((cls_row, resized.reshape(-1, new_grid * new_grid).T.to(table.dtype)), dim=0)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2020, §3.1, Figure 1): patch embeddings, a learned [CLS] token, learned 1D
    position embeddings, the library's `Encoder` (pre-LN by default), and a linear head on the final [CLS]
    state (the fine-tuning head of §3.1: "a single linear layer").

    Images go in as float (B, C, H, W) tensors of `cfg.image_size` pixels a side, scaled as the training
    data were (the recipes scale pixels to [-1, 1], as the paper's code does). Another size is an error
    until `resize_image` interpolates the position embeddings to it (§3.2).

    Initialisation follows the paper's code where the library has no convention of its own: [CLS] token
    and head zero, position embeddings N(0, 0.02^2).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbedding(cfg.channels, cfg.patch_size, cfg.d_model, cfg.patch_embedding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.position = nn.Parameter(torch.empty(1 + cfg.n_patches, cfg.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg.encoder_config(), cfg.n_encoder_layers)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _check_images(self, images: Tensor) -> None:
        cfg = self.config
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float (batch, channels, height, width) tensor, got "
                f"{tuple(images.shape)} {images.dtype}"
            )
        _, c, h, w = images.shape
        if c != cfg.channels:
            raise ValueError(f"images have {c} channels; the model takes {cfg.channels}")
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images are {h}x{w}; the model takes {cfg.image_size}x{cfg.image_size} "
                "(resize_image() interpolates its position embeddings to another size)"
            )

    def embed(self, images: Tensor) -> Tensor:
        """Eq. 1: images (B, C, H, W) -> z_0 (B, 1 + N, d_model), [CLS] first, then dropout."""
        self._check_images(images)
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(images.size(0), -1, -1).to(patches.dtype)
        return self.dropout(torch.cat((cls, patches), dim=1) + self.position)

    def forward(self, images: Tensor, return_attention: bool = False):
        """images (B, C, H, W) -> class logits (B, n_classes); with `return_attention`, also
        {"encoder": [(B, n_heads, 1 + N, 1 + N) per layer]}, [CLS] at index 0 and patch (i, j) at
        1 + i * grid + j."""
        hidden, weights = self.encoder(self.embed(images), None, need_weights=return_attention)
        pooled = hidden[:, 0] if self.config.pooling == "cls" else hidden[:, 1:].mean(dim=1)
        logits = self.head(pooled)
        if return_attention:
            return logits, {"encoder": weights}
        return logits

    @torch.no_grad()
    def resize_image(self, image_size: int) -> VisionTransformer:
        """Take images of `image_size` pixels a side from now on: interpolate the position embeddings to
        the new patch grid (§3.2) and update `config`. Returns the model."""
        cfg = self.config.replace(image_size=image_size)  # validates: patch_size must divide it
        self.position = nn.Parameter(resize_position_embeddings(self.position.data, cfg.grid_size))
        self.config = cfg
        return self
