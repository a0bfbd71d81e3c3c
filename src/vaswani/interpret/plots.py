"""Attention maps as pictures: all heads of one layer side by side, one head at full size, and a
classifier's [CLS] row per layer; `write_attention_files` writes all of them (and, on request, the HTML
page) for one input, as `vaswani attention` does.

Plots use matplotlib's object-oriented `Figure` (rendered by Agg when saved), never pyplot, as in
`vaswani.evaluation`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from vaswani.interpret.html import write_attention_html
from vaswani.interpret.maps import COLORMAP, AttentionMaps, axis_names, title_of


def _axes_caption(maps: AttentionMaps, name: str) -> str:
    rows, columns = axis_names(maps, name)
    return f"rows and columns: {rows}" if rows == columns else f"rows: {rows}, columns: {columns}"


def _label_size(n: int) -> float:
    """Tick-label font size for n tokens on an axis: readable when short, still legible when long."""
    return 9.0 if n <= 20 else 8.0 if n <= 60 else 6.5


def _heatmap(ax: Any, weights: np.ndarray, rows: list[str], columns: list[str], size: float) -> Any:
    image = ax.imshow(weights, cmap=COLORMAP, vmin=0.0, vmax=1.0, aspect="equal", interpolation="nearest")
    step = max(1, math.ceil(max(len(rows), len(columns)) / 90))  # beyond ~90 labels they collide
    ax.set_xticks(range(0, len(columns), step), columns[::step], fontsize=size, rotation=60, ha="right")
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=size)
    for label in ax.get_xticklabels():
        label.set_rotation_mode("anchor")
    ax.tick_params(length=2, pad=2)
    return image


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _caption(maps: AttentionMaps) -> str:
    parts = [f"input: {_one_line(maps.text)}"]
    if maps.kind == "translation":
        parts.append(f"target: {_one_line(maps.target or '')}")
    if maps.prediction:
        parts.append(f"prediction: {maps.prediction}")
    return "\n".join(part if len(part) <= 110 else part[:109] + "…" for part in parts)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save `fig` as a PNG at `path`, making its directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_layer_grid(maps: AttentionMaps, name: str, layer: int, path: str | Path) -> Path:
    """All heads of one layer side by side, on one colour scale from 0 to 1, as a PNG at `path`.

    Comparing heads is the point: §3.2.2 argues that several heads let the model "jointly attend to
    information from different representation subspaces at different positions", and the grid shows
    whether they do (one head on the previous token, one on the aligned source word, one spread wide).
    Rows are queries, columns keys, labelled with the token strings. Returns the path written.
    """
    from matplotlib.figure import Figure

    weights = maps.layer(name, layer)
    rows, columns = maps.axes(name)
    heads, n = weights.shape[0], max(len(rows), len(columns))
    # Short inputs read best in one row of heads; long ones in a squarer grid that fits a screen.
    ncols = min(heads, 4 if n <= 24 else math.ceil(math.sqrt(heads)))
    nrows = math.ceil(heads / ncols)
    cell = 0.26 if n <= 40 else 0.18 if n <= 80 else 0.12
    size = min(_label_size(n), 0.62 * 72 * cell)
    label_room = 0.09 * max(map(len, rows + columns)) + 0.4
    width = ncols * (cell * len(columns) + label_room) + 1.0
    height = nrows * (cell * len(rows) + label_room) + 1.0
    fig = Figure(figsize=(max(width, 6.0), max(height, 3.5)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= heads:
            ax.set_axis_off()
            continue
        image = _heatmap(ax, weights[index], rows, columns, size)
        ax.set_title(f"head {index + 1}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(
        f"{title_of(maps, name)}, layer {layer} of {maps.n_layers(name)} ({_axes_caption(maps, name)})\n"
        + _caption(maps),
        fontsize=10,
    )
    return save_figure(fig, path)


def plot_head(maps: AttentionMaps, name: str, layer: int, head: int, path: str | Path) -> Path:
    """One head of one layer at full size (the paper's Figures 3-5 look at single heads this way): a
    heatmap with every token labelled, colour from 0 to 1. Returns the path written."""
    from matplotlib.figure import Figure

    weights = maps.layer(name, layer)
    maps.check_head(name, head)
    rows, columns = maps.axes(name)
    n = max(len(rows), len(columns))
    cell = 0.42 if n <= 25 else 0.3 if n <= 50 else 0.18
    label_room = 0.1 * max(map(len, rows + columns)) + 0.8
    fig = Figure(
        figsize=(
            max(cell * len(columns) + label_room + 1.2, 5.5),
            max(cell * len(rows) + label_room + 1.0, 4.0),
        ),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = _heatmap(ax, weights[head - 1], rows, columns, _label_size(n) + 2)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    rows_name, columns_name = axis_names(maps, name)
    shifted = "; row i predicts token i + 1" if name != "encoder" else ""
    ax.set_ylabel(f"query ({rows_name}{shifted})")
    ax.set_xlabel(f"key ({columns_name})")
    fig.suptitle(f"{title_of(maps, name)}, layer {layer}, head {head}\n" + _caption(maps), fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_cls_attention(maps: AttentionMaps, path: str | Path) -> Path:
    """For a classifier: how much [CLS] attends to each input token, averaged over heads, one row per
    layer, each cell labelled with its weight. Returns the path written.

    The classifier reads only the final [CLS] state (`pooling="cls"`), and that state is built by these
    rows: the last layer's row is the mixture of token states [CLS] passes on to the head. It is the
    picture BERT tutorials show as "what the classifier looks at", with the caveat of the module docstring
    (and with `pooling="mean"` the head reads the mean of the token states, so the picture says less).
    """
    from matplotlib.figure import Figure

    if maps.kind != "classification":
        raise ValueError(f"[CLS] attention needs a classification run; this is a {maps.kind} run")
    rows = np.stack([layer[:, 0, :].mean(axis=0) for layer in maps.maps["encoder"]])  # (layers, keys)
    tokens = maps.source_tokens
    n_layers, n_keys = rows.shape
    fig = Figure(figsize=(max(0.55 * n_keys + 2.5, 6.0), 0.55 * n_layers + 2.6), layout="constrained")
    ax = fig.add_subplot()
    top = max(float(rows.max()), 1e-6)
    image = ax.imshow(rows, cmap=COLORMAP, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
    if n_keys <= 40:
        for i in range(n_layers):
            for j in range(n_keys):
                colour = "white" if rows[i, j] > 0.55 * top else "black"
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=7.5, color=colour)
    ax.set_xticks(range(n_keys), tokens, fontsize=_label_size(n_keys) + 1, rotation=45, ha="right")
    for label in ax.get_xticklabels():
        label.set_rotation_mode("anchor")
    ax.set_yticks(range(n_layers), [f"layer {i + 1}" for i in range(n_layers)])
    fig.colorbar(image, ax=ax, shrink=0.9, label="weight (mean of heads)")
    heads = maps.n_heads("encoder")
    fig.suptitle(
        f"attention from [CLS] to the input, mean of {heads} heads, per layer\n" + _caption(maps), fontsize=10
    )
    return save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------ all files
def _slug(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:40].strip("-") or "text"


def output_dir_for(out_dir: str | Path, text: str, taken: set[str] | None = None) -> Path:
    """A directory under `out_dir` named after `text` ("a-little-girl-is-climbing-into-a-wooden"); a
    name already in `taken` gets a numbered suffix, and is added to it."""
    base = _slug(text)
    name, n = base, 2
    while taken is not None and name in taken:
        name, n = f"{base}-{n}", n + 1
    if taken is not None:
        taken.add(name)
    return Path(out_dir) / name


def write_attention_files(
    maps: AttentionMaps,
    out_dir: str | Path,
    layer: int | None = None,
    head: int = 1,
    html_page: bool = False,
) -> list[Path]:
    """Everything `vaswani attention` writes for one input, into `out_dir`: for each attention kind a grid
    of heads per layer (`{kind}_layer{L}.png`) and one head at full size (`{kind}_layer{L}_head{H}.png`,
    default: the last layer, head 1); a classifier's [CLS] plot (`cls.png`); with `html_page`,
    `attention.html`. Layer and head are checked for every kind before anything is written."""
    out_dir = Path(out_dir)
    chosen = {}
    for name in maps.maps:
        chosen[name] = maps.n_layers(name) if layer is None else layer
        maps.layer(name, chosen[name])
        maps.check_head(name, head)
    written = []
    for name in maps.maps:
        for index in range(1, maps.n_layers(name) + 1):
            written.append(plot_layer_grid(maps, name, index, out_dir / f"{name}_layer{index}.png"))
        path = out_dir / f"{name}_layer{chosen[name]}_head{head}.png"
        written.append(plot_head(maps, name, chosen[name], head, path))
    if maps.kind == "classification":
        written.append(plot_cls_attention(maps, out_dir / "cls.png"))
    if html_page:
        title = f"Attention: {maps.text[:80]}"
        written.append(write_attention_html(maps, out_dir / "attention.html", title))
    return written
