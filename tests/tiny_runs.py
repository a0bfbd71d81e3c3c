"""Tiny run directories (random models, no training, no data files) shared by the attention and serving
tests: what `vaswani train` leaves, minus the training."""

from __future__ import annotations

from pathlib import Path

import torch

from vaswani.recipes import recipe_from_dict, recipe_to_toml
from vaswani.tasks import LABELS_FILE, TOKENIZER_FILE, make_task
from vaswani.tokenization import Tokenizer
from vaswani.training.checkpoint import save_checkpoint

SENTENCES = [
    "A little girl is climbing into a wooden playhouse.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Two men are playing football in the park.",
    "Zwei Männer spielen Fußball im Park.",
    "A dog is running on the beach.",
    "Ein Hund rennt am Strand.",
    "Who wrote Hamlet ?",
    "Where is the Eiffel Tower ?",
]
MAX_LEN = 32
LABELS = ["HUM", "LOC", "NUM"]


def make_run(root: Path, name: str, task: str) -> Path:
    """A run directory holding a tiny random model: what `vaswani train` leaves, minus the training."""
    tokenizer = {
        "translation": lambda: Tokenizer.train_bpe(SENTENCES, vocab_size=150),
        "classification": lambda: Tokenizer.train_wordpiece(SENTENCES, vocab_size=150),
        "lm": lambda: Tokenizer.train_chars([*SENTENCES, "\n"]),
    }[task]()
    recipe = recipe_from_dict(
        {
            "name": name,
            "model": {"preset": "tiny", "max_len": MAX_LEN, "n_heads": 2},
            "data": {"task": task, "dataset": "files", "max_len": MAX_LEN},
            "train": {"device": "cpu"},
            "decode": {"beam_size": 2, "max_new_tokens": 6},
        }
    )
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe), encoding="utf-8")
    tokenizer.save(run_dir / TOKENIZER_FILE)
    if task == "classification":
        (run_dir / LABELS_FILE).write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    save_checkpoint(run_dir / "best", make_task(recipe, run_dir).build_model())
    (run_dir / "FINAL").write_text("best\n", encoding="utf-8")
    return run_dir
