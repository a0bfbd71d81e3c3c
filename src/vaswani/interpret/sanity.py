"""The sanity plots of the Annotated Transformer, drawn from the library's own functions: the sinusoidal
positional encodings (§3.5), the attention masks (§3.2.3), the learning-rate schedule (§5.3) and label
smoothing (§5.4). `write_sanity_plots` draws them for `vaswani plot`. Like the attention pictures, they use
matplotlib's `Figure`, never pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vaswani.attention import causal_mask, padding_mask
from vaswani.interpret.maps import COLORMAP
from vaswani.interpret.plots import save_figure
from vaswani.layers import sinusoidal_table
from vaswani.training.losses import label_smoothed_cross_entropy
from vaswani.training.schedules import noam_lr


def plot_positional_encoding(
    path: str | Path, d_model: int = 128, max_len: int = 100, dims: Sequence[int] | None = None
) -> Path:
    """The sinusoidal positional encodings of §3.5 (`vaswani.layers.sinusoidal_table`, the interleaved
    layout the models use): the whole (position, dimension) table as a heatmap, and a few dimensions as
    curves against the position, as the Annotated Transformer draws them.

    Each pair of dimensions (2i, 2i+1) is a sine and a cosine of one wavelength, growing geometrically from
    2π to 10000·2π across the dimensions: low dimensions change from one position to the next, high ones
    barely move, so every position gets a distinct pattern and PE(pos + k) is a linear function of PE(pos).
    `dims` default: the sines at a short, a middle and a long wavelength (at 15%, 30% and 50% of the
    dimensions) and the cosine paired with the first, a quarter-period ahead of it. Returns the path.
    """
    from matplotlib.figure import Figure

    table = sinusoidal_table(max_len, d_model).numpy()
    if dims is None:
        sines = sorted({2 * round(fraction * d_model / 2) for fraction in (0.15, 0.3, 0.5)})
        dims = sorted({d for d in (*sines, sines[0] + 1) if d < d_model})
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    image = left.imshow(table.T, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", origin="lower")
    left.set_xlabel("position")
    left.set_ylabel("dimension")
    left.set_title(f"the table, d_model = {d_model} (even dims sin, odd dims cos)")
    fig.colorbar(image, ax=left, shrink=0.9)
    positions = np.arange(max_len)
    for d in dims:
        wavelength = 2 * math.pi * 10000 ** ((d - d % 2) / d_model)
        style = "-" if d % 2 == 0 else "--"
        right.plot(
            positions,
            table[:, d],
            style,
            label=f"dim {d} ({'sin' if d % 2 == 0 else 'cos'}, λ = {wavelength:.0f})",
        )
    right.set_xlabel("position")
    right.set_ylabel("encoding value")
    right.set_title("a few dimensions against the position (λ: wavelength)")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=4, frameon=False)
    right.grid(True, alpha=0.3)
    fig.suptitle(
        "Sinusoidal positional encoding (§3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(…)"
    )
    return save_figure(fig, path)


def plot_masks(path: str | Path, length: int = 7, pad: int = 2) -> Path:
    """The three masks of the library (`vaswani.attention`, True = may attend) for one example of `length`
    tokens whose last `pad` are padding: the padding mask (every query may see the real keys), the causal
    mask of §3.2.3 (query i sees keys 0..i, "preventing leftward information flow") and both together, as
    a decoder whose keys include padding uses them (the language model's batched prompts). Returns the
    path."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not 0 <= pad < length:
        raise ValueError(f"plot_masks: need 0 <= pad < length, got pad={pad}, length={length}")
    ids = torch.tensor([[5 + i for i in range(length - pad)] + [0] * pad])
    padding = padding_mask(ids, pad_id=0)[0, 0].expand(length, length)
    causal = causal_mask(length, length)
    panels = [
        ("padding_mask(ids, pad_id)", padding),
        ("causal_mask(T, T)", causal),
        ("padding & causal", padding & causal),
    ]
    labels = [f"t{i + 1}" for i in range(length - pad)] + ["<pad>"] * pad
    colours = ListedColormap(["#eeeeee", "#2070b4"])
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    for ax, (title, mask) in zip(fig.subplots(1, 3), panels, strict=True):
        ax.imshow(mask.numpy(), cmap=colours, vmin=0, vmax=1)
        for i in range(length):
            for j in range(length):
                ax.text(
                    j,
                    i,
                    "✓" if mask[i, j] else "·",
                    ha="center",
                    va="center",
                    color="white" if mask[i, j] else "#999999",
                    fontsize=10,
                )
        ax.set_xticks(range(length), labels, rotation=45, ha="right")
        ax.set_yticks(range(length), labels)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title, fontfamily="monospace")
    fig.suptitle("Attention masks (True = may attend, blue): padding, causal (§3.2.3), and their combination")
    return save_figure(fig, path)


