"""Bad input, everywhere: every `vaswani` command fed broken recipes, files, run directories, checkpoints,
tokenizers and arguments must answer with one line `error: ...` naming the problem (the file, key or
value) and exit with status 2, never with a traceback.

Three tiny runs (translation, classification, character LM), trained once for the module on a few dozen
made-up sentences, are copied and damaged case by case. The matrix below reads as a table: the command,
the bad input, how it is given, and what the one-line error must name. docs/RELIABILITY.md ("Bad input")
summarises it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vaswani.cli import main

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = "café\n".encode("latin-1")  # é as one Latin-1 byte: not UTF-8
BINARY = b"\x00\xff\xfe\x81garbage"
# Characters no training sentence below holds: CJK, a snowman, an emoji, a combining accent.
UNSEEN = "日本語 ☃ 🙂 e\u0301"

TINY = [
    "model.preset='tiny'",
    "model.max_len=64",
    "train.progress=false",
    "train.max_steps=2",
    "train.save_every=1",
    "train.eval_every=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.keep_checkpoints=2",
    "train.average_last=2",
]


def _train(config: Path, run_dir: Path) -> None:
    args = ["train", str(config), "--run-dir", str(run_dir)]
    for value in TINY:
        args += ["--set", value]
    assert main(args) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Data files and three trained runs (run_mt, run_clf, run_lm): about 6 s on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input")
    rng = random.Random(0)
    words = [
        "a",
        "man",
        "dog",
        "cat",
        "runs",
        "sits",
        "the",
        "on",
        "in",
        "park",
        "house",
        "red",
        "blue",
        "big",
        "small",
    ]
    src = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 7))) for _ in range(60)]
    (root / "train.src").write_text("\n".join(src) + "\n")
    (root / "train.tgt").write_text("\n".join(s.upper() for s in src) + "\n")
    labels = ["pos", "neg", "mid"]
    rows = ["text\tlabel"] + [f"{s}\t{labels[i % 3]}" for i, s in enumerate(src)]
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    (root / "lm.txt").write_text("\n".join(src) * 3)
    recipes = {
        "mt": 'task = "translation"\ndataset = "files"\nvocab_size = 60\nlimit_valid = 4\n'
        + "".join(
            f'{s}_{side} = "{root}/train.{side}"\n'
            for s in ("train", "valid", "test")
            for side in ("src", "tgt")
        ),
        "clf": 'task = "classification"\ndataset = "files"\ntokenizer = "wordpiece"\nvocab_size = 60\n'
        + "".join(f'{s}_file = "{root}/train.tsv"\n' for s in ("train", "valid", "test")),
        "lm": f'task = "lm"\ndataset = "files"\ntokenizer = "chars"\nblock_size = 16\nbatch_size = 4\n'
        f'windows_per_epoch = 8\ntrain_file = "{root}/lm.txt"\nvalid_file = "{root}/lm.txt"\n',
    }
    for kind, data in recipes.items():
        (root / f"{kind}.toml").write_text(f'name = "{kind}"\n[data]\n{data}')
        _train(root / f"{kind}.toml", root / f"run_{kind}")
    torch.set_num_threads(threads)
    return root


@dataclass
class Env:
    """What a case builds its arguments from: the module's runs and data, and a scratch directory."""

    world: Path
    tmp: Path

    def run(self, kind: str) -> Path:
        return self.world / f"run_{kind}"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def recipe(self, text: str, name: str = "recipe.toml") -> Path:
        return self.file(name, text)

    def damaged(self, user: str, damage: Callable[[Path], object]) -> Path:
        """A copy of the run that `user` (a command of USES, or a kind: mt, clf, lm) works on, with
        `damage` applied to it."""
        kind = USES[user][0] if user in USES else user
        copy = self.tmp / f"damaged_{kind}"
        shutil.copytree(self.run(kind), copy)
        damage(copy)
        return copy

    def train(self, recipe_text: str, **paths: Path) -> list[str]:
        """`vaswani train` on a recipe (with `key = "path"` lines added to its last section), kept tiny
        in case the bad input were not caught: one step of the tiny preset."""
        text = recipe_text + "".join(f'{key} = "{path}"\n' for key, path in paths.items())
        args = ["train", str(self.recipe(text)), "--run-dir", str(self.tmp / "out")]
        tiny = [] if "init_from" in text else ["model.preset='tiny'"]  # init_from fixes the architecture
        for value in [*tiny, "train.progress=false", "train.max_steps=1"]:
            args += ["--set", value]
        return args


# ---------------------------------------------------------------------------------------- damage
def final(run: Path) -> Path:
    """The checkpoint the run's FINAL pointer names."""
    return run / (run / "FINAL").read_text().strip()


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def write(path: Path, content: str | bytes) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(json.dumps(document), encoding="utf-8")


def meta_names(extra: str) -> Callable[[Path], None]:
    """A meta.json that lists `extra` among the checkpoint's files (with a made-up checksum)."""

    def damage(run: Path) -> None:
        edit_json(final(run) / "meta.json", lambda meta: meta["sha256"].update({extra: "0" * 64}))

    return damage


def swap_weights(source: Path) -> Callable[[Path], None]:
    """Replace the run's final weights by those of the run `source` (a classifier's, say)."""

    def damage(run: Path) -> None:
        shutil.rmtree(final(run))
        shutil.copytree(final(source), final(run))

    return damage


def tokenizer_vocab(size: int) -> Callable[[Path], None]:
    """A tokenizer.json whose vocabulary was cut to its first `size` tokens (and whose merges are gone)."""

    def cut(document: dict) -> None:
        model = document["tokenizer"]["model"]
        model["vocab"] = {token: i for token, i in model["vocab"].items() if i < size}
        model["merges"] = []

    return lambda run: edit_json(run / "tokenizer.json", cut)


