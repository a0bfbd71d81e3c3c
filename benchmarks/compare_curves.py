"""Compare the learning curves of training runs that differ in one setting (fp32 against bf16 autocast, say):
training loss at every logged step, validation metrics, and the relative difference to the first run.
Prints a table, writes one PNG and, with --json, the numbers.

    python benchmarks/compare_curves.py runs/bf16curve/fp32 runs/bf16curve/bf16 --labels fp32 bf16 \\
        --out docs/img/precision_curves.png --json docs/bench/precision_curves.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vaswani.evaluation import read_metrics
from vaswani.training.trainer import METRICS_FILE


def split_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """(training loss by step, validation record by step) of a run's metrics.jsonl."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (not a run directory?)")
    try:
        records = read_metrics(path)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    train, valid = {}, {}
    for record in records:
        if record.get("split") == "valid" and "checkpoint" not in record:
            valid[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record["loss"]
    if not train:
        raise SystemExit(f"error: {path} holds no training loss")
    return train, valid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two run directories")
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    curves = [split_metrics(run) for run in args.runs]
    (ref_train, ref_valid), others = curves[0], curves[1:]
    steps = sorted(set(ref_train).intersection(*(set(train) for train, _ in others)))
    if not steps:
        raise SystemExit("error: the runs have no logged training step in common")

    header = ["step", *labels, *(f"{label} / {labels[0]} - 1" for label in labels[1:])]
    losses = {step: [train[step] for train, _ in curves] for step in steps}
    # Per step, each later run's loss relative to the first's; a zero loss has no relative difference.
    differences = {step: [v / (vs[0] or float("nan")) - 1 for v in vs[1:]] for step, vs in losses.items()}
    print(" | ".join(header))
    for step in steps:
        cells = [str(step), *(f"{v:.4f}" for v in losses[step]), *(f"{v:+.2%}" for v in differences[step])]
        print(" | ".join(cells))
    valid_keys = sorted({key for _, valid in curves for record in valid.values() for key in record
                         if key.startswith("valid_")})  # fmt: skip
    valid_steps = sorted(set(ref_valid).intersection(*(set(valid) for _, valid in others)))
    for key in valid_keys:
        for step in valid_steps:
            values = [valid[step].get(key) for _, valid in curves]
            pairs = zip(labels, values, strict=True)
            print(f"{key} at step {step}: " + ", ".join(f"{label} {v:.4f}" for label, v in pairs))
    worst = [max(abs(differences[step][i]) for step in steps) for i in range(len(labels) - 1)]
    for label, value in zip(labels[1:], worst, strict=True):
        print(f"largest relative difference of the training loss, {label} against {labels[0]}: {value:.2%}")

    figure, (loss_axis, diff_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (train, _) in zip(labels, curves, strict=True):
        loss_axis.plot(list(train), list(train.values()), label=label)
    loss_axis.set(xlabel="step", ylabel="training loss (label-smoothed)", title="training loss")
    loss_axis.legend()
    for i, label in enumerate(labels[1:]):
        diff_axis.plot(steps, [100 * differences[step][i] for step in steps], marker="o", label=label)
    diff_axis.axhline(0.0, color="grey", linewidth=0.8)
    diff_axis.set(xlabel="step", ylabel=f"% difference to {labels[0]}", title="relative difference")
    diff_axis.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    if args.json:
        payload = {
            "runs": [str(run) for run in args.runs],
            "labels": labels,
            "training_loss": {label: curve[0] for label, curve in zip(labels, curves, strict=True)},
            "validation": {label: curve[1] for label, curve in zip(labels, curves, strict=True)},
            "largest_relative_difference": dict(zip(labels[1:], worst, strict=True)),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
