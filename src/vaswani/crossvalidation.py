"""k-fold cross-validation of a classification recipe on train + valid; the test split is never read.

Why: on a small data set the validation split is a few hundred examples (179 digits, 545 TREC questions),
where accuracy moves in steps of 0.2-0.6% and one split's luck can choose a setting. Pooling train and
valid and holding out each of k stratified folds in turn gives k estimates over every example, so two
settings can be compared with their spread.

Each fold is a whole `vaswani train` run (the recipe, task and Trainer unchanged) in `OUT/fold_K/`, with the
task's training data replaced by the other folds and its validation data by the held-out fold (for text,
the tokenizer is trained on the fold's training texts only). A fold is scored by the weights of its last
step and by the average of its last checkpoints, both fixed in advance: choosing the best checkpoint on
the held-out fold would make its own score optimistic. `OUT/crossvalidation_setup.json` records the
recipe, k and seed; a directory holding another's folds is refused rather than mixed in.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vaswani.evaluation import read_metrics, write_json
from vaswani.recipes import Recipe, recipe_to_toml
from vaswani.tasks import make_task
from vaswani.training.trainer import METRICS_FILE, Trainer

RESULT_FILE = "crossvalidation.json"
SETUP_FILE = "crossvalidation_setup.json"  # the recipe, k and seed that the folds in a directory belong to
FOLD_FILE = "fold_result.json"  # written last in a fold's directory: its presence means the fold is done
CROSS_VALIDATED_TASKS = ("classification", "image_classification")


@dataclass
class FoldResult:
    fold: int
    n_train: int
    n_held_out: int
    step: int
    accuracy: float  # the held-out fold, weights of the last step
    nll: float
    averaged_accuracy: float | None  # the average of the last checkpoints (None when averaging is off)
    averaged_nll: float | None


@dataclass
class CrossValidation:
    folds: list[FoldResult]
    k: int
    seed: int

    def summary(self, field: str) -> tuple[float, float]:
        """Mean and sample standard deviation of `field` over the folds (std 0 for one fold)."""
        values = [getattr(f, field) for f in self.folds if getattr(f, field) is not None]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """`k` disjoint lists of indices covering `labels`: each class shuffled (seeded) and dealt round-robin,
    so every fold holds about 1/k of every class."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(labels) < k:
        raise ValueError(f"{len(labels)} examples cannot make {k} folds")
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        for j, i in enumerate(members):
            folds[j % k].append(i)
    return [sorted(f) for f in folds]


def _setup(recipe: Recipe, k: int, seed: int) -> dict:
    # Threads and the progress bar change how a fold runs, not what it computes.
    same = copy.deepcopy(recipe)
    same.train.threads, same.train.progress = None, True
    return {"k": k, "seed": seed, "recipe": recipe_to_toml(same)}


def _claim(out_dir: Path, recipe: Recipe, k: int, seed: int) -> None:
    """Record what the folds in `out_dir` are folds of, or refuse a directory that holds another's: kept
    folds of another setting would be averaged in silently."""
    path, wanted = out_dir / SETUP_FILE, _setup(recipe, k, seed)
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not JSON (corrupt?)") from None
        if found != wanted:
            what = [
                name
                for name in ("recipe", "k", "seed")
                if not isinstance(found, dict) or found.get(name) != wanted[name]
            ]
            raise ValueError(
                f"{out_dir} holds the folds of another {' and '.join(what)}: give this one its own --out"
            )
        return
    write_json(path, wanted)