def other_kind(document: dict) -> None:
    """A tokenizer file whose kind was edited to one its model does not match."""
    document["kind"] = "bpe" if document["kind"] == "wordpiece" else "wordpiece"


def broken_marian(document: dict) -> None:
    """A "pretrained" (Marian) tokenizer file whose SentencePiece models are four bytes of nothing."""
    special = {"pad": 0, "bos": 0, "eos": 1, "unk": 2}
    document.update(kind="pretrained", family="marian", special=special, vocab={})
    document.update(source_spm="AAAA", target_spm="AAAA")


def broken_bert(document: dict) -> None:
    """A "pretrained" (BERT) tokenizer file whose `tokenizers` specification is not one."""
    special = {"pad": 0, "bos": 0, "eos": 1, "unk": 2, "sep": 3}
    document.update(kind="pretrained", family="bert", special=special, tokenizer={"x": 1})


def with_test_file(content: str) -> Callable[[Path], None]:
    """A classifier run whose recipe's test_file is replaced by `content` (written as test.tsv)."""

    def damage(run: Path) -> None:
        path = run / "test.tsv"
        path.write_text(content, encoding="utf-8")
        recipe = (run / "recipe.toml").read_text(encoding="utf-8")
        old = next(line for line in recipe.splitlines() if line.startswith("test_file"))
        (run / "recipe.toml").write_text(recipe.replace(old, f'test_file = "{path}"'), encoding="utf-8")

    return damage


