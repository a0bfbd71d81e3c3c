"""A tiny translation run through the real `vaswani train`, in this process or in others (torchrun, or a
process to kill): a synthetic parallel corpus in files, a recipe, and readers of what the run left."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from vaswani.training.checkpoint import latest_checkpoint, load_weights

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ["the", "a", "dog", "cat", "man", "woman", "runs", "sees", "eats", "big", "small", "red", "blue"]


def write_corpus(directory: Path, pairs: int = 160, seed: int = 0) -> dict[str, str]:
    """Parallel files: the target is the source reversed with every word upper-cased, lengths 2-9 words (a
    spread of lengths, so token buckets hold different numbers of sentences)."""
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", pairs), ("valid", 12)):
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]
        tgt = [" ".join(w.upper() for w in reversed(s.split())) for s in src]
        for side, lines in (("src", src), ("tgt", tgt)):
            path = directory / f"{split}.{side}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths[f"{split}_{side}"] = str(path)
    return paths


def write_recipe(directory: Path, **train: object) -> Path:
    """A recipe for a 1+1-layer model on the corpus of `write_corpus` (written beside it if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "train.src").is_file():
        write_corpus(directory)
    names = [f"{split}_{side}" for split in ("train", "valid") for side in ("src", "tgt")]
    files = {name: str(directory / name.replace("_", ".")) for name in names}
    values: dict[str, object] = {
        "max_steps": 6,
        "lr_schedule": "constant",
        "lr": 3e-3,
        "warmup_steps": 0,
        # Adam divides by sqrt(v) + eps: with eps = 1e-9 a gradient that is zero up to rounding (the key
        # bias, which softmax ignores) becomes a full-size step of noise; comparisons would measure that.
        "eps": 1e-3,
        "log_every": 1,
        "eval_every": 100,
        "save_every": 3,
        "average_last": 0,
        "eval_bleu_sentences": 0,
        "progress": False,
        "threads": 1,
        "device": "cpu",
    }
    values.update(train)

    def toml(v: object) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [
        'name = "tiny"',
        "[model]",
        'preset = "tiny"',
        "d_model = 32",
        "d_ff = 64",
        "n_encoder_layers = 1",
        "n_decoder_layers = 1",
        "dropout = 0.0",
        "max_len = 32",
        "[data]",
        'task = "translation"',
        'dataset = "files"',
        "vocab_size = 120",
        "max_tokens = 120",
        *(f"{k} = {toml(v)}" for k, v in files.items()),
        "[train]",
        *(f"{k} = {toml(v)}" for k, v in values.items()),
    ]
    path = directory / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def environment(**extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout's package first, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_command(recipe: Path, run_dir: Path, processes: int = 0, resume: bool = False) -> list[str]:
    """`vaswani train` as a command line: alone (processes=0) or under torchrun with `processes` workers."""
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    args = [*launcher, "-m", "vaswani.cli", "train", str(recipe), "--run-dir", str(run_dir)]
    return args + (["--resume"] if resume else [])


def train(recipe: Path, run_dir: Path, processes: int = 0, resume: bool = False, timeout: float = 120):
    """Run `vaswani train` in a child process and insist that it succeeds."""
    result = subprocess.run(
        train_command(recipe, run_dir, processes, resume),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("split") == split]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the run's latest checkpoint (verified against its checksums)."""
    from vaswani.recipes import load_recipe
    from vaswani.tasks import make_task

    task = make_task(load_recipe(run_dir / "recipe.toml"), run_dir)
    model = task.build_model()
    load_weights(latest_checkpoint(run_dir / "checkpoints"), model)
    return model.state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run_sequence(steps: list[list[str]], processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """Several `vaswani` commands (and ["copy", FROM, TO] between them) in one torchrun launch: starting
    the workers costs more than these tiny runs, so one launch serves a whole test."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        __file__,
        json.dumps(steps),
    ]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _main(steps: list[list[str]]) -> int:
    import shutil

    import torch.distributed as dist

    from vaswani.cli import main

    # One process group for all the runs: the trainer then leaves it in place between them (torchrun's
    # rendezvous serves one initialisation per worker).
    dist.init_process_group(backend="gloo")

    for step in steps:
        if step[0] == "copy":  # rank 0 copies
            if os.environ.get("RANK", "0") == "0":
                shutil.copytree(step[1], step[2])
        else:
            code = main(step)
            if code != 0:
                return code
        # Rank 0 writes the checkpoints and the copies after the last collective of a step: without this
        # barrier another rank could start the next step (a --resume reading them) before they are there.
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_main(json.loads(sys.argv[1])))