def _read_fold(path: Path) -> FoldResult:
    try:
        return FoldResult(**json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        raise ValueError(
            f"{path}: not a fold result (corrupt?); delete its fold directory to retrain it"
        ) from None


def _held_out_scores(run_dir: Path) -> tuple[int, dict, dict | None]:
    records = read_metrics(run_dir / METRICS_FILE)
    valid = [r for r in records if r.get("split") == "valid"]
    last = [r for r in valid if "checkpoint" not in r][-1]
    averaged = [r for r in valid if r.get("checkpoint") == "averaged"]
    return last["step"], last, averaged[-1] if averaged else None


def crossvalidate(
    recipe_factory, out_dir: Path, k: int = 5, seed: int = 123, only: Sequence[int] | None = None, say=print
) -> CrossValidation:
    """Train `k` folds (or those in `only`) of the recipe that `recipe_factory()` builds (a fresh one per
    fold: training may mutate it) into `out_dir/fold_K/`, and summarize every finished fold there.

    A fold whose directory holds a result is not trained again, so an interrupted cross-validation goes on
    where it stopped and folds can run in separate processes (`only`); an unfinished fold starts afresh.
    """
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    wanted = range(k) if only is None else sorted(set(only))
    for fold in wanted:
        if not 0 <= fold < k:
            raise ValueError(f"fold {fold}: the folds are 0 to {k - 1}")
    recipe: Recipe = recipe_factory()
    if recipe.data.task not in CROSS_VALIDATED_TASKS:
        raise ValueError(
            f"[data] task = {recipe.data.task!r}: cross-validation is for "
            + " and ".join(CROSS_VALIDATED_TASKS)
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir, recipe, k, seed)
    with tempfile.TemporaryDirectory() as scratch:  # the probe task only reads the data; it owns no run
        probe = make_task(recipe, Path(scratch))
        if recipe.data.valid_split in recipe.data.train_split.split("+"):
            pool = probe.train_data  # a final model's recipe ("train+valid"): its training data is the pool
        else:
            pool = type(probe.train_data).join([probe.train_data, probe.valid_data])
    folds = stratified_folds(pool.labels, k, seed)
    for fold in wanted:
        run_dir = out_dir / f"fold_{fold}"
        if (run_dir / FOLD_FILE).is_file():
            say(f"fold {fold}: done before, kept")
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        held = folds[fold]
        rest = sorted(i for j, f in enumerate(folds) if j != fold for i in f)
        fold_recipe = recipe_factory()
        task = make_task(fold_recipe, run_dir)
        task.train_data = pool.subset(rest)  # cached_property: assigning replaces what it would load
        task.valid_data = pool.subset(held)
        say(f"fold {fold}: training on {len(rest)}, holding out {len(held)}")
        Trainer(fold_recipe, task, run_dir).fit()
        step, last, averaged = _held_out_scores(run_dir)
        result = FoldResult(
            fold=fold,
            n_train=len(rest),
            n_held_out=len(held),
            step=step,
            accuracy=last["valid_accuracy"],
            nll=last["valid_nll"],
            averaged_accuracy=averaged["valid_accuracy"] if averaged else None,
            averaged_nll=averaged["valid_nll"] if averaged else None,
        )
        write_json(run_dir / FOLD_FILE, asdict(result))
        say(f"fold {fold}: held-out accuracy {result.accuracy:.4f} (last step {step})")
    done = [_read_fold(path) for fold in range(k) if (path := out_dir / f"fold_{fold}" / FOLD_FILE).is_file()]
    cv = CrossValidation(done, k, seed)
    summary = {field: dict(zip(("mean", "std"), cv.summary(field), strict=True)) for field in _SUMMARIZED}
    write_json(
        out_dir / RESULT_FILE,
        {"recipe": recipe.name, "k": k, "seed": seed, "folds": [asdict(f) for f in done], "summary": summary},
    )
    return cv


_SUMMARIZED = ("accuracy", "nll", "averaged_accuracy", "averaged_nll")


def format_crossvalidation(cv: CrossValidation) -> str:
    """The folds as a table, then the mean ± std (sample) of each score."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = ("fold", 4), ("train", 6), ("held", 5), ("step", 6), ("accuracy", 9), ("nll", 7)
    header += ("avg acc", 8), ("avg nll", 8)
    lines = [" ".join(f"{name:>{width}}" for name, width in header)]
    for f in cv.folds:
        lines.append(
            f"{f.fold:>4} {f.n_train:>6} {f.n_held_out:>5} {f.step:>6} {cell(f.accuracy):>9} {cell(f.nll):>7}"
            f" {cell(f.averaged_accuracy):>8} {cell(f.averaged_nll):>8}"
        )
    missing = cv.k - len(cv.folds)
    lines.append(f"{len(cv.folds)} of {cv.k} folds" + (f" ({missing} not trained yet)" if missing else ""))
    for field in _SUMMARIZED:
        mean, std = cv.summary(field)
        if not math.isnan(mean):
            lines.append(f"{field:<18} {mean:.4f} ± {std:.4f}")
    return "\n".join(lines)