def hf_dir(env: Env, files: dict[str, str | bytes]) -> Path:
    """A Hugging Face checkpoint directory: a BERT config.json plus `files`."""
    directory = env.tmp / "hf"
    directory.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"]}
    (directory / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        write(directory / name, content)
    return directory


def safetensors_bytes(env: Env) -> bytes:
    save_file({"w": torch.zeros(4, 4)}, str(env.tmp / "w.safetensors"))
    return (env.tmp / "w.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------- the matrix
@dataclass
class Case:
    command: str
    bad_input: str
    args: Callable[[Env], list]
    names: tuple[str, ...]  # what the one-line error must contain (file, key, value, problem)

    @property
    def id(self) -> str:
        return f"{self.command}: {self.bad_input}"


def case(command: str, bad_input: str, args: Callable[[Env], list], *names: str) -> Case:
    return Case(command, bad_input, args, names)


# Recipes of dataset = "files"; a case adds the file paths (Env.train).
FILES_MT = 'name = "x"\n[data]\ntask = "translation"\ndataset = "files"\n'
FILES_CLF = 'name = "x"\n[data]\ntask = "classification"\ndataset = "files"\n'
FILES_LM = 'name = "x"\n[data]\ntask = "lm"\ndataset = "files"\ntokenizer = "chars"\n'

# Commands that load a run, with the arguments that make each one do its work.
USES = {
    "translate": ("mt", ["a man"]),
    "classify": ("clf", ["a man"]),
    "generate": ("lm", ["--prompt", "a man", "--max-new-tokens", "2"]),
    "evaluate": ("clf", ["--split", "test"]),
    "attention": ("mt", ["a man", "--out", "{tmp}/att"]),
}


def use(command: str, run: Path, env: Env, checkpoint: str | None = None) -> list:
    """The command's ordinary arguments on `run` (and --checkpoint)."""
    args = [command, run, *(a.replace("{tmp}", str(env.tmp)) for a in USES[command][1])]
    return args + (["--checkpoint", checkpoint] if checkpoint else [])


# fmt: off
# The matrix: (command, bad input, the arguments that give it, what the one-line error must name...).
RECIPE_CASES = [
    case("train", "malformed TOML",                 lambda e: ["train", e.recipe("name = \n[data")], "recipe.toml", "not valid TOML"),
    case("train", "recipe file missing",            lambda e: ["train", e.tmp / "nope.toml"], "recipe file not found", "nope.toml"),
    case("train", "recipe is a directory",          lambda e: ["train", e.tmp], "cannot read recipe"),
    case("train", "recipe in Latin-1",              lambda e: ["train", e.recipe(b"name = 'caf\xe9'\n")], "recipe.toml", "line 1 is not UTF-8"),
    case("train", "recipe of binary bytes",         lambda e: ["train", e.recipe(BINARY)], "recipe.toml", "not UTF-8"),
    case("train", "unknown top-level key",          lambda e: ["train", e.recipe("[modle]\nx = 1\n")], "'modle'", "did you mean model?"),
    case("train", "unknown key",                    lambda e: ["train", e.recipe("[train]\nwarmup_step = 1\n")], "warmup_step", "did you mean warmup_steps?"),
    case("train", "unknown model key",              lambda e: ["train", e.recipe("[model]\nd_modle = 64\n")], "d_modle", "unknown key"),
    case("train", "section given as a value",       lambda e: ["train", e.recipe("data = 3\n")], "[data]", "must be a table"),
    case("train", "name given as a table",          lambda e: ["train", e.recipe("[name]\nx = 1\n")], "name = {'x': 1}", "expected a string"),
    case("train", "string for an int",              lambda e: ["train", e.recipe("[train]\nmax_steps = 'ten'\n")], "max_steps = 'ten'", "expected int"),
    case("train", "negative step count",            lambda e: ["train", e.recipe("[train]\nmax_steps = -1\n")], "max_steps = -1", ">= 1"),
    case("train", "NaN learning rate",              lambda e: ["train", e.recipe("[train]\nlr = nan\n")], "[train] lr"),
    case("train", "infinite learning rate",         lambda e: ["train", e.recipe("[train]\nlr = inf\n")], "lr = inf", "finite"),
    case("train", "NaN length penalty",             lambda e: ["train", e.recipe("[decode]\nlength_penalty = nan\n")], "length_penalty = nan", "finite"),
    case("train", "top_p above 1",                  lambda e: ["train", e.recipe("[decode]\ntop_p = 2.0\n")], "top_p = 2.0", "(0, 1]"),
    case("train", "top_k of 0",                     lambda e: ["train", e.recipe("[decode]\ntop_k = 0\n")], "top_k = 0", ">= 1"),
    case("train", "limit_train of 0",               lambda e: ["train", e.recipe("[data]\nlimit_train = 0\n")], "limit_train = 0"),
    case("train", "max_sentences of 0",             lambda e: ["train", e.recipe("[data]\nmax_sentences = 0\n")], "max_sentences = 0"),
    case("train", "threads of 0",                   lambda e: ["train", e.recipe("[train]\nthreads = 0\n")], "threads = 0"),
    case("train", "max_epochs of 0",                lambda e: ["train", e.recipe("[train]\nmax_epochs = 0\n")], "max_epochs = 0"),
    case("train", "negative max_minutes",           lambda e: ["train", e.recipe("[train]\nmax_minutes = -1.0\n")], "max_minutes = -1.0"),
    case("train", "unknown device",                 lambda e: ["train", e.recipe("[train]\ndevice = 'tpu'\n")], "device = 'tpu'"),
    case("train", "unknown precision",              lambda e: ["train", e.recipe("[train]\nprecision = 'fp8'\n")], "precision = 'fp8'"),
    case("train", "d_model not divisible by heads", lambda e: ["train", e.recipe("[model]\nd_model = 510\n")], "d_model=510", "n_heads"),
    case("train", "unknown activation",             lambda e: ["train", e.recipe("[model]\nactivation = 'tanh'\n")], "activation='tanh'"),
    case("train", "dropout of 2",                   lambda e: ["train", e.recipe("[model]\ndropout = 2.0\n")], "dropout=2.0"),
    case("train", "vocabulary size set by hand",    lambda e: ["train", e.recipe("[model]\nvocab_size = 9\n")], "vocab_size", "from the tokenizer"),
    case("train", "LM window longer than max_len",  lambda e: [*e.train(FILES_LM + "block_size = 500\n", train_file=e.world / "lm.txt", valid_file=e.world / "lm.txt"), "--set", "model.max_len=64"], "block_size = 500", "max_len = 64"),
    case("train", "--set without =",                lambda e: ["train", e.recipe(""), "--set", "train.max_steps"], "--set 'train.max_steps'", "section.key=value"),
    case("train", "--set unknown key",              lambda e: ["train", e.recipe(""), "--set", "train.max_step=1"], "max_step", "did you mean max_steps?"),
    case("train", "--set bad value",                lambda e: ["train", e.recipe(""), "--set", "train.precision=fp8"], "precision = 'fp8'"),
]

DATA_CASES = [
    case("train", "source file missing",            lambda e: e.train(FILES_MT, train_src=e.tmp / "no.src", train_tgt=e.tmp / "no.tgt"), "no.src", "file not found"),
    case("train", "source file empty",              lambda e: e.train(FILES_MT, train_src=e.file("e.src", ""), train_tgt=e.file("e.tgt", "")), "e.src", "empty"),
    case("train", "source file in Latin-1",         lambda e: e.train(FILES_MT, train_src=e.file("l.src", LATIN1), train_tgt=e.file("l.tgt", "x\n")), "l.src", "line 1 is not valid UTF-8"),
    case("train", "misaligned parallel files",      lambda e: e.train(FILES_MT, train_src=e.file("a.src", "a\nb\nc\n"), train_tgt=e.file("a.tgt", "x\ny\n")), "a.tgt", "aligned line by line"),
    case("train", "files dataset without files",    lambda e: e.train(FILES_MT), "train_src and train_tgt"),
    case("train", "labelled file of binary bytes",  lambda e: e.train(FILES_CLF, train_file=e.file("b.tsv", b"text\tlabel\n" + BINARY + b"\tx\n")), "b.tsv", "line 2 is not valid UTF-8"),
    case("train", "labelled file, no label column", lambda e: e.train(FILES_CLF, train_file=e.file("n.tsv", "text\tclass\nhi\tx\n")), "n.tsv", "no column 'label'"),
    case("train", "labelled file empty",            lambda e: e.train(FILES_CLF, train_file=e.file("e.tsv", "")), "e.tsv", "empty"),
    case("train", "labelled row missing a field",   lambda e: e.train(FILES_CLF, train_file=e.file("r.tsv", "text\tlabel\nhi\n")), "r.tsv", "line 2"),
    case("train", "JSONL line that is not JSON",    lambda e: e.train(FILES_CLF, train_file=e.file("j.jsonl", "{not json\n")), "j.jsonl", "line 1 is not valid JSON"),
    case("train", "LM text file missing",           lambda e: e.train(FILES_LM, train_file=e.tmp / "no.txt"), "no.txt", "file not found"),
    case("train", "LM text file empty",             lambda e: e.train(FILES_LM, train_file=e.file("e.txt", "")), "e.txt", "empty"),
    case("train", "LM text file in Latin-1",        lambda e: e.train(FILES_LM, train_file=e.file("l.txt", LATIN1)), "l.txt", "line 1 is not valid UTF-8"),
    case("train", "LM text shorter than a window",  lambda e: e.train(FILES_LM + "block_size = 32\n", train_file=e.file("s.txt", "abc")), "3 tokens", "block_size"),
    case("train", "unknown dataset",                lambda e: e.train('[data]\ndataset = "nope"\n'), "'nope'", "choose from"),
    case("train", "data directory missing",         lambda e: e.train("[data]\n", data_dir=e.tmp / "nodata"), "nodata", "does not exist"),
    case("train", "--resume without a run",         lambda e: [*e.train(FILES_LM, train_file=e.world / "lm.txt"), "--resume"], "--resume", "no checkpoint"),
    case("train", "init_from a missing run",        lambda e: e.train("[model]\n", init_from=e.tmp / "norun"), "norun", "not found"),
    case("train", "init_from a classifier (MT)",    lambda e: e.train(f'[model]\ninit_from = "{e.run("clf")}"\n' + FILES_MT.split("\n", 1)[1], train_src=e.world / "train.src", train_tgt=e.world / "train.tgt"), "TransformerClassifier", "starts from Transformer"),
    case("train", "init_from a missing package",    lambda e: e.train('[model]\ninit_from = "hf:pkg:no_such_pkg/model"\n'), "no_such_pkg", "not installed"),
]

# Every command that loads a run gets the same damaged run directories and checkpoints.
RUN_CASES = [c for command in USES for c in [
    case(command, "run directory missing",            lambda e, c=command: use(c, e.tmp / "norun", e), "norun", "not found"),
    case(command, "run directory is a file",          lambda e, c=command: use(c, e.file("afile", "x"), e), "afile"),
    case(command, "no recipe.toml",                   lambda e, c=command: use(c, e.damaged(c, lambda r: (r / "recipe.toml").unlink()), e), "recipe.toml"),
    case(command, "recipe.toml corrupt",              lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "recipe.toml", "[[[")), e), "recipe.toml", "not valid TOML"),
    case(command, "weights truncated",                lambda e, c=command: use(c, e.damaged(c, lambda r: truncate(final(r) / "model.safetensors")), e), "model.safetensors", "corrupt or truncated"),
    case(command, "weights with a flipped byte",      lambda e, c=command: use(c, e.damaged(c, lambda r: flip_byte(final(r) / "model.safetensors")), e), "model.safetensors", "sha256"),
    case(command, "weights file deleted",             lambda e, c=command: use(c, e.damaged(c, lambda r: (final(r) / "model.safetensors").unlink()), e), "model.safetensors", "missing"),
    case(command, "meta.json deleted",                lambda e, c=command: use(c, e.damaged(c, lambda r: (final(r) / "meta.json").unlink()), e), "no meta.json"),
    case(command, "meta.json not JSON",               lambda e, c=command: use(c, e.damaged(c, lambda r: write(final(r) / "meta.json", "{not json")), e), "meta.json", "not valid JSON"),
    case(command, "meta.json naming ../ files",       lambda e, c=command: use(c, e.damaged(c, meta_names("../../../../etc/hostname")), e), "meta.json", "points outside"),
    case(command, "meta.json naming /absolute files", lambda e, c=command: use(c, e.damaged(c, meta_names("/etc/hostname")), e), "meta.json", "points outside"),
    case(command, "tokenizer.json truncated",         lambda e, c=command: use(c, e.damaged(c, lambda r: truncate(r / "tokenizer.json")), e), "tokenizer.json", "not valid JSON"),
    case(command, "tokenizer.json empty",             lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "tokenizer.json", "")), e), "tokenizer.json", "not valid JSON"),
    case(command, "tokenizer.json binary",            lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "tokenizer.json", BINARY)), e), "tokenizer.json", "not UTF-8"),
    case(command, "tokenizer.json deleted",           lambda e, c=command: use(c, e.damaged(c, lambda r: (r / "tokenizer.json").unlink()), e), "no tokenizer.json"),
    case(command, "tokenizer kind edited",            lambda e, c=command: use(c, e.damaged(c, lambda r: edit_json(r / "tokenizer.json", other_kind)), e), "tokenizer.json", "tampered"),
    case(command, "tokenizer vocabulary cut",         lambda e, c=command: use(c, e.damaged(c, tokenizer_vocab(20)), e), "weights do not fit", "in the checkpoint"),
    case(command, "FINAL pointing to ../../etc",      lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "FINAL", "../../etc\n")), e), "FINAL", "corrupt pointer"),
    case(command, "FINAL an absolute path",           lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "FINAL", "/etc\n")), e), "FINAL", "corrupt pointer"),
    case(command, "FINAL empty",                      lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "FINAL", "")), e), "FINAL", "corrupt pointer"),
    case(command, "FINAL binary",                     lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "FINAL", BINARY)), e), "FINAL", "corrupt pointer"),
    case(command, "LATEST pointing to ../../../etc",  lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "checkpoints" / "LATEST", "../../../etc\n")), e, "last"), "LATEST", "corrupt pointer"),
    case(command, "LATEST binary",                    lambda e, c=command: use(c, e.damaged(c, lambda r: write(r / "checkpoints" / "LATEST", BINARY)), e, "last"), "LATEST", "corrupt pointer"),
    case(command, "--checkpoint escaping",            lambda e, c=command: use(c, e.run(USES[c][0]), e, "step_../../x"), "unknown checkpoint 'step_../../x'"),
    case(command, "--checkpoint of no step",          lambda e, c=command: use(c, e.run(USES[c][0]), e, "step_0000099"), "step_0000099", "not a checkpoint"),
    case(command, "--device unknown",                 lambda e, c=command: [*use(c, e.run(USES[c][0]), e), "--device", "tpu"], "device 'tpu'"),
]]

