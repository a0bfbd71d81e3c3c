"""ONNX export of a run's model, for serving without PyTorch (onnxruntime).

- Classifier: `classifier.onnx`, ids (batch, seq) int64 -> logits (batch, n_classes). [CLS] is prepended
  inside the graph, as `TransformerClassifier.forward` does; append the tokenizer's suffix ([SEP]) yourself.
- Encoder (an imported BERT-family encoder): `encoder.onnx`, ids and attention_mask (batch, seq) int64
  (Hugging Face's 1 = token, 0 = padding) -> hidden (batch, seq, d_model).
- Encoder-decoder: `encoder.onnx`, src (batch, src_len) -> memory (batch, src_len, d_model) and src_mask
  (batch, src_len) bool (True = real token); and `decoder_step.onnx`, one decoding step with a KV cache:
  tokens (batch, 1), memory, src_mask, past_key_i / past_value_i (batch, heads, past_len, head_dim) per
  decoder layer -> logits (batch, vocab) of the next token, present_key_i / present_value_i (past_len + 1).
  The first step feeds BOS with past_len = 0; each later step feeds the chosen token and the presents.

Batch and sequence axes are dynamic. Every graph is run once with onnxruntime on other shapes than the
traced ones and compared with PyTorch before the export is reported done.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaswani.attention import scaled_dot_product_attention
from vaswani.models import Transformer, TransformerClassifier, TransformerEncoder

FORMATS = ("onnx",)
OPSET = 17
EXPORT_INFO = "export.json"


class ExportError(ValueError):
    """A model or run that cannot be exported; one line."""


class _Classifier(nn.Module):
    def __init__(self, model: TransformerClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)


class _Encoder(nn.Module):
    def __init__(self, model: TransformerEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode(ids, attention_mask=attention_mask)


class _Seq2SeqEncoder(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        memory, mask, _ = self.model.encode(src)
        return memory, mask[:, 0, 0, :]


class DecoderStep(nn.Module):
    """One decoder step of a `Transformer` as a pure function of its caches (the graph cannot keep the
    in-place, preallocated `KVCache`): self-attention keys and values come in as `past` and go out grown by
    one position. Same layers, same weights, same arithmetic as `Transformer.decode` with a cache."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, memory: Tensor, src_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        start = past[0].shape[2]
        positions = torch.arange(tokens.shape[1], device=tokens.device) + start
        x = model.tgt_embed(tokens, positions)
        memory_mask = src_mask[:, None, None, :]
        presents: list[Tensor] = []
        for i, layer in enumerate(model.decoder.layers):
            attention = layer.self_attn

            def self_attention(h: Tensor, i: int = i, attention=attention) -> tuple[Tensor, None]:
                q, k, v = F.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
                q, k, v = attention._split_heads(q), attention._split_heads(k), attention._split_heads(v)
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                presents.extend((k, v))
                # One new query attends to every cached key: no mask needed.
                out, _ = scaled_dot_product_attention(q, k, v, impl=attention.impl)
                batch, _, length, _ = out.shape
                return attention.out_proj(out.transpose(1, 2).reshape(batch, length, attention.d_model)), None

            x, _ = layer.self_block(x, self_attention)
            x, _ = layer.cross_block(x, lambda h, layer=layer: layer.cross_attn(h, memory, mask=memory_mask))
            x, _ = layer.ff_block(x, lambda h, layer=layer: (layer.feed_forward(h), None))
        if model.decoder.final_norm is not None:
            x = model.decoder.final_norm(x)
        return (model.logits(x[:, -1]), *presents)


