"""End to end through the `vaswani` command: train on small slices of real data, evaluate, use the model,
and get one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaswani.cli import main
from vaswani.data.batching import pad_batch
from vaswani.recipes import load_recipe
from vaswani.runs import load_run
from vaswani.tasks import make_task
from vaswani.tokenization import UNK_ID

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real datasets not found at {DATA}")

QUICK = [
    "model.preset=tiny",
    "train.progress=false",
    "train.log_every=5",
    f"data.data_dir={json.dumps(str(DATA))}",
]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(config, run_dir, *overrides):
    args = ["train", str(ROOT / "configs" / config), "--run-dir", str(run_dir)]
    for value in [*QUICK, *overrides]:
        args += ["--set", value]
    assert main(args) == 0


pytestmark = pytest.mark.usefixtures("one_thread")


@needs_data
@pytest.mark.slow
def test_translation_end_to_end_on_a_slice_of_multi30k(tmp_path, capsys):
    run = tmp_path / "mt"
    train(
        "demo.toml",
        run,
        "data.limit_train=400",
        "data.limit_valid=40",
        "data.vocab_size=600",
        "data.max_tokens=1200",
        "train.max_steps=40",
        "train.eval_every=20",
        "train.save_every=10",
        "train.warmup_steps=10",
        "train.lr_scale=1.0",
        "train.eval_bleu_sentences=10",
        "decode.beam_size=2",
    )
    lines = metrics(run)
    train_lines = [r for r in lines if "split" not in r]
    assert all({"step", "loss", "nll", "lr", "tokens_per_s"} <= set(r) for r in train_lines)
    assert train_lines[-1]["loss"] < 0.85 * train_lines[0]["loss"]
    valid = [r for r in lines if r.get("split") == "valid"]
    assert valid and all("valid_bleu" in r and "valid_nll" in r for r in valid)
    assert (run / "tokenizer.json").is_file() and (run / "plots" / "loss.png").is_file()
    out = capsys.readouterr().out
    assert f"Run directory {run}" in out

    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("A man is riding a bike.\nTwo dogs play in the snow.\n")
    ref.write_text("Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\n")
    assert main(["evaluate", str(run), "--src", str(src), "--ref", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "BLEU = " in out and "tok:13a" in out
    results = json.loads((run / "results_files.json").read_text())
    assert results["sentences"] == 2 and "signature" in results["bleu"]
    assert len((run / "hypotheses_files.txt").read_text().splitlines()) == 2

    assert main(["translate", str(run), "A dog runs.", "A woman sings.", "--beam", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["average", str(run), "--last", "2"]) == 0
    assert main(["translate", str(run), "--checkpoint", "averaged", "A dog runs."]) == 0
    capsys.readouterr()
    assert main(["translate", str(run), "x" * 2000]) == 2
    assert "the model takes at most" in capsys.readouterr().err
    assert main(["translate", str(run), "A dog.", "  "]) == 2
    assert "input 2 is empty" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_classification_end_to_end_on_a_slice_of_trec(tmp_path, capsys):
    run = tmp_path / "trec"
    train(
        "trec.toml",
        run,
        "data.limit_train=600",
        "data.vocab_size=800",
        "train.max_steps=40",
        "train.eval_every=20",
        "train.save_every=20",
        "train.warmup_steps=10",
        "train.lr=1e-3",
    )
    train_lines = [r for r in metrics(run) if "split" not in r]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    valid = [r for r in metrics(run) if r.get("split") == "valid"]
    assert valid and all(0.0 <= r["valid_accuracy"] <= 1.0 for r in valid)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "accuracy = " in out and "macro-F1" in out
    results = json.loads((run / "results_test.json").read_text())
    assert sum(sum(row) for row in results["confusion"]) == 500
    assert (run / "confusion_test.png").is_file()
    assert main(["classify", str(run), "--json", "Who wrote Hamlet ?", "How far is the moon ?"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["label"] in rows[0]["probabilities"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


@needs_data
@pytest.mark.slow
def test_classification_with_fine_labels_end_to_end_on_a_slice_of_sst(tmp_path, capsys):
    run = tmp_path / "sst"
    overrides = [
        "data.fine_labels=true",
        "data.limit_train=600",
        "data.vocab_size=800",
        "data.limit_valid=100",
    ]
    train("sst2.toml", run, *overrides, "train.max_steps=6", "train.eval_every=6", "train.save_every=6")
    lines = (run / "fine_labels.txt").read_text().splitlines()
    assert lines == [
        f"{grade}\t{cls}"
        for grade, cls in zip(
            ["very negative", "negative", "neutral", "positive", "very positive"],
            ["negative", "negative", "", "positive", "positive"],
            strict=True,
        )
    ]
    assert (run / "labels.txt").read_text().splitlines() == ["negative", "positive"]
    valid = [r for r in metrics(run) if r.get("split") == "valid"]
    assert valid and all(0.0 <= r["valid_accuracy"] <= 1.0 for r in valid)
    capsys.readouterr()
    assert main(["classify", str(run), "--json", "a gorgeous , witty film .", "dull and lifeless ."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(r["probabilities"]) for r in rows] == [["negative", "positive"]] * 2
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    # The loss is a sum over examples: two halves of a batch give the whole batch's loss and gradient
    # (what gradient accumulation relies on), neutral sentences (no class) included.
    task = make_task(load_recipe(run / "recipe.toml"), run)
    assert -1 in task.train_data.labels and len(task.train_fine_labels) == len(task.train_data)
    has_class = [label >= 0 for label in task.train_data.labels]
    indices = next(b for b in task.epoch_batches(0) if len({has_class[i] for i in b}) == 2)
    model = task.build_model()
    model.eval()

    def loss_and_grad(part):
        model.zero_grad()
        out = task.loss(model, task.make_batch(part, torch.device("cpu")), 0.1)
        (out.loss * out.n_tokens).backward()
        return (out.loss * out.n_tokens).item(), model.fine_head.weight.grad.clone()

    whole, whole_grad = loss_and_grad(indices)
    half = len(indices) // 2
    (first, first_grad), (second, second_grad) = loss_and_grad(indices[:half]), loss_and_grad(indices[half:])
    assert first + second == pytest.approx(whole, rel=1e-5)
    torch.testing.assert_close(first_grad + second_grad, whole_grad, atol=1e-6, rtol=1e-4)

    # A damaged fine_labels.txt is named in one line; a dataset without finer labels is refused up front.
    (run / "fine_labels.txt").write_text("very negative\tnegative\nneutral\tcheerful\n")
    assert main(["classify", str(run), "fine ."]) == 2
    assert "fine_labels.txt: line 2 is not 'fine class<TAB>one of" in capsys.readouterr().err
    bbc = ["train", str(ROOT / "configs" / "bbc_news.toml"), "--run-dir", str(tmp_path / "bbc")]
    assert main([*bbc, "--set", "data.fine_labels=true"]) == 2
    assert "[data] fine_labels with task = 'classification', dataset = 'bbc_news'" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_masked_lm_pretraining_then_a_classifier_from_it(tmp_path, capsys):
    mlm = tmp_path / "mlm"
    slice_ = ["data.limit_train=600", "data.limit_valid=100", "data.vocab_size=800"]
    steps = ["train.max_steps=6", "train.eval_every=3", "train.save_every=3", "train.warmup_steps=2"]
    train("trec_mlm.toml", mlm, *slice_, *steps, "model.d_model=64", "model.d_ff=128")
    valid = [r for r in metrics(mlm) if r.get("split") == "valid"]
    assert len(valid) == 2 and all(r["valid_nll"] > 0 and 0 <= r["valid_accuracy"] <= 1 for r in valid)
    capsys.readouterr()
    assert main(["evaluate", str(mlm), "--split", "valid"]) == 0
    scored = json.loads((mlm / "results_valid.json").read_text())
    assert main(["attention", str(mlm), "what is it ?", "--out", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "what-is-it" / "cls.png").is_file()
    run = load_run(mlm, device="cpu")  # the whole valid split, scored again: the masking is fixed
    again = run.task.score(run.model, run.task.encode(run.task.texts("valid")), torch.device("cpu"))
    assert again == pytest.approx({k: scored[k] for k in again}, rel=1e-6)

    # Masking: about mask_prob of the real tokens are targets; of those about 80% read <unk>, 10% another
    # token, 10% themselves; nothing else changes; the draw is reproducible per (seed, epoch, batch).
    task = make_task(load_recipe(mlm / "recipe.toml"), mlm)
    cpu = torch.device("cpu")
    inputs, targets, originals = [], [], []
    for indices in task.epoch_batches(0):
        x, y = task.make_batch(indices, cpu)
        inputs.append(x.flatten())
        targets.append(y.flatten())
        originals.append(pad_batch([task.train_ids[i] for i in indices], 0).flatten())
    x, y, ids = torch.cat(inputs), torch.cat(targets), torch.cat(originals)
    chosen, real = y != 0, ids != 0
    assert torch.equal(y[chosen], ids[chosen]) and torch.equal(x[~chosen], ids[~chosen])
    assert 0.13 < chosen.sum() / real.sum() < 0.17
    assert 0.75 < (x[chosen] == UNK_ID).float().mean() < 0.85
    assert 0.06 < (x[chosen] == ids[chosen]).float().mean() < 0.14
    first = task.epoch_batches(0)[0]
    again = make_task(load_recipe(mlm / "recipe.toml"), mlm)
    again.epoch_batches(0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.make_batch(first, cpu), task.make_batch(first, cpu), strict=True)
    )

    # A classifier starts from the pretrained encoder: the same tokenizer, the same weights.
    clf = tmp_path / "clf"
    overrides = [*QUICK[1:], f"model.init_from={json.dumps(str(mlm))}", "data.limit_train=200"]
    args = ["train", str(ROOT / "configs" / "trec_from_mlm.toml"), "--run-dir", str(clf)]
    for value in [*overrides, "train.max_steps=1", "train.eval_every=1"]:
        args += ["--set", value]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained from scratch: fine_head.bias, fine_head.weight, head.bias, head.weight" in out
    assert (clf / "tokenizer.json").read_text() == (mlm / "tokenizer.json").read_text()
    classifier = make_task(load_recipe(clf / "recipe.toml"), clf)
    model = classifier.build_model()
    classifier.initialize(model)
    for name, tensor in run.model.state_dict().items():  # the pretraining run's final weights
        if name != "mlm_bias":
            assert torch.equal(model.state_dict()[name], tensor), name


@needs_data
def test_word_dropout_replaces_the_asked_fraction_and_is_reproducible(tmp_path):
    def task(p):
        overrides = [f"data.word_dropout={p}", "data.limit_train=400", "data.vocab_size=600", *QUICK]
        recipe = load_recipe(ROOT / "configs" / "trec.toml", overrides)
        return make_task(recipe, tmp_path / "run")  # one run directory: one tokenizer, trained once

    plain, dropped, again = task(0.0), task(0.3), task(0.3)
    indices = plain.epoch_batches(0)[0]
    clean = plain.make_batch(indices, torch.device("cpu"))
    noisy = dropped.make_batch(indices, torch.device("cpu"))
    real = clean.ids != 0
    assert torch.equal(noisy.ids != 0, real) and torch.equal(noisy.labels, clean.labels)
    changed = (noisy.ids != clean.ids) & real
    assert torch.all(noisy.ids[changed] == UNK_ID)
    assert 0.2 < changed.sum() / ((clean.ids != UNK_ID) & real).sum() < 0.4
    again.epoch_batches(0)  # a resumed run sees the same corrupted batch; a new epoch, a new draw
    assert torch.equal(again.make_batch(indices, torch.device("cpu")).ids, noisy.ids)
    again.epoch_batches(1)
    assert not torch.equal(again.make_batch(indices, torch.device("cpu")).ids, noisy.ids)
    assert plain.encode(["", "what"])[0] == [UNK_ID]  # a text with no tokens still gives the encoder one


@needs_data
@pytest.mark.slow
def test_language_model_end_to_end_on_tiny_shakespeare(tmp_path, capsys):
    run = tmp_path / "lm"
    train(
        "tiny_shakespeare.toml",
        run,
        "data.block_size=32",
        "data.batch_size=8",
        "train.max_steps=20",
        "train.eval_every=20",
        "train.save_every=20",
        "train.warmup_steps=5",
    )
    valid = [r for r in metrics(run) if r.get("split") == "valid"]
    assert valid[-1]["valid_bpc"] > 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) > len("ROMEO:")
    greedy = ["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "15", "--temperature", "0"]
    assert main(greedy) == 0
    first = capsys.readouterr().out
    assert main(greedy) == 0 and capsys.readouterr().out == first  # greedy: the same every time
    # Past max_len (256): the model reads the last 32 tokens, the windows it was trained on (block_size).
    long = ["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "300", "--temperature", "0"]
    assert main(long) == 0
    assert capsys.readouterr().out.rstrip("\n").startswith(first.rstrip("\n"))
    assert main(["evaluate", str(run)]) == 0
    assert "bits per character" in capsys.readouterr().out


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "vaswani.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.toml"], "recipe file not found"),
        (
            ["train", "configs/demo.toml", "--set", "train.max_step=1"],
            "unknown key (did you mean max_steps?)",
        ),
        (["train", "configs/demo.toml", "--set", "train.precision=fp8"], "precision = 'fp8'"),
        (["evaluate", "no-such-run"], "run directory not found"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message):
    result = run_cli(*args, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_every_command_has_help():
    for command in ("train", "evaluate", "translate", "classify", "generate", "average", "summarize"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: vaswani" in result.stdout