WRONG_RUN_CASES = [
    case("translate", "a classifier run",              lambda e: ["translate", e.run("clf"), "a man"], "'classification'", "not a translation run"),
    case("translate", "a language model run",          lambda e: ["translate", e.run("lm"), "a man"], "'lm'", "not a translation run"),
    case("classify",  "a translation run",             lambda e: ["classify", e.run("mt"), "a man"], "'translation'", "not a classification run"),
    case("generate",  "a translation run",             lambda e: ["generate", e.run("mt"), "--prompt", "a"], "not a language model run"),
    case("embed",     "a translation run",             lambda e: ["embed", e.run("mt"), "a"], "not an encoder run"),
    case("export",    "a language model run",          lambda e: ["export", e.run("lm"), "--out", e.tmp / "x"], "TransformerLM"),
    case("translate", "a classifier's weights",        lambda e: ["translate", e.damaged("translate", swap_weights(e.run("clf"))), "a man"], "weights do not fit"),
    case("classify",  "labels.txt with a label more",  lambda e: ["classify", e.damaged("classify", lambda r: write(r / "labels.txt", "a\nb\nc\nd\n")), "a"], "head.weight", "in the checkpoint"),
    case("classify",  "labels.txt empty",              lambda e: ["classify", e.damaged("classify", lambda r: write(r / "labels.txt", "")), "a"], "labels.txt"),
    case("classify",  "labels.txt binary",             lambda e: ["classify", e.damaged("classify", lambda r: write(r / "labels.txt", BINARY)), "a"], "labels.txt", "not UTF-8"),
    case("translate", "model.json not JSON",           lambda e: ["translate", e.damaged("translate", lambda r: write(r / "model.json", "{bad")), "a"], "model.json", "not a readable JSON"),
    case("translate", "model.json a list",             lambda e: ["translate", e.damaged("translate", lambda r: write(r / "model.json", "[1]")), "a"], "model.json", "JSON object"),
    case("translate", "model.json, unknown field",     lambda e: ["translate", e.damaged("translate", lambda r: write(r / "model.json", '{"vocab_size": 60, "bogus": 1}')), "a"], "model.json", "bogus"),
    case("translate", "pretrained tokenizer, bad SentencePiece", lambda e: ["translate", e.damaged("translate", lambda r: edit_json(r / "tokenizer.json", broken_marian)), "a"], "tokenizer.json", "pretrained tokenizer"),
    case("translate", "pretrained tokenizer, bad WordPiece",     lambda e: ["translate", e.damaged("translate", lambda r: edit_json(r / "tokenizer.json", broken_bert)), "a"], "tokenizer.json", "pretrained tokenizer"),
]

