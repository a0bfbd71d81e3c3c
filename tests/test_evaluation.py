"""Tests of evaluation: sacreBLEU scores, the classification report, perplexity, metrics files and plots.

BLEU and chrF are checked against sacreBLEU itself, both its Python functions and its command line tool,
on real Multi30k sentences when the shared data is there. The classification report is checked against
counts worked out by hand and, by a property test, against the identities that hold for any predictions.
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st

from vaswani.cli import main
from vaswani.evaluation import (
    ClassificationReport,
    bits_per_character,
    classification_report,
    corpus_bleu,
    corpus_chrf,
    format_confusion_matrix,
    perplexity,
    plot_confusion_matrix,
    plot_training_curves,
    read_metrics,
    summarize_runs,
    write_json,
)

MULTI30K_VALID_EN = Path("/work/shared/data/multi30k/raw/val.en.gz")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sentence_pairs() -> tuple[list[str], list[str]]:
    """(hypotheses, references): real references with hypotheses made by plausible translation errors."""
    if MULTI30K_VALID_EN.exists():
        with gzip.open(MULTI30K_VALID_EN, "rt", encoding="utf-8") as lines:
            references = [next(lines).strip() for _ in range(20)]
    else:
        references = [
            "A group of men are loading cotton onto a truck",
            "A man sleeping in a green room on a couch.",
            "A boy wearing headphones sits on a woman's shoulders.",
            "Two men setting up a blue ice fishing hut on an iced over lake",
            "A balding man wearing a red life jacket is sitting in a small boat.",
            "A lady in a red coat, holding a bluish hand bag, jumping off the ground.",
        ]
    hypotheses = []
    for index, reference in enumerate(references):
        words = reference.split()
        if index % 3 == 0:
            words = words[:-1]  # a dropped word
        elif index % 3 == 1:
            words[1], words[2] = words[2], words[1]  # a reordering
        else:
            words = [*words[:2], "the", *words[2:]]  # an inserted word
        hypotheses.append(" ".join(words))
    return hypotheses, references


def test_bleu_and_chrf_equal_sacrebleu_functions(sentence_pairs):
    hypotheses, references = sentence_pairs
    bleu, chrf = corpus_bleu(hypotheses, references), corpus_chrf(hypotheses, references)
    assert bleu.score == sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert chrf.score == sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert 0.0 < bleu.score < 100.0 and 0.0 < chrf.score < 100.0
    assert (bleu.name, chrf.name) == ("BLEU", "chrF2")
    assert "tok:13a" in bleu.signature and "nrefs:1" in bleu.signature
    assert "BP =" in bleu.details and "/" in bleu.details


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(sentence_pairs, tmp_path):
    hypotheses, references = sentence_pairs
    (tmp_path / "hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "sacrebleu", "ref.txt", "-i", "hyp.txt", "-m", "bleu", "chrf"]
    command += ["--width", "6", "--format", "json"]
    output = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    cli_bleu, cli_chrf = json.loads(output)
    for ours, theirs in (
        (corpus_bleu(hypotheses, references), cli_bleu),
        (corpus_chrf(hypotheses, references), cli_chrf),
    ):
        assert ours.name == theirs["name"]
        assert ours.signature == theirs["signature"]
        assert ours.score == pytest.approx(theirs["score"], abs=1e-6)


def test_perfect_translation_scores_100(sentence_pairs):
    _, references = sentence_pairs
    assert corpus_bleu(references, references).score == pytest.approx(100.0)
    assert corpus_chrf(references, references).score == pytest.approx(100.0)


def test_metric_result_to_dict_is_json_ready(sentence_pairs):
    hypotheses, references = sentence_pairs
    result = corpus_bleu(hypotheses, references).to_dict()
    assert set(result) == {"name", "score", "signature", "details"}
    assert json.loads(json.dumps(result)) == result


def test_corpus_scores_reject_unpaired_or_empty_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a b", "c d"], ["a b"])
    with pytest.raises(ValueError, match="empty"):
        corpus_chrf([], [])
    with pytest.raises(TypeError, match="single string"):
        corpus_bleu("a b c", "a b c")


def test_classification_report_matches_hand_computed_scores():
    # true:      0  1  1  1  2  2      class 2 ("c") is never predicted
    # predicted: 0  0  1  1  1  0
    report = classification_report([0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 2, 2], ["a", "b", "c"])
    assert report.confusion == [[1, 0, 0], [1, 2, 0], [1, 1, 0]]
    assert report.accuracy == pytest.approx(3 / 6)
    assert report.precision == pytest.approx([1 / 3, 2 / 3, 0.0])  # never predicted: precision 0
    assert report.recall == pytest.approx([1.0, 2 / 3, 0.0])
    assert report.f1 == pytest.approx([0.5, 2 / 3, 0.0])
    assert report.support == [1, 3, 2]
    assert report.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_confusion_matrix_rows_are_true_labels_and_columns_predictions():
    report = classification_report(predictions=[0], labels=[2], label_names=["a", "b", "c"])
    assert report.confusion == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert report.support == [0, 0, 1]


def test_class_absent_from_labels_and_predictions_is_left_out_of_macro_f1():
    three = classification_report([0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 2, 2], ["a", "b", "c"])
    four = classification_report([0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 2, 2], ["a", "b", "c", "unused"])
    assert four.macro_f1 == pytest.approx(three.macro_f1)
    assert (four.precision[3], four.recall[3], four.f1[3], four.support[3]) == (0.0, 0.0, 0.0, 0)


def test_classification_report_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        classification_report([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [], ["a", "b"])
    with pytest.raises(ValueError, match="prediction 2 is not a class id"):
        classification_report([0, 2], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="label -1 is not a class id"):
        classification_report([0, 1], [0, -1], ["a", "b"])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=5).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40),
        )
    )
)
def test_accuracy_is_confusion_trace_over_total_and_scores_are_in_range(case):
    n_classes, pairs = case
    predictions, labels = [p for p, _ in pairs], [t for _, t in pairs]
    report = classification_report(predictions, labels, [f"class {i}" for i in range(n_classes)])
    confusion = np.asarray(report.confusion)
    assert confusion.sum() == len(pairs)
    assert report.accuracy == pytest.approx(np.trace(confusion) / len(pairs))
    assert report.support == confusion.sum(axis=1).tolist()
    assert 0.0 <= report.macro_f1 <= 1.0
    assert all(0.0 <= x <= 1.0 for x in report.precision + report.recall + report.f1)
    if report.accuracy == 1.0:
        assert report.macro_f1 == pytest.approx(1.0)


def test_classification_report_to_dict_round_trips_through_json():
    report = classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    result = report.to_dict()
    assert json.loads(json.dumps(result)) == result
    assert result["per_class"]["pos"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }


@pytest.fixture
def four_class_report() -> ClassificationReport:
    names = ["World", "Sports", "Business", "Science and Technology, a very long class name"]
    return classification_report([0, 1, 2, 2, 1, 0, 3, 3, 3, 0], [0, 1, 1, 2, 2, 0, 3, 3, 0, 3], names)


def test_text_confusion_matrix_is_aligned_and_truncates_long_names(four_class_report):
    text = format_confusion_matrix(four_class_report, max_name_len=12)
    lines = text.splitlines()
    assert "Science and…" in text and "very long" not in text
    table = [lines[0], *lines[2:6]]
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    assert lines[2].split()[:5] == ["World", "2", "0", "0", "1"]
    assert "accuracy 0.6000" in lines[-1]


def test_names_that_truncation_makes_alike_are_numbered():
    names = ["sentiment: negative", "sentiment: positive"]
    text = format_confusion_matrix(classification_report([0, 1], [0, 1], names), max_name_len=12)
    assert "0:sentiment…" in text and "1:sentiment…" in text


def _assert_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def test_confusion_matrix_plot_is_a_png(four_class_report, tmp_path):
    path = plot_confusion_matrix(four_class_report, tmp_path / "plots" / "confusion.png")
    assert path == tmp_path / "plots" / "confusion.png"
    _assert_png(path)


def _write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_training_curves_are_written_from_a_metrics_file(tmp_path):
    records = []
    for step in range(0, 1001, 10):
        nll = 2.0 + 6.0 * math.exp(-step / 300)
        records.append(
            {"step": step, "loss": nll + 0.5, "nll": nll, "lr": 1e-6 * step, "tokens_per_s": 5400.0}
        )
        if step and step % 250 == 0:
            records.append({"step": step, "split": "valid", "valid_nll": nll + 0.1, "valid_bleu": step / 50})
    metrics = read_metrics(_write_metrics(tmp_path / "metrics.jsonl", records))
    assert metrics == records

    written = plot_training_curves(metrics, tmp_path / "plots")
    assert [path.name for path in written] == ["loss.png", "lr.png", "valid.png"]
    for path in written:
        _assert_png(path)


def test_plots_are_skipped_when_their_metrics_are_absent(tmp_path):
    only_loss = [{"step": step, "loss": 3.0 - step / 100} for step in range(5)]
    assert [p.name for p in plot_training_curves(only_loss, tmp_path / "a")] == ["loss.png"]

    only_accuracy = [{"step": 100 * i, "split": "valid", "valid_accuracy": 0.5 + i / 10} for i in range(1, 4)]
    assert [p.name for p in plot_training_curves(only_accuracy, tmp_path / "b")] == ["valid.png"]

    assert plot_training_curves([], tmp_path / "c") == []
    assert not (tmp_path / "c").exists()


def test_read_metrics_skips_blank_lines_and_names_a_malformed_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]

    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 3"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        read_metrics(path)


def test_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results" / "test.json"
    content = {
        "bleu": 27.3,
        "per_class": {"a": [1, 2]},
        "name": "Ü",
        "mean": np.float32(0.5),
        "n": np.int64(3),
    }
    assert write_json(path, content) == path
    assert json.loads(path.read_text(encoding="utf-8")) == {**content, "mean": 0.5, "n": 3}
    write_json(path, {"bleu": 28.0})
    assert json.loads(path.read_text(encoding="utf-8")) == {"bleu": 28.0}
    assert [p.name for p in path.parent.iterdir()] == ["test.json"]


def test_write_json_that_fails_leaves_the_old_file_whole(tmp_path):
    path = write_json(tmp_path / "test.json", {"bleu": 27.3})
    with pytest.raises(TypeError):
        write_json(path, {"bleu": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"bleu": 27.3}
    assert [p.name for p in tmp_path.iterdir()] == ["test.json"]


def test_perplexity_is_exp_of_nll():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError):
        perplexity(-0.1)


def test_bits_per_character_converts_nats_to_bits():
    assert bits_per_character(math.log(2.0)) == pytest.approx(1.0)
    assert bits_per_character(math.log(256.0)) == pytest.approx(8.0)  # a uniform guess over bytes
    assert bits_per_character(0.0) == 0.0
    with pytest.raises(ValueError):
        bits_per_character(-1.0)


def _write_results(run_dir, results, split="test"):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"results_{split}.json").write_text(json.dumps(results))
    return run_dir


def test_summarize_runs_gives_mean_and_sample_std_over_seeds(tmp_path, capsys):
    runs = [
        _write_results(tmp_path / f"seed{i}", {"split": "test", "accuracy": a, "macro_f1": f})
        for i, (a, f) in enumerate([(0.90, 0.80), (0.92, 0.84), (0.94, 0.82)])
    ]
    summary = {s.metric: s for s in summarize_runs(runs)}
    assert list(summary) == ["accuracy", "macro_f1"]
    assert summary["accuracy"].mean == pytest.approx(0.92)
    assert summary["accuracy"].std == pytest.approx(statistics.stdev([0.90, 0.92, 0.94]))
    assert summary["macro_f1"].values == [0.80, 0.84, 0.82]
    bleu = {"bleu": {"score": 30.0}, "chrf": {"score": 55.0}}
    (single,) = [s for s in summarize_runs([_write_results(tmp_path / "mt", bleu)]) if s.metric == "bleu"]
    assert single.mean == 30.0 and math.isnan(single.std)  # one run has no spread
    assert main(["summarize", *map(str, runs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"]["accuracy"]["mean"] == pytest.approx(0.92)


def test_summarize_refuses_missing_or_mismatched_results(tmp_path, capsys):
    good = _write_results(tmp_path / "a", {"accuracy": 0.9, "macro_f1": 0.8})
    with pytest.raises(ValueError, match=r"results_test\.json not found: run `vaswani evaluate"):
        summarize_runs([good, tmp_path / "missing"])
    other = _write_results(tmp_path / "b", {"bleu": {"score": 30.0}, "chrf": {"score": 50.0}})
    with pytest.raises(ValueError, match="differ from the first run"):
        summarize_runs([good, other])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results_test.json").write_text("{not json")
    assert main(["summarize", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "not a results file" in err and len(err.strip().splitlines()) == 1
