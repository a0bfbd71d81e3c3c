"""Hugging Face checkpoints -> vaswani configs and state dicts, tensor by tensor, with nothing left over.

Two families are mapped:
- Marian (`MarianMTModel`): post-LN encoder-decoder with [sin | cos] positions ("sinusoidal_concat"),
  embeddings scaled by sqrt(d_model) when `scale_embedding`, swish/GELU/ReLU, a fixed `final_logits_bias`,
  shared (or separate) embeddings, an output projection tied (or not) to the target embeddings, and
  decoding that starts from the pad token.
- BERT (`BertModel` and its relatives of model_type "bert", such as MiniLM): learned positions, token-type
  embeddings, a LayerNorm on the embeddings, GELU, post-LN with the checkpoint's epsilon.

Every tensor of the vaswani model is filled from named checkpoint tensors, shapes checked; every checkpoint
tensor must be used, or be a copy that is checked equal to what it copies (Marian's positional table and
its repeated embeddings), or be one of the few named tensors vaswani has no place for (BERT's pooler),
which are reported. Anything else is an `HFImportError` naming the key and the shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vaswani.config import TransformerConfig
from vaswani.hub.tokenizers import read_json_object
from vaswani.layers import sinusoidal_table

SUPPORTED = "Marian (MarianMTModel) and BERT-family encoders (BertModel, model_type 'bert')"
_MARIAN_ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu"}
# BERT's pooler (a dense + tanh over [CLS], trained for next-sentence prediction) has no place in vaswani:
# its classifier reads the [CLS] state or the mean of the token states directly.
_BERT_UNUSED = {"pooler.dense.weight", "pooler.dense.bias"}


class HFImportError(ValueError):
    """A checkpoint vaswani cannot import exactly; the message names the key, file or field."""


@dataclass
class Converted:
    """A checkpoint in vaswani terms: its config, its tensors under vaswani names, what was left out."""

    family: str  # "marian" or "bert"
    config: TransformerConfig
    tensors: dict[str, Tensor]
    unused: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- reading files
def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    return read_json_object(path, HFImportError)


def read_state_dict(directory: Path) -> dict[str, Tensor]:
    """The checkpoint's tensors: model.safetensors (or its shards), else pytorch_model.bin loaded with
    `weights_only=True` (no code in the file can run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)

    def load(path: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:  # truncated, tampered, or not safetensors at all
            raise HFImportError(f"{path}: not a readable safetensors file ({error})") from None

    if (directory / "model.safetensors").is_file():
        return load(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, HFImportError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFImportError(f"{index}: no weight_map of tensor names to shard files")
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            # The index comes with a downloaded checkpoint: its file names must stay inside the directory.
            if Path(shard).name != shard or shard.startswith(".") or "\\" in shard:
                raise HFImportError(f"{index}: shard name {shard!r} points outside the directory")
            tensors.update(load(directory / shard))
        return tensors
    if (directory / "pytorch_model.bin").is_file():
        try:
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as error:  # anything that fails to unpickle safely is refused the same way
            raise HFImportError(
                f"{directory / 'pytorch_model.bin'}: cannot be loaded safely: {unpickling_reason(error)}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise HFImportError(f"{directory / 'pytorch_model.bin'}: not a state dict of tensors")
        return state
    raise HFImportError(f"{directory}: no model.safetensors or pytorch_model.bin")


def unpickling_reason(error: Exception) -> str:
    """One line from torch.load(weights_only=True)'s refusal: the reason (an unsupported operand, a blocked
    global such as posix.system). torch's full message runs over several lines and suggests retrying with
    weights_only=False, which is not advice to pass on about a file from elsewhere."""
    lines = [line.strip() for line in str(error).splitlines()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reasons = [line for line in lines if line and not line.startswith(boilerplate)]
    return reasons[0] if reasons else type(error).__name__


def family_of(config: dict[str, Any]) -> str:
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type == "marian":
        if architectures and architectures != ["MarianMTModel"]:
            raise HFImportError(f"architecture {architectures}: of Marian, only MarianMTModel is supported")
        return "marian"
    if model_type == "bert":
        if architectures and architectures != ["BertModel"]:
            raise HFImportError(
                f"architecture {architectures}: of BERT, only the encoder (BertModel) is supported; "
                "fine-tune a classifier from it with init_from"
            )
        return "bert"
    raise HFImportError(
        f"model_type {model_type!r} ({', '.join(architectures) or '?'}): vaswani imports {SUPPORTED}"
    )


def _field(config: dict[str, Any], name: str, default: Any = None) -> Any:
    value = config.get(name, default)
    if value is None:
        raise HFImportError(f"config.json: missing {name}")
    return value


def _require(config: dict[str, Any], name: str, expected: Any, default: Any = None) -> None:
    value = config.get(name, default)
    if value != expected:
        raise HFImportError(f"config.json: {name} = {value!r} is not supported (vaswani maps {expected!r})")


# ---------------------------------------------------------------------------------------- configs
def _separate_copies(state: dict[str, Tensor]) -> bool:
    """Whether a checkpoint that says "shared embeddings" holds encoder and decoder embeddings that differ
    from `model.shared`: transformers 5 ties nothing when tie_word_embeddings is false, so such a model
    embeds with its own encoder and decoder matrices and never reads `model.shared`."""
    shared = state.get("model.shared.weight")
    keys = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    copies = [state[k] for k in keys if k in state]
    if shared is None or len(copies) != 2:
        return False
    return any(c.shape != shared.shape or not torch.equal(c, shared) for c in copies)


def marian_config(config: dict[str, Any], state: dict[str, Tensor]) -> TransformerConfig:
    for a, b in (
        ("encoder_ffn_dim", "decoder_ffn_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
    ):
        if _field(config, a) != _field(config, b):
            raise HFImportError(f"config.json: {a}={config[a]} != {b}={config[b]}; vaswani has one value")
    activation = _field(config, "activation_function", "gelu")
    if activation not in _MARIAN_ACTIVATIONS:
        raise HFImportError(f"config.json: activation_function {activation!r} is not supported")
    _require(config, "normalize_before", False, False)
    _require(config, "add_final_layer_norm", False, False)
    shared = bool(config.get("share_encoder_decoder_embeddings", True))
    if shared and not config.get("tie_word_embeddings", True) and _separate_copies(state):
        shared = False
    vocab = _field(config, "vocab_size")
    decoder_vocab = config.get("decoder_vocab_size") or vocab
    if shared and decoder_vocab != vocab:
        raise HFImportError(
            f"config.json: shared embeddings but decoder_vocab_size {decoder_vocab} != {vocab}"
        )
    try:
        return TransformerConfig(
            vocab_size=vocab,
            tgt_vocab_size=None if shared else decoder_vocab,
            d_model=_field(config, "d_model"),
            n_heads=config["encoder_attention_heads"],
            d_ff=config["encoder_ffn_dim"],
            n_encoder_layers=_field(config, "encoder_layers"),
            n_decoder_layers=_field(config, "decoder_layers"),
            dropout=float(config.get("dropout", 0.1)),
            attention_dropout=float(config.get("attention_dropout", 0.0)),
            activation_dropout=float(config.get("activation_dropout", 0.0)),
            max_len=_field(config, "max_position_embeddings"),
            pad_id=_field(config, "pad_token_id"),
            bos_id=_field(config, "decoder_start_token_id"),
            eos_id=_field(config, "eos_token_id"),
            share_embeddings=shared,
            tie_output=bool(config.get("tie_word_embeddings", True)),
            scale_embeddings=bool(config.get("scale_embedding", False)),
            norm_first=False,
            activation=_MARIAN_ACTIVATIONS[activation],
            positional="sinusoidal_concat",
            layer_norm_eps=1e-5,  # Marian's nn.LayerNorm default
            final_logits_bias=True,
        )
    except ValueError as error:
        raise HFImportError(f"config.json does not make a vaswani config: {error}") from None


def bert_config(config: dict[str, Any], special: dict[str, int | None]) -> TransformerConfig:
    _require(config, "position_embedding_type", "absolute", "absolute")
    _require(config, "is_decoder", False, False)
    _require(config, "add_cross_attention", False, False)
    if _field(config, "hidden_act", "gelu") != "gelu":
        raise HFImportError(
            f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'gelu')"
        )
    pad = config.get("pad_token_id", 0)
    if special["pad"] != pad:
        raise HFImportError(f"the tokenizer's pad id {special['pad']} differs from config.json's {pad}")
    try:
        return TransformerConfig(
            vocab_size=_field(config, "vocab_size"),
            d_model=_field(config, "hidden_size"),
            n_heads=_field(config, "num_attention_heads"),
            d_ff=_field(config, "intermediate_size"),
            n_encoder_layers=_field(config, "num_hidden_layers"),
            n_decoder_layers=0,
            dropout=float(config.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", 0.1)),
            activation_dropout=0.0,
            max_len=_field(config, "max_position_embeddings"),
            pad_id=pad,
            bos_id=special["bos"],
            eos_id=special["eos"],
            cls_id=special["cls"],
            scale_embeddings=False,
            norm_first=False,
            activation="gelu",
            positional="learned",
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            embedding_norm=True,
        )
    except ValueError as error:
        raise HFImportError(f"config.json does not make a vaswani config: {error}") from None


# ---------------------------------------------------------------------------------------- tensors
Rule = tuple[str, list[str]]  # vaswani key <- checkpoint keys (several are concatenated along dim 0)


def _attention_rules(target: str, source: str, q: str, k: str, v: str, out: str) -> list[Rule]:
    return [
        (f"{target}.in_proj_weight", [f"{source}.{n}.weight" for n in (q, k, v)]),
        (f"{target}.in_proj_bias", [f"{source}.{n}.bias" for n in (q, k, v)]),
        (f"{target}.out_proj.weight", [f"{source}.{out}.weight"]),
        (f"{target}.out_proj.bias", [f"{source}.{out}.bias"]),
    ]


def _linear_rules(target: str, source: str) -> list[Rule]:
    return [(f"{target}.weight", [f"{source}.weight"]), (f"{target}.bias", [f"{source}.bias"])]


def marian_rules(cfg: TransformerConfig) -> tuple[list[Rule], dict[str, str]]:
    """The rules, and the checkpoint's redundant copies: key -> the key whose tensor it must equal."""
    enc_tokens = "model.shared.weight" if cfg.share_embeddings else "model.encoder.embed_tokens.weight"
    dec_tokens = "model.shared.weight" if cfg.share_embeddings else "model.decoder.embed_tokens.weight"
    rules: list[Rule] = [("src_embed.tokens.weight", [enc_tokens]), ("tgt_embed.tokens.weight", [dec_tokens])]
    attention = ("q_proj", "k_proj", "v_proj", "out_proj")
    for i in range(cfg.n_encoder_layers):
        t, s = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        rules += _attention_rules(f"{t}.self_attn", f"{s}.self_attn", *attention)
        rules += _linear_rules(f"{t}.attn_block.norm", f"{s}.self_attn_layer_norm")
        rules += _linear_rules(f"{t}.feed_forward.linear1", f"{s}.fc1")
        rules += _linear_rules(f"{t}.feed_forward.linear2", f"{s}.fc2")
        rules += _linear_rules(f"{t}.ff_block.norm", f"{s}.final_layer_norm")
    for i in range(cfg.n_decoder_layers):
        t, s = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        rules += _attention_rules(f"{t}.self_attn", f"{s}.self_attn", *attention)
        rules += _linear_rules(f"{t}.self_block.norm", f"{s}.self_attn_layer_norm")
        rules += _attention_rules(f"{t}.cross_attn", f"{s}.encoder_attn", *attention)
        rules += _linear_rules(f"{t}.cross_block.norm", f"{s}.encoder_attn_layer_norm")
        rules += _linear_rules(f"{t}.feed_forward.linear1", f"{s}.fc1")
        rules += _linear_rules(f"{t}.feed_forward.linear2", f"{s}.fc2")
        rules += _linear_rules(f"{t}.ff_block.norm", f"{s}.final_layer_norm")
    rules.append(("output_projection.weight", [dec_tokens if cfg.tie_output else "lm_head.weight"]))
    rules.append(("final_logits_bias", ["final_logits_bias"]))
    copies: dict[str, str] = {}
    if cfg.share_embeddings:
        copies.update({k: "model.shared.weight" for k in ("model.encoder.embed_tokens.weight",)})
        copies["model.decoder.embed_tokens.weight"] = "model.shared.weight"
    if cfg.tie_output:
        copies["lm_head.weight"] = dec_tokens
    return rules, copies


def bert_rules(cfg: TransformerConfig, prefix: str = "") -> list[Rule]:
    p = prefix
    rules: list[Rule] = [
        ("embed.tokens.weight", [f"{p}embeddings.word_embeddings.weight"]),
        ("embed.positions.weight", [f"{p}embeddings.position_embeddings.weight"]),
        ("embed.token_types.weight", [f"{p}embeddings.token_type_embeddings.weight"]),
        *_linear_rules("embed.norm", f"{p}embeddings.LayerNorm"),
    ]
    for i in range(cfg.n_encoder_layers):
        t, s = f"encoder.layers.{i}", f"{p}encoder.layer.{i}"
        rules += _attention_rules(
            f"{t}.self_attn", f"{s}.attention", "self.query", "self.key", "self.value", "output.dense"
        )
        rules += _linear_rules(f"{t}.attn_block.norm", f"{s}.attention.output.LayerNorm")
        rules += _linear_rules(f"{t}.feed_forward.linear1", f"{s}.intermediate.dense")
        rules += _linear_rules(f"{t}.feed_forward.linear2", f"{s}.output.dense")
        rules += _linear_rules(f"{t}.ff_block.norm", f"{s}.output.LayerNorm")
    return rules


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def apply_rules(
    rules: list[Rule], state: dict[str, Tensor], expected: dict[str, Tensor]
) -> tuple[dict[str, Tensor], set[str]]:
    """Build the vaswani tensors from `state` by `rules`; `expected` (a model's state dict) gives the
    shapes. Returns the tensors and the checkpoint keys used."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for target, sources in rules:
        for key in sources:
            if key not in state:
                want = _shape(expected[target]) if target in expected else "?"
                raise HFImportError(f"missing tensor {key} (for {target}, shape {want})")
        parts = [state[key] for key in sources]
        if len(parts) > 1 and len({_shape(p)[1:] for p in parts}) != 1:
            shapes = ", ".join(f"{k} {_shape(state[k])}" for k in sources)
            raise HFImportError(f"tensors that make {target} do not fit together: {shapes}")
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if target not in expected:
            raise HFImportError(f"{sources[0]} has no place in the vaswani model (no {target})")
        if _shape(tensor) != _shape(expected[target]):
            raise HFImportError(
                f"{' + '.join(sources)} has shape {_shape(tensor)}, but vaswani's {target} is "
                f"{_shape(expected[target])}"
            )
        out[target] = tensor.detach().to(torch.float32).clone()
        used.update(sources)
    return out, used


def check_copies(
    state: dict[str, Tensor], copies: dict[str, Callable[[], Tensor] | str], used: set[str]
) -> None:
    """A redundant checkpoint tensor must equal what it repeats: checked, never silently ignored."""
    for key, original in copies.items():
        if key not in state:
            continue
        reference = state[original] if isinstance(original, str) else original()
        if _shape(state[key]) != _shape(reference) or not torch.allclose(
            state[key].float(), reference.float(), atol=1e-5, rtol=0
        ):
            name = original if isinstance(original, str) else "the value vaswani computes"
            raise HFImportError(
                f"{key} {_shape(state[key])} differs from {name} {_shape(reference)}: "
                "vaswani has one tensor for both"
            )
        used.add(key)


def _leftovers(state: dict[str, Tensor], used: set[str]) -> None:
    extra = sorted(set(state) - used)
    if extra:
        listed = ", ".join(f"{k} {_shape(state[k])}" for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise HFImportError(f"unexpected tensor(s) that vaswani cannot place: {listed}{more}")


def convert_marian(config: dict[str, Any], state: dict[str, Tensor], model: nn.Module) -> Converted:
    cfg = model.config
    rules, copies = marian_rules(cfg)
    tensors, used = apply_rules(rules, state, model.state_dict())
    unused = []
    if not cfg.share_embeddings and config.get("share_encoder_decoder_embeddings", True):
        unused = ["model.shared.weight"]  # see _separate_copies: the model never reads it
        used.update(unused)
    # Older checkpoints store the fixed sinusoidal table: it must be the one vaswani computes.
    table = sinusoidal_table(cfg.max_len, cfg.d_model, "concat")
    checked: dict[str, Callable[[], Tensor] | str] = dict(copies)
    for side in ("encoder", "decoder"):
        key = f"model.{side}.embed_positions.weight"
        if key in state:
            checked[key] = lambda rows=state[key].shape[0]: table[:rows]
    check_copies(state, checked, used)
    _leftovers(state, used)
    return Converted("marian", cfg, tensors, unused)


def convert_bert(config: dict[str, Any], state: dict[str, Tensor], model: nn.Module) -> Converted:
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    state = {
        k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
        for k, v in state.items()
    }
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
    tensors, used = apply_rules(bert_rules(model.config, prefix), state, model.state_dict())
    position_ids = f"{prefix}embeddings.position_ids"
    if position_ids in state:  # a saved buffer arange(max_len), no weight
        flat = {position_ids: state[position_ids].flatten().float()}
        arange = torch.arange(flat[position_ids].numel()).float()
        check_copies(flat, {position_ids: lambda: arange}, used)
    unused = sorted(k for k in state if k[len(prefix) :] in _BERT_UNUSED)
    used.update(unused)
    _leftovers(state, used)
    return Converted("bert", model.config, tensors, unused)
