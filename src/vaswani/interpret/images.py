"""A Vision Transformer's attention on one image: the maps of every layer and head (as `AttentionMaps`,
so the grids, the full-size head and the HTML page of the text models draw them too), and the [CLS] row
drawn over the image itself, one panel per layer, averaged over heads.

Token 0 is [CLS]; token 1 + i * grid + j is the patch in row i, column j of the patch grid (labelled
"r{i+1}c{j+1}"). The caveat of vaswani.interpret.maps holds here too: the [CLS] row says where the [CLS]
state takes its values from in that layer, not why the model decided (the ViT paper's Figure 6 uses
attention rollout across layers instead; these are the raw per-layer maps). With `pooling="mean"` the head
reads the mean of the patch states, not [CLS], and the picture says less still.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaswani.interpret.maps import AttentionMaps, _numpy
from vaswani.interpret.plots import save_figure
from vaswani.models import evaluating
from vaswani.vision_task import ImageClassificationTask, model_input

OVERLAY_COLORMAP = "inferno"


@dataclass
class ImageAttention:
    """The attention maps of one image, the image (H, W, C) in [0, 1], and its patch grid size."""

    maps: AttentionMaps
    image: np.ndarray
    grid: int

    def cls_to_patches(self) -> np.ndarray:
        """(layers, grid, grid): the attention from [CLS] to each patch, mean over heads, per layer."""
        rows = np.stack([layer[:, 0, 1:].mean(axis=0) for layer in self.maps.maps["encoder"]])
        return rows.reshape(-1, self.grid, self.grid)


def patch_tokens(grid: int) -> list[str]:
    return ["[CLS]"] + [f"r{i + 1}c{j + 1}" for i in range(grid) for j in range(grid)]


def image_attention_maps(run: Any, image: Tensor, name: str, label: str | None = None) -> ImageAttention:
    """Run one image (C, H, W) in [0, 1] through a loaded image run (`vaswani.runs.load_run`) and keep its
    attention. `name` describes the image on the plots (a file name, "test image 5"); `label`, when known,
    is its true class."""
    task, model = run.task, run.model
    if not isinstance(task, ImageClassificationTask):
        raise ValueError(
            f"image attention needs an image_classification run; this is a {run.recipe.data.task} run"
        )
    cfg = model.config
    with torch.no_grad(), evaluating(model):
        logits, weights = model(model_input(image[None]).to(run.device), return_attention=True)
    probs = torch.softmax(logits[0].float(), dim=-1)
    best = int(probs.argmax())
    text = name if label is None else f"{name} (true class: {label})"
    maps = AttentionMaps(
        "classification",
        patch_tokens(cfg.grid_size),
        [],
        _numpy(weights),
        text=text,
        prediction=f"{task.label_names[best]} ({float(probs[best]):.3f})",
    )
    return ImageAttention(maps, image.permute(1, 2, 0).cpu().numpy(), cfg.grid_size)


def plot_image_attention(attention: ImageAttention, path: str | Path) -> Path:
    """The image, then per layer the [CLS] attention to each patch (mean over heads) laid over it, each
    panel on its own colour scale from 0 to its largest weight (printed above it). Returns the path."""
    from matplotlib.figure import Figure

    heat = attention.cls_to_patches()
    n_layers = len(heat)
    h, w = attention.image.shape[:2]
    grey = attention.image.mean(axis=2) if attention.image.shape[2] == 3 else attention.image[..., 0]
    fig = Figure(figsize=(2.1 * (n_layers + 1) + 0.4, 2.9), layout="constrained")
    axes = fig.subplots(1, n_layers + 1, squeeze=False)[0]
    image = attention.image if attention.image.shape[2] == 3 else attention.image[..., 0]
    axes[0].imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # the patch grid stretched over the pixels it covers
    for layer, ax in enumerate(axes[1:], 1):
        ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        top = max(float(heat[layer - 1].max()), 1e-6)
        ax.imshow(
            heat[layer - 1],
            cmap=OVERLAY_COLORMAP,
            vmin=0.0,
            vmax=top,
            alpha=0.65,
            extent=extent,
            interpolation="nearest",
        )
        ax.set_title(f"layer {layer} (max {top:.2f})", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    heads = attention.maps.n_heads("encoder")
    fig.suptitle(
        f"attention from [CLS] to each patch, mean of {heads} heads, per layer\n"
        f"{attention.maps.text}   prediction: {attention.maps.prediction}",
        fontsize=9,
    )
    return save_figure(fig, path, dpi=130)
