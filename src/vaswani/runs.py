"""Run directories: what training leaves behind, and how to load it back for evaluation and inference.

RUN_DIR/
  recipe.toml          the recipe as trained (overrides applied)
  tokenizer.json       the tokenizer (and labels.txt for a classifier); an image run has neither
  metrics.jsonl        one JSON object per line: training and validation metrics by step
  plots/*.png          the learning curves
  checkpoints/         step_NNNNNNN/ (weights + optimizer/RNG/data position) and LATEST
  best/                the weights with the best validation metric
  averaged/            the average of the last checkpoints (§6.1)
  FINAL                which of the above `evaluate`, `translate`, ... use by default
  results_*.json       evaluation results
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from vaswani.recipes import Recipe, RecipeError, load_recipe
from vaswani.tasks import make_task
from vaswani.training.checkpoint import (
    LATEST,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    average_checkpoints,
    latest_checkpoint,
    load_weights,
    read_meta,
    save_checkpoint,
    step_checkpoints,
    verify_checkpoint,
)
from vaswani.training.trainer import RECIPE_FILE, resolve_device


@dataclass
class LoadedRun:
    recipe: Recipe
    task: object
    model: nn.Module
    device: torch.device
    checkpoint: Path


def checkpoint_path(run_dir: Path, name: str | None = None) -> Path:
    """The checkpoint directory for `name`: "final" (default: what FINAL names), "best", "averaged", "last",
    or a step checkpoint's name (step_0001000)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    name = name or "final"
    if name == "final":
        pointer = run_dir / "FINAL"
        if pointer.is_file():
            target = _read_pointer(pointer)
            if not target or ".." in Path(target).parts or Path(target).is_absolute():
                raise CheckpointError(f"{pointer}: corrupt pointer {target!r}")
            return run_dir / target
        name = "last"  # a run still training has no FINAL yet: its latest checkpoint is what there is
    if name == "last":
        _read_pointer(run_dir / "checkpoints" / LATEST)  # refuses an undecodable pointer by its name
        latest = latest_checkpoint(run_dir / "checkpoints")
        if latest is None:
            raise CheckpointError(f"{run_dir}: no checkpoint yet")
        return latest
    if name in ("best", "averaged"):
        return run_dir / name
    if name.startswith("step_") and "/" not in name:
        return run_dir / "checkpoints" / name
    raise CheckpointError(f"unknown checkpoint {name!r}: use final, best, averaged, last or step_NNNNNNN")


def _read_pointer(pointer: Path) -> str:
    """A pointer file's content (FINAL, LATEST), or "" when there is none; bytes that are not UTF-8 are a
    corrupt pointer named as such, not a bare codec error."""
    try:
        return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer}: corrupt pointer (not UTF-8 text)") from None


def _check_checkpoint_files(directory: Path, model: nn.Module, recipe_path: Path) -> None:
    """Refuse, before anything is read, a checkpoint whose meta.json names files outside its directory,
    and one whose tensors do not fit the model the run's recipe and tokenizer describe (naming the first
    tensor that differs, instead of torch's multi-line report)."""
    if not (directory / META_FILE).is_file():
        return  # verify_checkpoint (in load_weights) reports the missing file
    read_meta(directory)  # refuses file names outside the checkpoint
    weights = directory / MODEL_FILE
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        verify_checkpoint(directory)  # a truncated or tampered file: the checksum names it best
        raise CheckpointError(f"{weights}: not a readable safetensors file ({error})") from None
    for key, tensor in model.state_dict().items():
        if key in shapes and shapes[key] != tuple(tensor.shape):
            raise CheckpointError(
                f"{directory}: weights do not fit the model that {recipe_path.name} and the tokenizer "
                f"describe: {key} is {shapes[key]} in the checkpoint, {tuple(tensor.shape)} in the model"
            )


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str | None = None) -> LoadedRun:
    """Load a trained run: its recipe, task (with the saved tokenizer), and model weights, ready for use."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{run_dir}: not a vaswani run directory (no {RECIPE_FILE})")
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError as error:  # validation errors name the key; here the file matters as much
        message = str(error)
        raise RecipeError(message if str(recipe_path) in message else f"{recipe_path}: {message}") from None
    task = make_task(recipe, run_dir)
    for name in task.run_files:
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir}: no {name}")
    chosen = checkpoint_path(run_dir, checkpoint)
    try:
        target = resolve_device(device or recipe.train.device)
    except RuntimeError:  # torch.device's message for a name it does not know
        raise ValueError(f"device {device or recipe.train.device!r}: use cpu, cuda, cuda:N or mps") from None
    model = task.build_model()
    _check_checkpoint_files(chosen, model, recipe_path)
    load_weights(chosen, model)
    model.to(target).eval()
    return LoadedRun(recipe, task, model, target, chosen)


def average_run(run_dir: str | Path, last: int) -> Path:
    """Average the weights of the last `last` step checkpoints into RUN_DIR/averaged."""
    run_dir = Path(run_dir)
    if last < 1:
        raise ValueError(f"--last {last}: must be at least 1")
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    checkpoints = step_checkpoints(run_dir / "checkpoints")
    if len(checkpoints) < last:
        raise CheckpointError(f"{run_dir}: asked to average {last} checkpoints, found {len(checkpoints)}")
    loaded = load_run(run_dir, checkpoint="last", device="cpu")
    chosen = checkpoints[-last:]
    average_checkpoints(chosen, loaded.model)
    return save_checkpoint(run_dir / "averaged", loaded.model, meta={"averaged": [p.name for p in chosen]})