ARGUMENT_CASES = [
    case("translate", "empty string",                  lambda e: ["translate", e.run("mt"), ""], "input 1 is empty"),
    case("translate", "only spaces",                   lambda e: ["translate", e.run("mt"), "a", "   "], "input 2 is empty"),
    case("translate", "over-long sentence",            lambda e: ["translate", e.run("mt"), "a man " * 200], "input 1 has", "at most 64"),
    case("translate", "beam size 0",                   lambda e: ["translate", e.run("mt"), "--beam", "0", "a"], "beam_size=0"),
    case("translate", "NaN length penalty",            lambda e: ["translate", e.run("mt"), "--length-penalty", "nan", "a"], "length_penalty=nan"),
    case("classify",  "empty string",                  lambda e: ["classify", e.run("clf"), ""], "input 1 is empty"),
    case("generate",  "empty prompt",                  lambda e: ["generate", e.run("lm"), "--prompt", ""], "prompt is empty"),
    case("generate",  "over-long prompt",              lambda e: ["generate", e.run("lm"), "--prompt", "a man " * 100], "the prompt has 600 tokens"),
    case("generate",  "max_new_tokens 0",              lambda e: ["generate", e.run("lm"), "--prompt", "a", "--max-new-tokens", "0"], "max_new_tokens=0"),
    case("generate",  "negative temperature",          lambda e: ["generate", e.run("lm"), "--prompt", "a", "--temperature", "-1"], "temperature=-1.0"),
    case("generate",  "NaN temperature",               lambda e: ["generate", e.run("lm"), "--prompt", "a", "--temperature", "nan"], "temperature=nan"),
    case("generate",  "top_k 0",                       lambda e: ["generate", e.run("lm"), "--prompt", "a", "--top-k", "0"], "top_k=0"),
    case("generate",  "top_p 1.5",                     lambda e: ["generate", e.run("lm"), "--prompt", "a", "--top-p", "1.5"], "top_p=1.5"),
    case("evaluate",  "--src missing",                 lambda e: ["evaluate", e.run("mt"), "--src", e.tmp / "no.src", "--ref", e.tmp / "no.ref"], "--src file not found", "no.src"),
    case("evaluate",  "--src in Latin-1",              lambda e: ["evaluate", e.run("mt"), "--src", e.file("l.src", LATIN1), "--ref", e.file("l.ref", "x\n")], "l.src", "line 1 is not UTF-8"),
    case("evaluate",  "--src of binary bytes",         lambda e: ["evaluate", e.run("mt"), "--src", e.file("b.src", BINARY), "--ref", e.file("b.ref", "x\n")], "b.src", "not UTF-8"),
    case("evaluate",  "--src empty",                   lambda e: ["evaluate", e.run("mt"), "--src", e.file("e.src", ""), "--ref", e.file("e.ref", "")], "e.src", "empty"),
    case("evaluate",  "--src, --ref misaligned",       lambda e: ["evaluate", e.run("mt"), "--src", e.file("m.src", "a\nb\n"), "--ref", e.file("m.ref", "x\n")], "2 lines", "--ref has 1"),
    case("evaluate",  "empty line in --src",           lambda e: ["evaluate", e.run("mt"), "--src", e.file("el.src", "a\n\n"), "--ref", e.file("el.ref", "x\ny\n")], "input 2 is empty"),
    case("evaluate",  "--src without --ref",           lambda e: ["evaluate", e.run("mt"), "--src", e.file("o.src", "a\n")], "--src and --ref go together"),
    case("evaluate",  "unknown split",                 lambda e: ["evaluate", e.run("clf"), "--split", "nope"], "unknown split 'nope'"),
    case("evaluate",  "unknown label in test file",    lambda e: ["evaluate", e.damaged("evaluate", with_test_file("text\tlabel\nhi\twhat\n")), "--split", "test"], "test.tsv", "unknown label 'what'"),
    case("evaluate",  "label index out of range",      lambda e: ["evaluate", e.damaged("evaluate", with_test_file("text\tlabel\nhi\t7\n")), "--split", "test"], "test.tsv", "unknown label '7'"),
    case("attention", "no text",                       lambda e: ["attention", e.run("mt")], "no input"),
    case("attention", "empty text",                    lambda e: ["attention", e.run("mt"), "", "--out", e.tmp / "a"], "the text is empty"),
    case("attention", "layer out of range",            lambda e: ["attention", e.run("mt"), "a", "--layer", "99", "--out", e.tmp / "a"], "layer 99", "layers 1 to 2"),
    case("attention", "head 0",                        lambda e: ["attention", e.run("mt"), "a", "--head", "0", "--out", e.tmp / "a"], "head 0"),
    case("attention", "over-long text",                lambda e: ["attention", e.run("clf"), "a " * 500, "--out", e.tmp / "a"], "501 tokens", "at most 64"),
    case("attention", "--target count differs",       lambda e: ["attention", e.run("mt"), "a", "b", "--target", "x", "--out", e.tmp / "a"], "2 texts but 1 --target"),
    case("attention", "empty --target",                lambda e: ["attention", e.run("mt"), "a", "--target", "", "--out", e.tmp / "a"], "the target is empty"),
    case("average",   "--last 0",                      lambda e: ["average", e.run("mt"), "--last", "0"], "--last 0"),
    case("average",   "more checkpoints than kept",    lambda e: ["average", e.run("mt"), "--last", "99"], "asked to average 99", "found 2"),
    case("average",   "run directory missing",         lambda e: ["average", e.tmp / "norun", "--last", "1"], "norun", "not found"),
    case("average",   "a step checkpoint corrupt",     lambda e: ["average", e.damaged("translate", lambda r: flip_byte(r / "checkpoints" / "step_0000001" / "model.safetensors")), "--last", "2"], "step_0000001", "corrupt"),
    case("summarize", "run not evaluated",             lambda e: ["summarize", e.run("mt")], "results_test.json not found"),
    case("summarize", "results not JSON",              lambda e: ["summarize", e.damaged("translate", lambda r: write(r / "results_test.json", "{bad"))], "results_test.json", "not a results file"),
    case("summarize", "results a JSON list",           lambda e: ["summarize", e.damaged("translate", lambda r: write(r / "results_test.json", "[1, 2]"))], "results_test.json", "not a results file"),
    case("summarize", "results binary",                lambda e: ["summarize", e.damaged("translate", lambda r: write(r / "results_test.json", BINARY))], "results_test.json", "not a results file"),
    case("crossvalidate", "a language-model recipe",   lambda e: ["crossvalidate", e.world / "lm.toml", "--out", e.tmp / "cv"], "task = 'lm'", "cross-validation is for classification"),
    case("crossvalidate", "recipe file missing",       lambda e: ["crossvalidate", e.tmp / "nope.toml", "--out", e.tmp / "cv"], "recipe file not found", "nope.toml"),
    case("crossvalidate", "--folds 1",                 lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.tmp / "cv", "--folds", "1"], "at least 2 folds, got 1"),
    case("crossvalidate", "--fold out of range",       lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.tmp / "cv", "--folds", "2", "--fold", "0", "--fold", "5"], "fold 5", "0 to 1"),
    case("crossvalidate", "more folds than examples",  lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.tmp / "cv", "--folds", "999"], "120 examples cannot make 999 folds"),
    case("crossvalidate", "--out is a file",           lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.file("cvfile", "x")], "cvfile"),
    case("crossvalidate", "a fold's result corrupt",   lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.file("cv/fold_0/fold_result.json", "{bad").parents[1], "--folds", "2", "--fold", "0"], "fold_0/fold_result.json", "not a fold result"),
    case("crossvalidate", "its setup file corrupt",    lambda e: ["crossvalidate", e.world / "clf.toml", "--out", e.file("cv/crossvalidation_setup.json", "{bad").parent, "--folds", "2"], "crossvalidation_setup.json", "not JSON"),
    case("bench",     "unknown precision",             lambda e: ["bench", "--size", "tiny", "--precision", "fp7", "--no-memory"], "--precision 'fp7'"),
    case("bench",     "unknown implementation",        lambda e: ["bench", "--size", "tiny", "--impl", "jax", "--no-memory"], "--impl 'jax'"),
    case("bench",     "unknown workload",              lambda e: ["bench", "--size", "tiny", "--workloads", "fly", "--no-memory"], "--workloads 'fly'"),
    case("bench",     "repeats 0",                     lambda e: ["bench", "--size", "tiny", "--repeats", "0", "--no-memory"], "--repeats 0"),
    case("bench",     "threads 0",                     lambda e: ["bench", "--size", "tiny", "--threads", "0", "--no-memory"], "--threads 0"),
    case("plot",      "--out is a file",               lambda e: ["plot", "lr", "--out", e.file("plotfile", "x")], "plotfile"),
    case("export",    "unknown format",                lambda e: ["export", e.run("clf"), "--format", "tflite", "--out", e.tmp / "x"], "--format 'tflite'"),
    case("export",    "run directory missing",         lambda e: ["export", e.tmp / "norun", "--out", e.tmp / "x"], "norun", "not found"),
    case("import-hf", "directory missing",             lambda e: ["import-hf", e.tmp / "nohf", e.tmp / "run"], "nohf", "no such checkpoint directory"),
    case("import-hf", "no config.json",                lambda e: ["import-hf", e.file("hf/README", "x").parent, e.tmp / "run"], "no config.json"),
    case("import-hf", "config.json not JSON",          lambda e: ["import-hf", e.file("hf/config.json", "{bad").parent, e.tmp / "run"], "config.json", "cannot be read as JSON"),
    case("import-hf", "config.json binary",            lambda e: ["import-hf", e.file("hf/config.json", BINARY).parent, e.tmp / "run"], "config.json", "cannot be read as JSON"),
    case("import-hf", "unsupported architecture",      lambda e: ["import-hf", e.file("hf/config.json", '{"model_type": "gpt2"}').parent, e.tmp / "run"], "gpt2"),
    case("import-hf", "model.safetensors truncated",   lambda e: ["import-hf", hf_dir(e, {"model.safetensors": safetensors_bytes(e)[:40]}), e.tmp / "run"], "model.safetensors", "not a readable safetensors file"),
    case("import-hf", "model.safetensors binary",      lambda e: ["import-hf", hf_dir(e, {"model.safetensors": BINARY}), e.tmp / "run"], "model.safetensors", "not a readable safetensors file"),
    case("import-hf", "pytorch_model.bin not tensors", lambda e: ["import-hf", hf_dir(e, {"pytorch_model.bin": BINARY}), e.tmp / "run"], "pytorch_model.bin", "cannot be loaded safely"),
    case("import-hf", "shard index without weight_map", lambda e: ["import-hf", hf_dir(e, {"model.safetensors.index.json": "{}"}), e.tmp / "run"], "index.json", "no weight_map"),
    case("import-hf", "shard index naming ../ files",  lambda e: ["import-hf", hf_dir(e, {"model.safetensors.index.json": '{"weight_map": {"w": "../../x.safetensors"}}'}), e.tmp / "run"], "points outside"),
    case("import-hf", "shard index naming /absolute",  lambda e: ["import-hf", hf_dir(e, {"model.safetensors.index.json": '{"weight_map": {"w": "/etc/x.safetensors"}}'}), e.tmp / "run"], "points outside"),
]
# fmt: on

