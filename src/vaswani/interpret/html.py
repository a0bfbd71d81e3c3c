"""Attention maps as one self-contained, interactive HTML page.

The page itself is `attention.html` next to this module, a template with two holes: `__TITLE__` (filled
with the escaped title) and `__DATA__` (the maps as JSON, read by the page's script). Its CSS and
JavaScript are inline and it fetches nothing, so the written file opens anywhere, offline.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vaswani.interpret.maps import COLORMAP, AttentionMaps, axis_names, title_of

_TEMPLATE = "attention.html"  # next to this module; shipped as package data


def attention_page_data(maps: AttentionMaps, title: str) -> dict[str, Any]:
    """What the attention page reads: every kind, layer and head of `maps` with its tokens and colours (also
    what `vaswani serve` answers to POST /v1/attention, for its playground)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    kinds = {}
    for name in maps.maps:
        queries, keys = maps.axes(name)
        rows_name, columns_name = axis_names(maps, name)
        # Decoder-side row i reads token i and predicts token i + 1: the page says which, since a row that
        # "looks at the wrong word" is usually looking at the source of the next one.
        predicts = None
        if name != "encoder":
            following = "</s>" if maps.kind == "translation" else None
            predicts = [*queries[1:], following]
        kinds[name] = {
            "label": title_of(maps, name),
            "queries": queries,
            "predicts": predicts,
            "keys": keys,
            "rows": rows_name,
            "columns": columns_name,
            # Four decimals: far finer than a colour can show, and a much smaller file than full floats.
            "layers": [np.round(layer.astype(np.float64), 4).tolist() for layer in maps.maps[name]],
        }
    return {
        "title": title,
        "kind": maps.kind,
        "text": maps.text,
        "target": maps.target,
        "prediction": maps.prediction,
        "colors": [to_hex(c) for c in colormaps[COLORMAP](np.linspace(0.0, 1.0, 17))],
        "kinds": kinds,
    }


def attention_page_template() -> str:
    """The page with its two holes (`__TITLE__`, `__DATA__`) unfilled: the server's playground fills them in
    the browser, so that one viewer serves both the written files and the playground."""
    return resources.files("vaswani.interpret").joinpath(_TEMPLATE).read_text(encoding="utf-8")


def write_attention_html(maps: AttentionMaps, path: str | Path, title: str = "Attention") -> Path:
    """One self-contained HTML page (inline CSS and JavaScript, the maps embedded as JSON, nothing fetched
    from the network) to browse every attention kind, layer and head, or the mean of a layer's heads.

    The heatmap is drawn with the PNGs' colours on a 0-1 scale. Hovering a token (or a row of the heatmap)
    colours the key tokens by how much it attends to them, as a sentence, which is how alignments are
    easiest to read; hovering a key shows which queries attend to it; a click pins the choice. The
    weights are stored to 4 decimals. Returns the path written.
    """
    data = json.dumps(attention_page_data(maps, title), ensure_ascii=False, separators=(",", ":"))
    # Inside <script>, "</script>" or "<!--" in a token would end the block: escape every "<".
    data = data.replace("<", "\\u003c")
    page = attention_page_template().replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
