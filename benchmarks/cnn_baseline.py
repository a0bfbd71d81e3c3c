"""Kim's (2014) CNN-rand on the library's own classification splits: the anchor of docs/RESULTS.md, rerun
in the same harness so that a gap to the published number can be told apart from a gap in the data.

The model of "Convolutional Neural Networks for Sentence Classification" (Kim, 2014, §2-3), "CNN-rand":
word vectors of 300 initialised uniformly in [-0.25, 0.25] and trained, filters of 3, 4 and 5 words with 100
feature maps each, ReLU, max-over-time pooling, dropout 0.5, the rows of the output layer rescaled to an l2
norm of at most 3 after each update, mini-batches of 50, Adadelta (rho 0.95), 25 epochs. As in the paper,
the reported model is the epoch that scores best on the validation split; the test split is scored at every
epoch but only read at that one. Differences from the paper's code: lower-cased whitespace tokens (the
datasets here are already tokenised), and a vocabulary of the training split only, with <unk> for the rest.

    python benchmarks/cnn_baseline.py --dataset trec --seeds 1 2 3 --json docs/bench/cnn_rand_trec.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaswani.data.datasets import CLASSIFICATION_DATASETS, DataError, load_classification

PAD, UNK = 0, 1
WIDTHS = (3, 4, 5)


class CNNRand(nn.Module):
    """Kim (2014), §2: one convolution layer over word vectors, max-over-time pooling, a softmax layer."""

    def __init__(
        self, vocab_size: int, n_classes: int, dim: int = 300, maps: int = 100, dropout: float = 0.5
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        nn.init.uniform_(self.embedding.weight, -0.25, 0.25)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()
        # padding = width - 1 on both sides, as the paper's code pads every sentence for its widest filter.
        self.convs = nn.ModuleList(nn.Conv1d(dim, maps, width, padding=width - 1) for width in WIDTHS)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(maps * len(WIDTHS), n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids).transpose(1, 2)
        pooled = torch.cat([F.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=-1)
        return self.out(self.dropout(pooled))

    @torch.no_grad()
    def clip_output_norms(self, max_norm: float = 3.0) -> None:
        """Kim's constraint: a class's weight vector longer than `max_norm` (l2) is rescaled to it."""
        norms = self.out.weight.norm(dim=1, keepdim=True)
        self.out.weight.mul_(max_norm / norms.clamp(min=max_norm))


def words(text: str) -> list[str]:
    return text.lower().split()


def build_vocab(texts: list[str]) -> dict[str, int]:
    vocab = {"<pad>": PAD, "<unk>": UNK}
    for text in texts:
        for word in words(text):
            vocab.setdefault(word, len(vocab))
    return vocab


def encode(texts: list[str], vocab: dict[str, int]) -> list[list[int]]:
    return [[vocab.get(word, UNK) for word in words(text)] or [UNK] for text in texts]


def pad(rows: list[list[int]]) -> torch.Tensor:
    batch = torch.full((len(rows), max(len(row) for row in rows)), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    return batch


@torch.no_grad()
def accuracy(model: CNNRand, rows: list[list[int]], labels: list[int], batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        predicted = model(pad(rows[start : start + batch_size])).argmax(-1)
        correct += (predicted == torch.tensor(labels[start : start + batch_size])).sum().item()
    return 100.0 * correct / len(rows)


def run(dataset: str, seed: int, epochs: int, data_dir: str | None, limit: int | None) -> dict:
    """Train one seed; return the validation curve and the test accuracy at the best validation epoch."""
    torch.manual_seed(seed)
    shuffle = random.Random(seed)
    splits = {
        name: load_classification(dataset, name, data_dir=data_dir) for name in ("train", "valid", "test")
    }
    train = splits["train"]
    texts, labels = train.texts[:limit], train.labels[:limit]
    vocab = build_vocab(texts)
    rows = encode(texts, vocab)
    scored = {name: (encode(splits[name].texts, vocab), splits[name].labels) for name in ("valid", "test")}
    model = CNNRand(len(vocab), len(train.label_names))
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-6)
    curve, best = [], None
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = list(range(len(rows)))
        shuffle.shuffle(order)
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            loss = F.cross_entropy(
                model(pad([rows[i] for i in batch])), torch.tensor([labels[i] for i in batch])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clip_output_norms()
        valid, test = accuracy(model, *scored["valid"]), accuracy(model, *scored["test"])
        curve.append(round(valid, 2))
        if best is None or valid > best["valid_accuracy"]:
            best = {"epoch": epoch, "valid_accuracy": round(valid, 2), "test_accuracy": round(test, 2)}
    return {
        "seed": seed,
        **best,
        "valid_curve": curve,
        "vocab_size": len(vocab),
        "train_examples": len(rows),
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", default="trec", help=f"one of {', '.join(sorted(CLASSIFICATION_DATASETS))}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--data-dir", default=None, help="where the datasets are (default: as `vaswani train`)"
    )
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = [
            run(args.dataset, seed, args.epochs, args.data_dir, args.limit_train) for seed in args.seeds
        ]
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"CNN-rand (Kim, 2014) on {args.dataset}: best validation epoch of {args.epochs}, test at that epoch"
    )
    print(f"{'seed':>5} {'epoch':>6} {'valid':>7} {'test':>7} {'minutes':>8}")
    for r in results:
        valid, test = r["valid_accuracy"], r["test_accuracy"]
        print(f"{r['seed']:>5} {r['epoch']:>6} {valid:>7.2f} {test:>7.2f} {r['minutes']:>8.2f}")
    summary = {}
    for key in ("valid_accuracy", "test_accuracy"):
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = {"mean": round(statistics.mean(values), 2), "std": round(spread, 2)}
    valid, test = summary["valid_accuracy"], summary["test_accuracy"]
    print(
        f"{'mean':>5} {'':>6} {valid['mean']:>7.2f} {test['mean']:>7.2f}"
        f"   (std {valid['std']:.2f}, {test['std']:.2f})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"dataset": args.dataset, "epochs": args.epochs, "runs": results, "summary": summary}
        record["torch"] = torch.__version__
        record["date"] = time.strftime("%Y-%m-%d")
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