# An image run (the ViT on scikit-learn's 8x8 digits) takes image files where a text run takes text.
# fmt: off
IMAGE_CASES = [
    case("classify",  "image file missing",            lambda e: ["classify", e.run("vit"), e.tmp / "no.png"], "no.png", "file not found"),
    case("classify",  "text instead of an image",      lambda e: ["classify", e.run("vit"), "a man"], "a man", "file not found"),
    case("classify",  "PNG cut after its signature",   lambda e: ["classify", e.run("vit"), e.file("g.png", b"\x89PNG\r\n\x1a\n garbage")], "g.png", "cannot read the PNG"),
    case("classify",  ".npy of pickled objects",       lambda e: ["classify", e.run("vit"), npy(e, "o.npy", np.array([{"a": 1}], dtype=object))], "o.npy", "allow_pickle=False"),
    case("classify",  ".npy of the wrong shape",       lambda e: ["classify", e.run("vit"), npy(e, "s.npy", np.zeros((3, 5, 5)))], "s.npy", "shape (3, 5, 5)"),
    case("classify",  ".npy of NaN pixels",            lambda e: ["classify", e.run("vit"), npy(e, "n.npy", np.full((8, 8), np.nan))], "n.npy", "finite"),
    case("classify",  ".npy pixels outside [0, 1]",    lambda e: ["classify", e.run("vit"), npy(e, "r.npy", np.full((8, 8), 7.0))], "r.npy", "[0, 1]"),
    case("classify",  ".npy truncated",                lambda e: ["classify", e.run("vit"), e.file("t.npy", npy(e, "ok.npy", np.zeros((8, 8))).read_bytes()[:60])], "t.npy", "cannot read the array"),
    case("attention", "--image-index out of range",    lambda e: ["attention", e.run("vit"), "--image-index", "9999", "--out", e.tmp / "a"], "--image-index 9999", "images 0 to"),
    case("attention", "--target on an image run",      lambda e: ["attention", e.run("vit"), "--image-index", "0", "--target", "x", "--out", e.tmp / "a"], "--target"),
    case("serve",     "an image run",                  lambda e: ["serve", e.run("vit")], "image_classification run", "serve takes"),
    case("evaluate",  "unknown split of digits",       lambda e: ["evaluate", e.run("vit"), "--split", "nope"], "unknown split 'nope'", "digits"),
]
# fmt: on


