"""Looking inside a trained model: attention maps as pictures and as one interactive HTML page, and the
sanity plots of the Annotated Transformer (positional encodings, masks, the learning-rate schedule, label
smoothing), drawn from the library's own functions.

maps.py     computing the attention maps of one input (`attention_maps`, `AttentionMaps`), token labels
plots.py    the maps as PNGs: a layer's heads, one head, a classifier's [CLS] row; all files for one input
html.py     the maps as one self-contained HTML page (the page itself: attention.html)
images.py   a Vision Transformer's maps of one image, and its [CLS] attention drawn over the image
sanity.py   positional encodings, masks, the learning-rate schedule, label smoothing
"""

from vaswani.interpret.html import write_attention_html
from vaswani.interpret.images import ImageAttention, image_attention_maps, plot_image_attention
from vaswani.interpret.maps import COLORMAP, AttentionMaps, attention_maps, readable_token, title_of
from vaswani.interpret.plots import (
    output_dir_for,
    plot_cls_attention,
    plot_head,
    plot_layer_grid,
    write_attention_files,
)
from vaswani.interpret.sanity import (
    SANITY_PLOTS,
    plot_label_smoothing,
    plot_lr_schedule,
    plot_masks,
    plot_positional_encoding,
    smoothed_target_distribution,
    write_sanity_plots,
)

__all__ = [
    "COLORMAP",
    "SANITY_PLOTS",
    "AttentionMaps",
    "ImageAttention",
    "attention_maps",
    "image_attention_maps",
    "output_dir_for",
    "plot_cls_attention",
    "plot_head",
    "plot_image_attention",
    "plot_label_smoothing",
    "plot_layer_grid",
    "plot_lr_schedule",
    "plot_masks",
    "plot_positional_encoding",
    "readable_token",
    "smoothed_target_distribution",
    "title_of",
    "write_attention_files",
    "write_attention_html",
    "write_sanity_plots",
]
