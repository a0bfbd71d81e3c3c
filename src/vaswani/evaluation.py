"""Evaluation: the scores of the paper's tasks and the plots and files that report them.

Translation is scored with sacreBLEU (BLEU, and chrF beside it) on detokenized text, as Post (2018) asks,
so that numbers carry a signature and compare across papers; the paper's own BLEU (§6.1) was computed on
tokenized text with multi-bleu.perl and is not directly comparable. Classification gets accuracy,
per-class precision/recall/F1, macro-F1 and a confusion matrix; language models get perplexity and bits per
character. Training runs write `metrics.jsonl`, which `read_metrics` and `plot_training_curves` turn into
pictures.

Plots use matplotlib's object-oriented `Figure` (rendered by Agg when saved to PNG) rather than pyplot, so
they never open a window, never change the user's global backend and leave no figure behind to close.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaswani.files import atomic_write_text

# Validation scores plotted by `plot_training_curves`, in order: key -> (name on the plot, higher is better).
VALID_SCORES: dict[str, tuple[str, bool]] = {
    "valid_bleu": ("BLEU", True),
    "valid_chrf": ("chrF", True),
    "valid_accuracy": ("accuracy", True),
    "valid_macro_f1": ("macro-F1", True),
    "valid_bpc": ("bits per character", False),
}


@dataclass
class MetricResult:
    """One corpus-level score: `name` ("BLEU", "chrF2"), `score` (0-100), sacreBLEU's `signature`, which
    pins down how it was computed, and `details`, sacreBLEU's one-line summary (for BLEU the n-gram
    precisions and the brevity penalty)."""

    name: str
    score: float
    signature: str
    details: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    for what, texts in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(texts, str):
            raise TypeError(f"{what} must be a sequence of sentences, not a single string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: they must pair up")
    if len(hypotheses) == 0:
        raise ValueError("cannot score an empty corpus: there are no sentences")


def _score(metric: Any, hypotheses: Sequence[str], references: Sequence[str]) -> MetricResult:
    _check_corpus(hypotheses, references)
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return MetricResult(
        name=result.name,
        score=float(result.score),
        signature=str(metric.get_signature()),
        details=str(result),
    )


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> MetricResult:
    """Corpus BLEU of detokenized `hypotheses` against one detokenized reference each, with sacreBLEU's
    defaults (13a tokenization, exponential smoothing, mixed case): the same number as the `sacrebleu`
    command line tool. Tokenized or BPE-split text gives a different, inflated number; detokenize first."""
    from sacrebleu.metrics import BLEU

    return _score(BLEU(), hypotheses, references)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> MetricResult:
    """Corpus chrF2 (character 6-gram F-score, beta = 2) with sacreBLEU's defaults, on detokenized text.
    Less sensitive than BLEU to tokenization and rich morphology (German targets), so reported beside it."""
    from sacrebleu.metrics import CHRF

    return _score(CHRF(), hypotheses, references)


@dataclass
class ClassificationReport:
    """Accuracy, macro-F1 and per-class scores of a classifier, with its confusion matrix.

    `confusion[i][j]` counts examples of true class i predicted as class j (rows true, columns predicted).
    Convention for undefined ratios, as scikit-learn's `zero_division=0`: a class never predicted has
    precision 0, a class absent from the labels has recall 0, and F1 is 0 when precision + recall is 0.
    `macro_f1` is the unweighted mean of F1 over the classes that occur among the labels or the
    predictions (scikit-learn's `f1_score(average="macro")` without explicit labels): a class seen nowhere
    in the evaluation set says nothing about the model and is left out rather than counted as 0.
    """

    label_names: list[str]
    accuracy: float
    macro_f1: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        per_class = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(
                self.label_names, self.precision, self.recall, self.f1, self.support, strict=True
            )
        }
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": per_class,
            "label_names": list(self.label_names),
            "confusion": [list(row) for row in self.confusion],
        }


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(
        numerator, denominator, out=np.zeros(len(numerator), dtype=np.float64), where=denominator > 0
    )


def classification_report(
    predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]
) -> ClassificationReport:
    """Score predicted class ids against true class ids; class i is called `label_names[i]`."""
    n_classes = len(label_names)
    predicted, true = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if predicted.ndim != 1 or true.ndim != 1:
        raise ValueError("predictions and labels must be flat sequences of class ids")
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions but {len(true)} labels: they must pair up")
    if len(true) == 0 or n_classes == 0:
        raise ValueError("cannot score an empty set of predictions or an empty list of classes")
    for what, ids in (("prediction", predicted), ("label", true)):
        if ids.min() < 0 or ids.max() >= n_classes:
            bad = ids[(ids < 0) | (ids >= n_classes)][0]
            raise ValueError(f"{what} {bad} is not a class id in [0, {n_classes})")

    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    hits = np.diag(confusion).astype(np.float64)
    support, n_predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = _safe_ratio(hits, n_predicted.astype(np.float64))
    recall = _safe_ratio(hits, support.astype(np.float64))
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    seen = (support > 0) | (n_predicted > 0)
    return ClassificationReport(
        label_names=[str(name) for name in label_names],
        accuracy=float(hits.sum() / len(true)),
        macro_f1=float(f1[seen].mean()),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        support=support.tolist(),
        confusion=confusion.tolist(),
    )


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else name[: max(width - 1, 1)] + "…"


def _short_names(names: Sequence[str], width: int) -> list[str]:
    """Names cut to `width` characters with "…"; numbered when cutting makes two of them the same."""
    short = [_cut(name, width) for name in names]
    if len(set(short)) < len(short):
        short = [f"{i}:" + _cut(name, width - len(f"{i}:")) for i, name in enumerate(names)]
    return short


def format_confusion_matrix(report: ClassificationReport, max_name_len: int = 12) -> str:
    """The confusion matrix as an aligned text table (rows true, columns predicted), for a terminal.

    Names longer than `max_name_len` are cut with "…" (and numbered if that makes two alike). Each row
    ends with the class's support and recall.
    """
    names = _short_names(report.label_names, max_name_len)
    counts = report.confusion
    corner = "true \\ pred"
    row_width = max(len(corner), *(len(name) for name in names))
    cell = max(5, *(len(name) for name in names), *(len(str(c)) for row in counts for c in row))
    header = f"{corner:<{row_width}}  " + " ".join(f"{name:>{cell}}" for name in names) + "  support  recall"
    lines = [header, "-" * len(header)]
    for name, row, support, recall in zip(names, counts, report.support, report.recall, strict=True):
        cells = " ".join(f"{count:>{cell}}" for count in row)
        lines.append(f"{name:<{row_width}}  {cells}  {support:>7}  {recall:>6.3f}")
    lines.append(f"accuracy {report.accuracy:.4f}   macro-F1 {report.macro_f1:.4f}")
    return "\n".join(lines)


def plot_confusion_matrix(report: ClassificationReport, path: str | Path) -> Path:
    """Draw the confusion matrix to a PNG at `path`: counts in the cells, colour by the fraction of the true
    class (row-normalised, so rare classes are as readable as common ones), accuracy and macro-F1 in the
    title. Returns the path written."""
    from matplotlib.figure import Figure

    path = Path(path)
    counts = np.asarray(report.confusion)
    n = len(counts)
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    names = _short_names(report.label_names, 16)

    side = min(max(4.5, 0.6 * n + 2.5), 16.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 30:  # beyond that the numbers no longer fit in their cells
        font = 11 if n <= 8 else max(5, 11 - (n - 8) // 3)
        for i in range(n):
            for j in range(n):
                colour = "white" if fractions[i, j] > 0.55 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=font)
    short_names = max(map(len, names)) <= 3
    ax.set_xticks(range(n), names, rotation=0 if short_names else 45, ha="center" if short_names else "right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: accuracy {100 * report.accuracy:.1f}%, macro-F1 {report.macro_f1:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def perplexity(nll_per_token: float) -> float:
    """exp(mean negative log-likelihood per token, in nats): the number of equally likely tokens the model
    is, on average, as uncertain as choosing among. Comparable only between models with the same
    tokenization, since the unit (a token) differs between vocabularies. Overflows to inf, not an error."""
    if nll_per_token < 0:
        raise ValueError(f"a negative log-likelihood is never below 0, got {nll_per_token}")
    try:
        return math.exp(nll_per_token)
    except OverflowError:
        return math.inf


def bits_per_character(nll_per_char_nats: float) -> float:
    """Mean negative log-likelihood per character converted from nats to bits (divided by ln 2): the
    compression rate a character-level model would achieve, the unit of the enwik8/text8 literature."""
    if nll_per_char_nats < 0:
        raise ValueError(f"a negative log-likelihood is never below 0, got {nll_per_char_nats}")
    return nll_per_char_nats / math.log(2)


# Headline metrics of each kind of results_<split>.json that `vaswani evaluate` writes.
_HEADLINE = {
    "accuracy": lambda r: r.get("accuracy"),
    "macro_f1": lambda r: r.get("macro_f1"),
    "bleu": lambda r: r["bleu"]["score"] if isinstance(r.get("bleu"), dict) else None,
    "chrf": lambda r: r["chrf"]["score"] if isinstance(r.get("chrf"), dict) else None,
    "valid_nll": lambda r: r.get("valid_nll"),
    "valid_bpc": lambda r: r.get("valid_bpc"),
}


@dataclass
class SeedSummary:
    """One metric over several runs (seeds): the values, their mean and sample standard deviation."""

    metric: str
    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); NaN for a single run, which has no spread to measure."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan


def summarize_runs(run_dirs: Sequence[str | Path], split: str = "test") -> list[SeedSummary]:
    """Mean and standard deviation of the headline metrics of `results_<split>.json` over runs, as the
    papers report results over seeds. Every run must hold the same metrics."""
    if not run_dirs:
        raise ValueError("no run directories given")
    per_run: list[dict[str, float]] = []
    for run_dir in run_dirs:
        path = Path(run_dir) / f"results_{split}.json"
        if not path.is_file():
            raise ValueError(f"{path} not found: run `vaswani evaluate {run_dir} --split {split}` first")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a results file ({error})") from None
        if not isinstance(results, dict):
            raise ValueError(f"{path}: not a results file (a JSON {type(results).__name__}, not an object)")
        found = {k: float(v) for k, get in _HEADLINE.items() if (v := get(results)) is not None}
        if not found:
            raise ValueError(f"{path}: holds none of the metrics {sorted(_HEADLINE)}")
        per_run.append(found)
    names = list(per_run[0])
    for run_dir, found in zip(run_dirs, per_run, strict=True):
        if list(found) != names:
            first = sorted(names)
            raise ValueError(f"{run_dir}: metrics {sorted(found)} differ from the first run's {first}")
    return [SeedSummary(name, [found[name] for found in per_run]) for name in names]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a `metrics.jsonl` file: one JSON object per line, blank lines skipped."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: not a JSON object but {type(record).__name__}")
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step. A resumed run logs some steps twice; the later line wins,
    since it belongs to the run that went on."""
    by_step: dict[float, float] = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return np.asarray(steps, dtype=np.float64), np.asarray([by_step[s] for s in steps], dtype=np.float64)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Trailing moving average over about 2% of the points, to see the trend through batch noise."""
    window = max(1, len(values) // 50)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (cumulative[end] - cumulative[start]) / (end - start)


def _style(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_training_curves(metrics: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Plot the records of a `metrics.jsonl` into `out_dir` and return the PNGs written, among:

    - `loss.png`: training `loss` (label-smoothed) and `nll` against step, with validation `valid_loss` and
      `valid_nll` as points;
    - `lr.png`: the learning rate (`lr`) against step, where the warmup and decay of §5.3 should show;
    - `valid.png`: one panel per validation score present (`valid_bleu`, `valid_chrf`, `valid_accuracy`,
      `valid_macro_f1`, `valid_bpc`), its best value marked.

    Training records are those with `"split": "train"` or no split; validation values are taken from any
    record. Records about another checkpoint (`"checkpoint": "averaged"`) are not part of the curves. A plot
    whose data is absent is not written.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    metrics = [r for r in metrics if "checkpoint" not in r]
    train = [r for r in metrics if r.get("split", "train") == "train"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / name, dpi=120)
        written.append(out_dir / name)

    curves = [(key, *_series(train, key)) for key in ("loss", "nll")]
    points = [(key, *_series(metrics, key)) for key in ("valid_loss", "valid_nll")]
    if any(len(steps) for _, steps, _ in curves + points):
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for (key, steps, values), colour in zip(curves, ("tab:blue", "tab:orange"), strict=True):
            if len(steps) == 0:
                continue
            if len(values) >= 100:  # few enough points are readable raw; many are drawn faint under a trend
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                values = _smooth(values)
            ax.plot(steps, values, color=colour, linewidth=1.6, label=f"train {key}")
        for (key, steps, values), colour in zip(points, ("tab:green", "tab:red"), strict=True):
            if len(steps):
                ax.plot(steps, values, "o--", color=colour, markersize=5, linewidth=1, label=key)
        _style(ax, "Loss (nats per target token)", "nats / token")
        ax.legend()
        save(fig, "loss.png")

    steps, lrs = _series(train, "lr")
    if len(steps):
        fig = Figure(figsize=(8, 3.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(steps, lrs, color="tab:purple", linewidth=1.6)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylim(bottom=0)
        _style(ax, "Learning rate", "learning rate")
        save(fig, "lr.png")

    present = [(key, *_series(metrics, key)) for key in VALID_SCORES]
    present = [(key, steps, values) for key, steps, values in present if len(steps)]
    if present:
        columns, rows = min(3, len(present)), math.ceil(len(present) / 3)
        fig = Figure(figsize=(5 * columns + 1, 4 * rows), layout="constrained")
        for index, (key, steps, values) in enumerate(present, start=1):
            ax = fig.add_subplot(rows, columns, index)
            ax.plot(steps, values, "o-", color="tab:green", markersize=4, linewidth=1.4)
            name, higher_is_better = VALID_SCORES[key]
            best = int(np.argmax(values) if higher_is_better else np.argmin(values))
            ax.plot(steps[best], values[best], "*", color="tab:red", markersize=14)
            ax.annotate(
                f"best {values[best]:.4g}\nat step {steps[best]:.0f}",
                (steps[best], values[best]),
                textcoords="offset points",
                xytext=(0, 12) if higher_is_better else (0, -14),
                # at either end of the curve a centred label would run past the axes
                ha="left" if best == 0 else "right" if best == len(steps) - 1 else "center",
                va="bottom" if higher_is_better else "top",
                fontsize=9,
            )
            _style(
                ax, f"Validation {name}", f"{name} ({'higher' if higher_is_better else 'lower'} is better)"
            )
            ax.margins(x=0.06, y=0.2)
        save(fig, "valid.png")
    return written


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (`vaswani.files.atomic_write_text`), so a reader (or a
    crash) never sees half a results file. numpy values and paths are converted. Returns the path written."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_to_json) + "\n")