def past_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _onnx_export(module: nn.Module, args: tuple, path: Path, inputs, outputs, axes) -> None:
    # The exporter restores the wrapper's training flag on the way out, recursively: a wrapper left in
    # training mode would switch the model's dropout on for everything after the export.
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns about its own deprecation and about traced shape arithmetic
        # (positions from the cache length): the graph is checked against PyTorch right after.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _check(path: Path, feeds: dict[str, Tensor], expected: list[Tensor], atol: float = 1e-4) -> float:
    """Run the exported graph with onnxruntime and compare with PyTorch's outputs; returns the max error."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    worst = 0.0
    for name, ours, theirs in zip([o.name for o in session.get_outputs()], expected, got, strict=True):
        theirs = torch.from_numpy(theirs)
        if ours.dtype == torch.bool:
            error = float((ours != theirs).sum())
        else:
            error = float((ours.float() - theirs.float()).abs().max()) if ours.numel() else 0.0
        if error > atol:
            raise ExportError(f"{path.name}: output {name} differs from PyTorch by {error:.2e} (> {atol})")
        worst = max(worst, error)
    return worst


def _example_ids(cfg, batch: int, length: int, generator: torch.Generator) -> Tensor:
    """Random non-special ids, the last row shortened with padding (exercises the mask)."""
    special = {cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.classifier_cls_id}
    ordinary = torch.tensor([i for i in range(min(cfg.vocab_size, 1000)) if i not in special])
    ids = ordinary[torch.randint(len(ordinary), (batch, length), generator=generator)]
    if batch > 1 and length > 2:
        ids[-1, length // 2 :] = cfg.pad_id
    return ids


def export_model(model: nn.Module, out_dir: str | Path) -> dict:
    """Export `model` into `out_dir` (see the module docstring); returns the export description that is
    also written to out_dir/export.json."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx extra: pip install 'vaswani[onnx]'") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    info: dict = {"opset": OPSET, "pad_id": cfg.pad_id, "bos_id": cfg.bos_id, "eos_id": cfg.eos_id}
    with torch.no_grad():
        if isinstance(model, TransformerClassifier):
            path = out / "classifier.onnx"
            _onnx_export(
                _Classifier(model),
                (_example_ids(cfg, 2, 7, generator),),
                path,
                ["ids"],
                ["logits"],
                {"ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}},
            )
            ids = _example_ids(cfg, 3, 11, generator)
            error = _check(path, {"ids": ids}, [model(ids)])
            info.update(kind="classifier", files=[path.name], cls_id=cfg.classifier_cls_id, max_error=error)
        elif isinstance(model, TransformerEncoder):
            path = out / "encoder.onnx"
            ids = _example_ids(cfg, 2, 7, generator)
            _onnx_export(
                _Encoder(model),
                (ids, (ids != cfg.pad_id).long()),
                path,
                ["ids", "attention_mask"],
                ["hidden"],
                {n: {0: "batch", 1: "seq"} for n in ("ids", "attention_mask", "hidden")},
            )
            ids = _example_ids(cfg, 3, 11, generator)
            mask = (ids != cfg.pad_id).long()
            error = _check(path, {"ids": ids, "attention_mask": mask}, [model.encode(ids, mask)])
            info.update(kind="encoder", files=[path.name], max_error=error)
        elif isinstance(model, Transformer):
            info.update(kind="encoder-decoder", **_export_seq2seq(model, out, generator))
        else:
            raise ExportError(
                f"cannot export a {type(model).__name__}: export takes classifiers, encoders and "
                "encoder-decoders"
            )
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _export_seq2seq(model: Transformer, out: Path, generator: torch.Generator) -> dict:
    cfg = model.config
    if cfg.n_decoder_layers < 1:
        raise ExportError("an encoder-decoder with no decoder layers has no decoder step to export")
    layers, heads, head_dim = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim
    encoder_path, step_path = out / "encoder.onnx", out / "decoder_step.onnx"
    src = _example_ids(cfg, 2, 7, generator)
    _onnx_export(
        _Seq2SeqEncoder(model),
        (src,),
        encoder_path,
        ["src"],
        ["memory", "src_mask"],
        {
            "src": {0: "batch", 1: "src_len"},
            "memory": {0: "batch", 1: "src_len"},
            "src_mask": {0: "batch", 1: "src_len"},
        },
    )
    memory, mask, _ = model.encode(src)
    src_mask = mask[:, 0, 0, :]
    past = [torch.randn(2, heads, 3, head_dim, generator=generator) for _ in range(2 * layers)]
    tokens = _example_ids(cfg, 2, 1, generator)
    inputs = ["tokens", "memory", "src_mask", *past_names(layers, "past")]
    outputs = ["logits", *past_names(layers, "present")]
    axes = {
        "tokens": {0: "batch"},
        "memory": {0: "batch", 1: "src_len"},
        "src_mask": {0: "batch", 1: "src_len"},
    }
    axes["logits"] = {0: "batch"}
    axes.update({n: {0: "batch", 2: "past_len"} for n in past_names(layers, "past")})
    axes.update({n: {0: "batch", 2: "past_len_plus_1"} for n in past_names(layers, "present")})
    step = DecoderStep(model).eval()
    _onnx_export(step, (tokens, memory, src_mask, *past), step_path, inputs, outputs, axes)

    # Check on other shapes: encoder, then three cached steps from an empty cache, against PyTorch's own
    # cached decoding (Transformer.decode with a DecoderCache).
    from vaswani.layers import DecoderCache

    src = _example_ids(cfg, 3, 9, generator)
    memory, mask, _ = model.encode(src)
    src_mask = mask[:, 0, 0, :]
    worst = _check(encoder_path, {"src": src}, [memory, src_mask])
    cache = DecoderCache(layers, capacity=8)
    past = [torch.zeros(3, heads, 0, head_dim) for _ in range(2 * layers)]
    tokens = torch.full((3, 1), cfg.bos_id, dtype=torch.long)
    for _ in range(3):
        expected = model.decode(tokens, memory, mask, cache=cache)[0][:, -1]
        presents = list(step(tokens, memory, src_mask, *past)[1:])
        feeds = {"tokens": tokens, "memory": memory, "src_mask": src_mask}
        feeds.update(dict(zip(past_names(layers, "past"), past, strict=True)))
        worst = max(worst, _check(step_path, feeds, [expected, *presents]))
        past = presents
        tokens = expected.argmax(dim=-1, keepdim=True)
    return {
        "files": [encoder_path.name, step_path.name],
        "decoder_layers": layers,
        "heads": heads,
        "head_dim": head_dim,
        "max_len": cfg.max_len,
        "max_error": worst,
    }


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "onnx") -> dict:
    """Export a run's final model (`vaswani export RUN_DIR --format onnx`) into RUN_DIR/onnx (or
    `out_dir`), with a copy of the run's tokenizer beside it."""
    from vaswani.runs import load_run
    from vaswani.tasks import TOKENIZER_FILE

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: supported formats are {', '.join(FORMATS)}")
    run = load_run(run_dir, device="cpu")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "onnx"
    info = export_model(run.model, out)
    shutil.copyfile(Path(run_dir) / TOKENIZER_FILE, out / TOKENIZER_FILE)
    info["directory"] = str(out)
    return info