def plot_lr_schedule(path: str | Path, d_model: int = 512, warmup: int = 4000, steps: int = 20000) -> Path:
    """The learning rate of §5.3, Eq. 3 (`vaswani.training.noam_lr`) against the step, for
    (d_model, warmup), (d_model, 2·warmup) and (d_model / 2, warmup): the three curves of the Annotated
    Transformer with its defaults (512, 4000). Linear warm-up to a peak of d_model^-0.5 · warmup^-0.5 at
    step = warmup, then decay as step^-0.5; a smaller model takes larger steps. Returns the path."""
    from matplotlib.figure import Figure

    pairs = [(d_model, warmup), (d_model, 2 * warmup), (max(d_model // 2, 1), warmup)]
    x = np.arange(1, steps + 1)
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for d, w in pairs:
        ax.plot(x, [noam_lr(int(s), d, w) for s in x], label=f"d_model = {d}, warmup = {w}")
        peak = noam_lr(w, d, w)
        if w <= steps:
            ax.plot([w], [peak], "o", color=ax.lines[-1].get_color())
            ax.annotate(f"{peak:.2e}", (w, peak), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("lrate = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)   (§5.3, Eq. 3)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def smoothed_target_distribution(target: int, vocab: int, epsilon: float, pad_id: int = 0) -> np.ndarray:
    """The target distribution q that `label_smoothed_cross_entropy` trains towards, recovered from the
    loss itself rather than re-derived: for uniform logits z, d loss / d z = softmax(z) - q, so
    q = 1/V - gradient. Padding as the target contributes nothing and gives a row of zeros."""
    if target == pad_id:
        return np.zeros(vocab)
    logits = torch.zeros(1, vocab, requires_grad=True)
    out = label_smoothed_cross_entropy(logits, torch.tensor([target]), epsilon, pad_id)
    (gradient,) = torch.autograd.grad(out.loss, logits)
    return (torch.softmax(logits.detach(), dim=-1) - gradient)[0].double().numpy()


def plot_label_smoothing(path: str | Path, vocab: int = 8, epsilon: float = 0.1, pad_id: int = 0) -> Path:
    """Label smoothing of §5.4 as `vaswani.training.label_smoothed_cross_entropy` defines it: the target
    distribution for a few true tokens (1 - ε on the true token, ε / (V - 2) on every other token except
    padding, 0 on padding, and nothing at all for a padded position), and the loss against the probability
    the model gives the true token, which no longer falls to zero: over-confidence is penalised, which
    "hurts perplexity, as the model learns to be more unsure, but improves accuracy and BLEU". Returns the
    path written."""
    from matplotlib.figure import Figure

    if vocab < 3 or not 0 <= pad_id < vocab:
        raise ValueError(f"label smoothing needs vocab >= 3 and a pad_id inside it, got {vocab}, {pad_id}")
    targets = list(dict.fromkeys(t for t in (2, 1, pad_id, 3, vocab - 1) if t < vocab))
    true = 1 if pad_id != 1 else 2
    # The loss computes in float32: what differs from 0 by less than 1e-6 there is round-off.
    table = np.round(np.stack([smoothed_target_distribution(t, vocab, epsilon, pad_id) for t in targets]), 6)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    image = left.imshow(table, cmap=COLORMAP, vmin=0, vmax=1)
    for i in range(table.shape[0]):
        for j in range(vocab):
            colour = "white" if table[i, j] > 0.55 else "black"
            left.text(j, i, f"{table[i, j]:.3g}", ha="center", va="center", fontsize=8, color=colour)
    left.set_xticks(range(vocab), [("pad" if v == pad_id else str(v)) for v in range(vocab)])
    left.set_yticks(
        range(len(targets)), [f"target {t}" if t != pad_id else "padded position" for t in targets]
    )
    left.set_xlabel("token")
    left.set_title(f"smoothed target distribution, V = {vocab}, ε = {epsilon}")
    fig.colorbar(image, ax=left, shrink=0.8)

    confidence = np.linspace(0.02, 0.995, 200)
    for eps in sorted({0.0, epsilon}):
        losses = []
        for p in confidence:
            # The true token gets p, the other real tokens share 1 - p; logits = log-probabilities.
            probs = np.full(vocab, (1 - p) / (vocab - 2))
            probs[pad_id], probs[true] = 1e-9, p
            logits = torch.tensor(np.log(probs))[None]
            losses.append(float(label_smoothed_cross_entropy(logits, torch.tensor([true]), eps, pad_id).loss))
        right.plot(confidence, losses, label=f"ε = {eps}" if eps else "ε = 0 (no smoothing)")
    right.set_xlabel("probability given to the true token")
    right.set_ylabel("loss")
    right.set_title("loss against confidence: with ε > 0 certainty costs")
    right.grid(True, alpha=0.3)
    right.legend()
    fig.suptitle("Label smoothing (§5.4), from label_smoothed_cross_entropy")
    return save_figure(fig, path)


SANITY_PLOTS = {
    "positional": ("positional_encoding.png", plot_positional_encoding),
    "masks": ("masks.png", plot_masks),
    "lr": ("lr_schedule.png", plot_lr_schedule),
    "label-smoothing": ("label_smoothing.png", plot_label_smoothing),
}


def write_sanity_plots(out_dir: str | Path, names: Sequence[str] = tuple(SANITY_PLOTS)) -> list[Path]:
    """Draw the named sanity plots (`SANITY_PLOTS`: positional, masks, lr, label-smoothing) with their
    default settings into `out_dir`; returns the paths written."""
    unknown = [name for name in names if name not in SANITY_PLOTS]
    if unknown:
        raise ValueError(f"unknown plot {unknown[0]!r}: choose from {', '.join(SANITY_PLOTS)}")
    return [SANITY_PLOTS[name][1](Path(out_dir) / SANITY_PLOTS[name][0]) for name in names]