def npy(env: Env, name: str, array: np.ndarray) -> Path:
    """An .npy file of `array` (object arrays pickled, as only a careless or hostile writer would)."""
    path = env.tmp / name
    np.save(path, array, allow_pickle=array.dtype == object)
    return path


# `vaswani serve` refuses everything before it binds a port; none of these may start a server.
# fmt: off
SERVE_CASES = [
    case("serve",     "run directory missing",         lambda e: ["serve", str(e.tmp / "missing")], "run directory not found"),
    case("serve",     "the same run twice",            lambda e: ["serve", e.run("mt"), e.run("mt")], "two runs are named"),
    case("serve",     "tokenizer.json truncated",      lambda e: ["serve", e.damaged("mt", lambda r: truncate(r / "tokenizer.json"))], "tokenizer.json", "not valid JSON"),
    case("serve",     "--max-inputs 0",                lambda e: ["serve", e.run("mt"), "--max-inputs", "0"], "max_inputs=0"),
    case("serve",     "--threads 0",                   lambda e: ["serve", e.run("mt"), "--threads", "0"], "--threads"),
]
# fmt: on

CASES = RECIPE_CASES + DATA_CASES + RUN_CASES + WRONG_RUN_CASES + ARGUMENT_CASES + SERVE_CASES


def assert_one_line_error(code: int, stderr: str, names: tuple[str, ...]) -> None:
    """Status 2, no traceback, exactly one `error:` line, the last one, naming every one of `names`."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0], stderr
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_error_and_status_2(case, world, tmp_path, capsys, one_thread):
    args = [str(a) for a in case.args(Env(world, tmp_path))]
    capsys.readouterr()
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, case.names)


@pytest.fixture(scope="module")
def vit_world(world: Path) -> Path:
    """The module's world plus run_vit: a one-layer ViT trained 2 steps on the digits (about 5 s)."""
    pytest.importorskip("sklearn", reason="the digits data set ships inside scikit-learn")
    args = ["train", str(ROOT / "configs" / "digits_vit.toml"), "--run-dir", str(world / "run_vit")]
    for value in ("train.max_steps=2", "train.progress=false", "train.eval_every=2", "train.save_every=2"):
        args += ["--set", value]
    args += ["--set", "train.average_last=0", "--set", "model.n_encoder_layers=1"]
    assert main(args) == 0
    return world


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.id for c in IMAGE_CASES])
def test_bad_image_input_gives_one_line_error_and_status_2(case, vit_world, tmp_path, capsys, one_thread):
    args = [str(a) for a in case.args(Env(vit_world, tmp_path))]
    capsys.readouterr()
    code = main(args)
    assert_one_line_error(code, capsys.readouterr().err, case.names)


