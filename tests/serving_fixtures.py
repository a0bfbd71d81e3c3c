"""Tiny run directories and a live server on loopback, shared by the serving tests and the load benchmark's
test. The runs hold tiny random models (no training, no data files), so that every test is fast."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

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


def make_runs(root: Path) -> dict[str, Path]:
    """One run of each served task, named mt, clf and lm."""
    return {
        "mt": make_run(root, "mt", "translation"),
        "clf": make_run(root, "clf", "classification"),
        "lm": make_run(root, "lm", "lm"),
    }


class LiveServer:
    """An app served by uvicorn on 127.0.0.1 in a background thread (what a browser or a load test needs)."""

    def __init__(self, app) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
