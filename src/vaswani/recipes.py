"""Recipes: one TOML file that says how to train a model (the model, the data, the optimisation, decoding).

The one configuration system of the library: dataclasses, filled from a TOML file, changed with
`--set section.key=value` overrides, validated on load. A wrong key or value fails with one line naming it
(`[train] warmup_step: unknown key (did you mean warmup_steps?)`). The model section holds the fields of
`TransformerConfig` (plus `preset`); the vocabulary size and special-token ids come from the tokenizer. For
`task = "image_classification"` it holds the fields of `VisionConfig` instead; the image size, channels
and number of classes come from the dataset.

Fine-tuning: `[model] init_from` names pretrained weights ("hf:DIR" for a Hugging Face checkpoint, "hf:pkg:
MODULE/DIR" for one inside an installed package, or a vaswani run directory). The architecture is then the
checkpoint's: the model section may only change the dropout rates, the attention implementation and the
classifier's pooling (`INIT_FROM_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaswani.config import TransformerConfig, VisionConfig
from vaswani.data.datasets import FINE_LABEL_DATASETS
from vaswani.data.images import AUGMENTATIONS, IMAGE_DATASETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# "encoder": an imported BERT-family encoder (vaswani import-hf); used, not trained.
# "mlm": masked language modelling, the self-supervised pretraining of a classifier's encoder.
TASKS = ("translation", "classification", "lm", "encoder", "image_classification", "mlm")
TOKENIZERS = ("bpe", "wordpiece", "chars")
SCHEDULES = ("noam", "inverse_sqrt", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")
DISTRIBUTED = ("ddp", "fsdp")
PRESETS = ("base", "big", "small", "tiny")
# What `[train] device` may name; anything else would reach torch.device and fail with a traceback.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
VISION_PRESETS = ("base", "large", "huge")  # the ViT paper's Table 1
# Set from the tokenizer and the data, never by hand.
DERIVED_MODEL_FIELDS = (
    "vocab_size",
    "tgt_vocab_size",
    "pad_id",
    "bos_id",
    "eos_id",
    "cls_id",
    "n_classes",
    "fine_to_class",
)
DERIVED_VISION_FIELDS = ("image_size", "channels", "n_classes")
# What a recipe may still set when the architecture comes from `init_from`.
INIT_FROM_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "attention_impl", "pooling")


class RecipeError(ValueError):
    """A recipe file or override that cannot work; the message is one line naming the key."""


@dataclass
class DataSection:
    """What to train on and how to cut it into batches."""

    task: str = "translation"  # translation | classification | lm | image_classification | mlm
    # multi30k | trec | trec-fine | sst2 | sst5 | bbc_news | ag_news | tiny_shakespeare | files;
    # images: digits | mnist | cifar10
    dataset: str = "multi30k"
    data_dir: str | None = None  # else VASWANI_DATA, ../shared/data, the user cache
    src_lang: str = "en"
    tgt_lang: str = "de"
    # dataset = "files": the user's own data (parallel text files, or TSV/CSV/JSONL with text and label)
    train_src: str | None = None
    train_tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    test_src: str | None = None
    test_tgt: str | None = None
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"  # may join splits, "train+valid": a final model once the settings are chosen
    valid_split: str = "valid"
    test_split: str = "test"
    limit_train: int | None = None  # use only the first N training examples (quick runs, tests)
    limit_valid: int | None = None
    tokenizer: str = "bpe"  # bpe | wordpiece | chars
    vocab_size: int = 8000
    lowercase: bool = False
    max_tokens: int = 4096  # padded tokens per batch and side (the paper: about 25,000)
    max_sentences: int | None = None
    max_len: int = 256  # translation: longer pairs are left out of training; classification: truncated
    block_size: int = 256  # lm: tokens per training window
    batch_size: int = 32  # lm: windows per batch; image_classification: images per batch
    windows_per_epoch: int = 1000  # lm: random windows that make one "epoch"
    # classification: each training token becomes [UNK] with this probability, drawn afresh every epoch
    # (word dropout, Iyyer et al. 2015: a regulariser for small data sets trained from scratch)
    word_dropout: float = 0.0
    # classification of trec or sst2: also train a second head on the finer labels of the same examples
    # (TREC's 50 classes, SST-5's five grades, neutral sentences included); the prediction averages the two
    # heads' class probabilities (TransformerClassifier, fine_to_class)
    fine_labels: bool = False
    # mlm: the share of real tokens to predict (BERT's 15%), each replaced by <unk> 80% of the time, by a
    # random token 10%, kept 10%
    mask_prob: float = 0.15
    augment: str = "none"  # images: none | crop_flip (pad, random crop, horizontal flip)
    crop_padding: int = 4  # images, crop_flip: zero pixels added on each side before cropping


@dataclass
class TrainSection:
    """Optimisation (§5.3-5.4 of the paper by default) and run bookkeeping."""

    max_steps: int = 100_000
    max_epochs: int | None = None
    max_minutes: float | None = None  # stop after this wall time (makes the run length machine-dependent)
    lr_schedule: str = "noam"  # noam (§5.3) | inverse_sqrt | cosine | constant
    lr_scale: float = 1.0  # noam: factor on d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    lr: float = 5e-4  # peak learning rate of inverse_sqrt / cosine / constant
    min_lr: float = 0.0  # cosine: the floor
    warmup_steps: int = 4000
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    optimizer: str = "adam"  # adam (the paper, §5.3) | adamw (decoupled decay, matrices only)
    weight_decay: float = 0.0  # adam: L2 added to the gradient; adamw: decoupled (Loshchilov & Hutter)
    label_smoothing: float = 0.1
    grad_accum: int = 1
    clip_norm: float = 0.0  # 0 = no clipping (the paper clips nothing)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + grad scaler)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1
    threads: int | None = None  # torch.set_num_threads; None leaves PyTorch's default
    log_every: int = 50
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 5
    average_last: int = 5  # average the last N checkpoints at the end (§6.1); 0 or 1 = off
    eval_bleu_sentences: int | None = None  # translation: validation sentences decoded for BLEU (None = all)
    progress: bool = True
    # Fine-tuning from [model] init_from: keep the token (and position, token-type) embeddings fixed, and
    # the first N encoder layers (and N decoder layers).
    freeze_embeddings: bool = False
    freeze_layers: int = 0
    # Under torchrun: DistributedDataParallel, or FSDP (parameters, gradients and optimizer state sharded
    # over the processes) for a model that does not fit on one device. A plain process ignores it.
    distributed: str = "ddp"  # ddp | fsdp
    # A non-finite loss skips its step; this many in a row stop the run (0 = stop at the first).
    max_nonfinite_skips: int = 0


@dataclass
class DecodeSection:
    """Decoding used for validation, `evaluate`, `translate` and `generate`."""

    beam_size: int = 4  # §6.1
    length_penalty: float = 0.6  # §6.1
    length_penalty_kind: str = "gnmt"  # gnmt ((5 + |Y|) / 6)^alpha, §6.1 | power |Y|^alpha (Hugging Face)
    max_new_tokens: int | None = None  # None: source length + 50 (§6.1) / lm: 200
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_sentences: int = 64


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "small"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    decode: DecodeSection = field(default_factory=DecodeSection)

    def vision_config(self, **derived: Any) -> VisionConfig:
        """The VisionConfig of this recipe, with image_size, channels and n_classes filled in."""
        values = dict(self.model)
        preset = values.pop("preset", None)
        values.update(derived)
        if "patch_size" not in values:
            raise RecipeError("[model] patch_size: an image model needs one (a divisor of the image size)")
        try:
            if preset is None:
                return VisionConfig(**values)
            fixed = [values.pop(name) for name in ("image_size", "patch_size", "n_classes")]
            return getattr(VisionConfig, preset)(*fixed, **values)
        except ValueError as error:
            raise RecipeError(f"[model] {error}") from None

    @property
    def init_from(self) -> str | None:
        return self.model.get("init_from")

    def model_config(self, **derived: Any) -> TransformerConfig:
        """The TransformerConfig of this recipe, with the derived fields (vocabulary, ids) filled in."""
        if self.data.task == "image_classification":
            raise RecipeError("[model] an image_classification model is a VisionConfig: use vision_config()")
        values = dict(self.model)
        if "init_from" in values:
            raise RecipeError("[model] init_from: the architecture comes from the pretrained checkpoint")
        preset = values.pop("preset", None)
        values.update(derived)
        try:
            if preset is None:
                return TransformerConfig(**values)
            vocab_size = values.pop("vocab_size")
            return getattr(TransformerConfig, preset)(vocab_size, **values)
        except ValueError as error:
            raise RecipeError(f"[model] {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _check_type(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check a TOML value against a dataclass field's type; ints are accepted where floats are."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in hints:
        return None
    for hint in hints:
        if hint is bool and isinstance(value, bool):
            return value
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(h, "__name__", str(h)) for h in hints)
    raise RecipeError(f"[{section}] {key} = {value!r}: expected {names}")


def _fill(section: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"[{section}] must be a table of key = value pairs")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"[{section}] {key}: unknown key{hint}")
        kwargs[key] = _check_type(section, key, value, hints[key])
    return cls(**kwargs)


def _check_model_section(values: dict[str, Any], task: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise RecipeError("[model] must be a table of key = value pairs")
    if task == "image_classification":
        config, presets, derived = VisionConfig, VISION_PRESETS, DERIVED_VISION_FIELDS
    else:
        config, presets, derived = TransformerConfig, PRESETS, DERIVED_MODEL_FIELDS
    allowed = {f.name for f in dataclasses.fields(config)} - set(derived)
    if "init_from" in values:
        if not isinstance(values["init_from"], str) or not values["init_from"].strip():
            raise RecipeError("[model] init_from: expected a path, 'hf:DIR' or 'hf:pkg:MODULE/DIR'")
        for key in values:
            if key != "init_from" and key not in INIT_FROM_FIELDS:
                raise RecipeError(
                    f"[model] {key}: fixed by init_from (the pretrained architecture); "
                    f"only {', '.join(INIT_FROM_FIELDS)} may be set"
                )
    for key, value in values.items():
        if key == "init_from":
            continue
        if key == "preset":
            if value not in presets:
                raise RecipeError(f"[model] preset = {value!r}: a {task} model takes one of {presets}")
        elif key in derived:
            raise RecipeError(f"[model] {key}: set from the tokenizer and data, not in the recipe")
        elif key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"[model] {key}: unknown key{hint}")
    return dict(values)


def _validate(recipe: Recipe) -> None:
    def need(ok: bool, where: str, why: str) -> None:
        if not ok:
            raise RecipeError(f"{where}: {why}")

    d, t, dec = recipe.data, recipe.train, recipe.decode
    need(d.task in TASKS, f"[data] task = {d.task!r}", f"must be one of {TASKS}")
    need(d.tokenizer in TOKENIZERS, f"[data] tokenizer = {d.tokenizer!r}", f"must be one of {TOKENIZERS}")
    need(
        t.lr_schedule in SCHEDULES, f"[train] lr_schedule = {t.lr_schedule!r}", f"must be one of {SCHEDULES}"
    )
    need(t.precision in PRECISIONS, f"[train] precision = {t.precision!r}", f"must be one of {PRECISIONS}")
    need(t.optimizer in OPTIMIZERS, f"[train] optimizer = {t.optimizer!r}", f"must be one of {OPTIMIZERS}")
    need(
        t.distributed in DISTRIBUTED,
        f"[train] distributed = {t.distributed!r}",
        f"must be one of {DISTRIBUTED}",
    )
    need(t.max_nonfinite_skips >= 0, f"[train] max_nonfinite_skips = {t.max_nonfinite_skips}", "must be >= 0")
    need(
        not (t.distributed == "fsdp" and t.precision == "fp16"),
        "[train] distributed = 'fsdp' with precision = 'fp16'",
        "the gradient scaler of fp16 is not supported with FSDP here: use bf16",
    )
    need(t.weight_decay >= 0, f"[train] weight_decay = {t.weight_decay}", "must be >= 0")
    parts = d.train_split.split("+")
    need(
        all(parts) and len(set(parts)) == len(parts),
        f"[data] train_split = {d.train_split!r}",
        "must name each split once, joined by '+' (e.g. 'train+valid')",
    )
    need(
        d.test_split not in parts,
        f"[data] train_split = {d.train_split!r}",
        f"holds the test split {d.test_split!r}: a model trained on it cannot be scored on it",
    )
    need(0.0 <= d.word_dropout < 1.0, f"[data] word_dropout = {d.word_dropout}", "must be in [0, 1)")
    need(0.0 < d.mask_prob < 1.0, f"[data] mask_prob = {d.mask_prob}", "must be in (0, 1)")
    need(
        not d.fine_labels
        or (d.task == "classification" and d.dataset.lower().replace("-", "_") in FINE_LABEL_DATASETS),
        f"[data] fine_labels with task = {d.task!r}, dataset = {d.dataset!r}",
        f"only a classification of {' or '.join(FINE_LABEL_DATASETS)} has finer labels",
    )
    for section, obj, names in (
        ("data", d, ("vocab_size", "max_tokens", "max_len", "block_size", "batch_size", "windows_per_epoch")),
        (
            "train",
            t,
            ("max_steps", "grad_accum", "log_every", "eval_every", "save_every", "keep_checkpoints"),
        ),
        ("decode", dec, ("beam_size", "batch_sentences")),
    ):
        for name in names:
            need(getattr(obj, name) >= 1, f"[{section}] {name} = {getattr(obj, name)!r}", "must be >= 1")
    need(t.warmup_steps >= 0, f"[train] warmup_steps = {t.warmup_steps}", "must be >= 0")
    need(
        0.0 <= t.label_smoothing < 1.0, f"[train] label_smoothing = {t.label_smoothing}", "must be in [0, 1)"
    )
    need(t.lr > 0 and t.lr_scale > 0, "[train] lr / lr_scale", "must be > 0")
    need(t.clip_norm >= 0, f"[train] clip_norm = {t.clip_norm}", "must be >= 0 (0 = off)")
    need(t.average_last >= 0, f"[train] average_last = {t.average_last}", "must be >= 0")
    need(d.augment in AUGMENTATIONS, f"[data] augment = {d.augment!r}", f"must be one of {AUGMENTATIONS}")
    need(d.crop_padding >= 0, f"[data] crop_padding = {d.crop_padding}", "must be >= 0")
    need(dec.temperature > 0, f"[decode] temperature = {dec.temperature}", "must be > 0")
    need(
        t.average_last <= t.keep_checkpoints or t.average_last <= 1,
        f"[train] average_last = {t.average_last}",
        f"needs keep_checkpoints >= {t.average_last}",
    )
    need(
        dec.length_penalty_kind in ("gnmt", "power"),
        f"[decode] length_penalty_kind = {dec.length_penalty_kind!r}",
        "must be gnmt or power",
    )
    need(t.freeze_layers >= 0, f"[train] freeze_layers = {t.freeze_layers}", "must be >= 0")
    need(
        DEVICE_PATTERN.fullmatch(t.device) is not None,
        f"[train] device = {t.device!r}",
        "must be auto, cpu, mps, cuda or cuda:N",
    )
    # Optional limits: None means no limit, so a value given must be a real one (0 would silently mean
    # "no data" or "no time", a negative one nothing at all).
    for section, obj, names in (
        ("data", d, ("limit_train", "limit_valid", "max_sentences")),
        ("train", t, ("max_epochs", "threads")),
        ("decode", dec, ("top_k", "max_new_tokens")),
    ):
        for name in names:
            value = getattr(obj, name)
            need(value is None or value >= 1, f"[{section}] {name} = {value!r}", "must be >= 1 (or left out)")
    need(
        t.eval_bleu_sentences is None or t.eval_bleu_sentences >= 0,
        f"[train] eval_bleu_sentences = {t.eval_bleu_sentences}",
        "must be >= 0 (or left out for all)",
    )
    need(t.max_minutes is None or t.max_minutes > 0, f"[train] max_minutes = {t.max_minutes}", "must be > 0")
    need(dec.top_p is None or 0 < dec.top_p <= 1, f"[decode] top_p = {dec.top_p}", "must be in (0, 1]")
    # nan passes no comparison and inf passes most; either would only surface as a NaN loss much later.
    for section, obj in (("train", t), ("decode", dec)):
        for item in dataclasses.fields(obj):
            value = getattr(obj, item.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"[{section}] {item.name} = {value}", "must be a finite number")
    if (t.freeze_embeddings or t.freeze_layers) and recipe.init_from is None:
        raise RecipeError("[train] freeze_embeddings / freeze_layers: only with [model] init_from")
    if d.task == "image_classification":
        need(
            d.dataset in IMAGE_DATASETS,
            f"[data] dataset = {d.dataset!r}",
            f"must be one of {tuple(IMAGE_DATASETS)}",
        )
        spec = IMAGE_DATASETS[d.dataset]
        recipe.vision_config(
            image_size=spec.image_size, channels=spec.channels, n_classes=len(spec.label_names)
        )
        return
    if recipe.init_from is None:
        recipe.model_config(
            vocab_size=max(d.vocab_size, 8), n_classes=2 if d.task == "classification" else None
        )
    else:
        overrides = {k: v for k, v in recipe.model.items() if k != "init_from"}
        try:  # the overrides' values, checked on a stand-in config
            TransformerConfig(vocab_size=8, n_classes=2, **overrides)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"[model] {error}") from None


def recipe_from_dict(values: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and validate a Recipe from nested dicts (a parsed TOML file)."""
    known = {"name", "description", "model", "data", "train", "decode"}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(f"{source}: unknown top-level key {key!r}{hint}")
    for key in ("name", "description"):
        if key in values and not isinstance(values[key], str):
            raise RecipeError(f"{source}: {key} = {values[key]!r}: expected a string")
    name = values.get("name", "run")
    # The default run directory is runs/<name>: a recipe from elsewhere must not steer it outside runs/.
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise RecipeError(f"{source}: name = {name!r}: expected a plain name, not a path")
    data = _fill("data", DataSection, values.get("data", {}))
    recipe = Recipe(
        name=str(values.get("name", "run")),
        description=str(values.get("description", "")),
        model=_check_model_section(values.get("model", {"preset": "small"}), data.task),
        data=data,
        train=_fill("train", TrainSection, values.get("train", {})),
        decode=_fill("decode", DecodeSection, values.get("decode", {})),
    )
    _validate(recipe)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as TOML (numbers, booleans,
    quoted strings, lists), and as a plain string when it is not valid TOML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for text in overrides:
        keys, value = parse_override(text)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"--set {text!r}: {key} is not a section")
        target[keys[-1]] = None if value == "none" else value
    return values


def text_line(data: bytes, offset: int) -> int:
    """The 1-based line number of byte `offset` in `data` (for errors about undecodable bytes)."""
    return data.count(b"\n", 0, offset) + 1


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except UnicodeDecodeError as error:
        line = text_line(path.read_bytes(), error.start)
        raise RecipeError(
            f"recipe {path}: line {line} is not UTF-8 text (byte {error.object[error.start]:#04x})"
        ) from None
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror or error}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    return recipe_from_dict(apply_overrides(values, overrides or []), source=str(path))


def recipe_to_toml(recipe: Recipe) -> str:
    """Write a recipe back as TOML (what a run directory keeps, so a run can be resumed and repeated)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
        return repr(v)

    lines = [f"name = {value(recipe.name)}", f"description = {value(recipe.description)}"]
    for section in ("model", "data", "train", "decode"):
        content = getattr(recipe, section)
        items = content.items() if isinstance(content, dict) else dataclasses.asdict(content).items()
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in items if v is not None]
    return "\n".join(lines) + "\n"