def test_the_matrix_covers_every_command():
    from vaswani.cli import build_parser

    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # every `vaswani COMMAND`
    tested = {c.command for c in CASES}
    assert commands <= tested, f"commands without bad-input cases: {sorted(commands - tested)}"


# Malformed command lines are argparse's to refuse: status 2, its usage line, then one error line.
USAGE_CASES = [
    (["transalte", "run"], "invalid choice: 'transalte'"),
    (["plot", "nope"], "invalid choice: 'nope'"),
    (["bench", "--size", "huge"], "invalid choice: 'huge'"),
    (["translate", "run", "--beam", "four"], "--beam: invalid int value: 'four'"),
    (["generate", "run"], "the following arguments are required: --prompt"),
    (["average", "run"], "the following arguments are required: --last"),
    (["translate", "run", "--beem", "4"], "unrecognized arguments: --beem"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_CASES, ids=[" ".join(a) for a, _ in USAGE_CASES])
def test_malformed_command_lines_exit_2_with_usage_and_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.startswith("usage: vaswani") and message in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------- what works
# Characters the tokenizer never saw are not an error: they encode as <unk> and the model still answers,
# as a user typing a name or an emoji would expect. Over-long classifier input keeps its beginning
# (documented in ClassificationTask.encode); over-long translation input is refused (a translation of
# half a sentence would read as a whole one).
WORKS = [
    ("translate", lambda e: ["translate", e.run("mt"), UNSEEN, "a man " + UNSEEN], 2),
    ("classify", lambda e: ["classify", e.run("clf"), UNSEEN], 1),
    ("classify", lambda e: ["classify", e.run("clf"), "a man " * 500], 1),
    (
        "generate",
        lambda e: ["generate", e.run("lm"), "--prompt", UNSEEN, "--max-new-tokens", "3", "--seed", "0"],
        1,
    ),
    ("attention", lambda e: ["attention", e.run("clf"), "a " + UNSEEN, "--out", e.tmp / "att"], 1),
]


@pytest.mark.parametrize(
    ("command", "args", "lines"),
    WORKS,
    ids=[
        "translate unseen characters",
        "classify unseen characters",
        "classify over-long text",
        "generate unseen characters",
        "attention unseen characters",
    ],
)
def test_unseen_characters_and_long_classifier_input_work(
    command, args, lines, world, tmp_path, capsys, one_thread
):
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib: its font has no glyphs for the CJK characters
        code = main([str(a) for a in args(Env(world, tmp_path))])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.count("\n") >= lines  # an untrained model may well answer with blanks


def test_a_process_with_bad_input_prints_no_traceback(world, tmp_path):
    """The same contract seen from outside: a real process, a corrupt checkpoint, one line on stderr."""
    run = Env(world, tmp_path).damaged("mt", lambda r: truncate(final(r) / "model.safetensors"))
    src = ROOT / "src"
    result = subprocess.run(
        [sys.executable, "-m", "vaswani.cli", "translate", str(run), "a man"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert_one_line_error(result.returncode, result.stderr, ("model.safetensors", "corrupt or truncated"))
